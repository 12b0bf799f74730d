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


def test_a_number_only_the_teacher_has_is_shown_against_nothing(tmp_path):
    """Measured: a weak judge rated 3 of the teacher's 160 MT-Bench answers and none of the student's."""
    from PIL import Image

    from potential_meme.evaluation.gates import headline
    from potential_meme.evaluation.report import comparison_figure, results_table
    from potential_meme.evaluation.results import compared_rows

    unreadable = {"teacher": 157, "student": 160}
    models = {
        role: ModelResults(
            reference=role,
            parameters=10,
            benchmarks={"mt-bench": {"unreadable_judgments": Score(value=count, n=160, higher_is_better=False)}},
        )
        for role, count in unreadable.items()
    }
    models["teacher"].benchmarks["mt-bench"]["score"] = sample_mean([3.0, 4.0, 5.0], unit="1-10")
    results = EvaluationResults(models=models)
    rows = compared_rows(results)
    assert [(metric, student is None) for _, metric, _, student in rows] == [
        ("unreadable_judgments", False),
        ("score", True),
    ]
    assert rows[1][2].value == 4.0
    score_line = next(line for line in results_table(results) if line.strip().startswith("score"))
    assert "4.000 [" in score_line and score_line.split()[-2:] == ["-", "-"]
    assert headline(results) == {
        "mt-bench.unreadable_judgments": 160,
        "mt-bench.unreadable_judgments.shareOfTeacher": pytest.approx(160 / 157, abs=1e-6),
    }  # the status holds the student's numbers: none for a score it lacks
    with Image.open(comparison_figure(results, tmp_path / "comparison.png")) as image:
        assert image.format == "PNG"
