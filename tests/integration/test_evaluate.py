"""`potential-meme evaluate`: held-out perplexity of a student and its teacher, as an EvaluationJob's pod runs it."""

import json

import pytest
import yaml

from helpers import cli


def evaluation_file(tmp_path, name="eval", **spec):
    path = tmp_path / f"{name}.yaml"
    document = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "EvaluationJob",
        "metadata": {"name": name},
        "spec": {"output": {"uri": str(tmp_path / "runs")}, **spec},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_evaluating_a_finished_distillation_reproduces_its_validation_numbers(job_file, tmp_path):
    distillation = job_file(training={"maxSteps": 4})
    not_yet = cli("evaluate", str(distillation))
    assert not_yet.returncode == 2
    assert "spec.distillationJob" in not_yet.stderr and "has not finished" in not_yet.stderr

    assert cli("run", str(distillation), "--metrics-port", "0").returncode == 0
    trained = json.loads((tmp_path / "runs" / "tiny" / "distill" / "manifest.json").read_text())["metrics"]
    result = cli("evaluate", str(distillation))
    assert result.returncode == 0, result.stderr
    stage = tmp_path / "runs" / "tiny-evaluation" / "evaluate"
    manifest = json.loads((stage / "manifest.json").read_text())
    results = json.loads((stage / "results.json").read_text())
    assert manifest["results"] == str(stage / "results.json")
    # Same held-out sequences, same models: the trainer's own validation figures come back.
    assert results["student"]["perplexity"] == pytest.approx(trained["studentPerplexityAfter"], rel=1e-4)
    assert results["teacher"]["perplexity"] == pytest.approx(trained["teacherPerplexity"], rel=1e-4)
    assert results["student"]["parameters"] == trained["studentParameters"]
    assert results["student"]["sequences"] == 8 and results["student"]["tokens"] == 8 * 64
    assert manifest["metrics"]["perplexityRatio"] == pytest.approx(
        trained["studentPerplexityAfter"] / trained["teacherPerplexity"], rel=1e-4
    )
    assert f"{results['student']['perplexity']:,.3f}" in result.stdout
    assert f"{results['teacher']['perplexity']:,.3f}" in result.stdout

    again = cli("evaluate", str(distillation))
    assert again.returncode == 0 and "skipped" in again.stderr

    # An EvaluationJob naming the job, resolved from its file: the same figures under its own name.
    named = evaluation_file(tmp_path, name="named", distillationJob="tiny")
    by_name = cli("evaluate", str(named), "--distillation-job", str(distillation))
    assert by_name.returncode == 0, by_name.stderr
    named_results = json.loads((tmp_path / "runs" / "named" / "evaluate" / "results.json").read_text())
    assert named_results["student"]["perplexity"] == pytest.approx(results["student"]["perplexity"], rel=1e-6)


def test_an_evaluation_job_of_model_references(tmp_path, tiny_teacher_dir, corpus_dir):
    dataset = {"source": str(corpus_dir), "validationFraction": 0.3, "maxValidationSequences": 4}
    path = evaluation_file(
        tmp_path,
        student=str(tiny_teacher_dir),
        teacher=str(tiny_teacher_dir),
        dataset=dataset,
        maxSeqLength=32,
        batchSize=3,
    )
    result = cli("evaluate", str(path))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "runs" / "eval" / "evaluate" / "results.json").read_text())
    # A model against itself: the same number, whatever the batch split.
    assert results["student"]["perplexity"] == pytest.approx(results["teacher"]["perplexity"], rel=1e-6)
    assert results["student"]["sequences"] == 4 and results["student"]["tokens"] == 4 * 32
    assert "perplexity 1.000x, parameters 1.000x" in result.stdout


def test_an_evaluation_job_naming_a_distillation_job_needs_its_file_here(tmp_path, job_file):
    path = evaluation_file(tmp_path, distillationJob="tiny")
    result = cli("evaluate", str(path))
    assert result.returncode == 2
    assert "spec.distillationJob" in result.stderr and "--distillation-job" in result.stderr
    other = cli("evaluate", str(path), "--distillation-job", str(job_file(name="other")))
    assert other.returncode == 2 and "names 'tiny'" in other.stderr
