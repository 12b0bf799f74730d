import math

import pytest

from potential_meme.engine.schedule import lr_lambda


def test_warmup_then_cosine_to_zero():
    factor = lr_lambda("cosine", warmup_steps=4, total_steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0
    assert factor(12) == pytest.approx(0.5)
    assert factor(20) == pytest.approx(0.0, abs=1e-12)
    assert all(factor(s) >= factor(s + 1) for s in range(4, 20))


def test_linear_and_constant():
    linear = lr_lambda("linear", 0, 10)
    assert [round(linear(s), 2) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    constant = lr_lambda("constant", 2, 10)
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert not math.isnan(lr_lambda("cosine", 0, 1)(0))
