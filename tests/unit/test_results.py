"""Evaluation results: intervals that are right at the edges, and a JSON file that reads back."""

import pytest

from potential_meme.evaluation import EvaluationResults, ModelResults, Score
from potential_meme.evaluation.results import macro_mean, proportion, sample_mean


def test_wilson_intervals_match_published_values_and_stay_in_bounds():
    assert proportion(5, 10).low == pytest.approx(0.2366, abs=1e-4)
    assert proportion(5, 10).high == pytest.approx(0.7634, abs=1e-4)
    none_right = proportion(0, 164)
    assert none_right.value == 0 and none_right.low == 0 and none_right.high == pytest.approx(0.0229, abs=1e-4)
    assert proportion(20, 20).high == 1 and proportion(20, 20).low == pytest.approx(0.8389, abs=1e-4)
    with pytest.raises(ValueError):
        proportion(0, 0)


def test_macro_mean_weighs_subjects_equally():
    macro = macro_mean([proportion(1, 4), proportion(90, 100)])
    assert macro.value == pytest.approx((0.25 + 0.9) / 2)
    assert macro.n == 104 and macro.low < macro.value < macro.high


def test_sample_mean_interval_narrows_with_more_samples():
    few, many = sample_mean([4, 6] * 2), sample_mean([4, 6] * 50)
    assert few.value == many.value == 5
    assert (many.high - many.low) < (few.high - few.low) / 5
    assert sample_mean([7.0]).low is None


def test_results_read_back_from_json(tmp_path):
    results = EvaluationResults(
        models={
            "student": ModelResults(
                reference="s3://models/runs/demo/distill/student/",
                parameters=52_000_000,
                benchmarks={
                    "mmlu_cloze": {"accuracy": proportion(300, 1140)},
                    "latency": {"per_token_p50_ms": Score(value=12.5, n=160, unit="ms", higher_is_better=False)},
                },
                details={"mmlu_cloze": {"virology": proportion(7, 20)}},
                samples={"humaneval": [{"task_id": "HumanEval/0", "completion": "    return 1\n", "status": "failed"}]},
            )
        },
        setup={"date": "2026-11-30T00:00:00+00:00", "settings": {"limit": 20, "mmlu_formulations": ["letter"]}},
    )
    assert EvaluationResults.load(results.save(tmp_path / "results.json")) == results
    assert results.score("student", "mmlu_cloze", "accuracy").n == 1140
    assert results.score("teacher", "mmlu_cloze", "accuracy") is None
