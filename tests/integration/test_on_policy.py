"""On-policy distillation: the student rewrites the tails of part of each batch and the teacher scores them."""

import json

import pytest
import torch

from potential_meme.engine.losses import IGNORE_INDEX
from potential_meme.engine.models import load_model
from potential_meme.engine.on_policy import pieces, student_written
from potential_meme.spec.models import OnPolicySpec

from helpers import cli


def test_the_student_writes_the_tail_of_a_row_and_only_its_tokens_are_scored(tiny_teacher_dir):
    student = load_model(str(tiny_teacher_dir)).train()
    rows = torch.randint(1, 500, (3, 16))
    spec = OnPolicySpec(fraction=0.5, max_new_tokens=6)
    written_ids, written_labels = student_written(student, rows, spec, seed=7)
    assert written_ids.shape == rows.shape and torch.equal(written_ids[:, :10], rows[:, :10])
    assert not torch.equal(written_ids[:, 10:], rows[:, 10:])
    scored = written_labels != IGNORE_INDEX
    assert scored[:, 9:15].all() and scored.sum() == 3 * 6  # the positions that predict the student's tokens
    assert torch.equal(written_labels[:, 9:15], written_ids[:, 10:16])
    assert torch.equal(student_written(student, rows, spec, seed=7)[0], written_ids)  # seeded
    assert student.training  # left as it was found

    parts = pieces(rows, torch.zeros_like(rows), spec, student, seed=7)
    assert [(p.input_ids.shape[0], p.alpha, p.share) for p in parts] == [
        (1, None, pytest.approx(1 / 3)),
        (2, 0.0, pytest.approx(2 / 3)),
    ]
    assert len(pieces(rows, rows, None, student, seed=7)) == 1  # off: the batch as it is


def test_a_job_with_on_policy_batches_trains_and_refuses_a_row_without_a_prefix(job_file, tmp_path):
    on_policy = {"fraction": 0.5, "maxNewTokens": 16, "temperature": 1.0}
    method = {"knowledge": {"alpha": 0.0, "divergence": "reverseKL", "chunkSize": 64, "onPolicy": on_policy}}
    result = cli("run", str(job_file(method=method, training={"maxSteps": 3})), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs/tiny/distill/manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 3 and metrics["finalLoss"] > 0

    too_long = {**method["knowledge"], "onPolicy": {**on_policy, "maxNewTokens": 64}}
    refused = cli("run", str(job_file("long", method={"knowledge": too_long})), "--metrics-port", "0")
    assert refused.returncode == 2
    assert "method.knowledge.onPolicy.maxNewTokens: 64 leaves no prefix in a row of 64 tokens" in refused.stderr
