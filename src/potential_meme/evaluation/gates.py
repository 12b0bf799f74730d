"""Quality gates: numbers a student must reach, checked against an evaluation's results."""

from __future__ import annotations

from typing import Any

from ..spec.models import QualityGate
from .results import EvaluationResults, ModelResults, Score, compared_rows


def check_gates(gates: list[QualityGate], results: EvaluationResults) -> list[dict[str, Any]]:
    """Each gate with the student's figure, the bound it had to meet, and whether it did."""
    outcomes = []
    for gate in gates:
        benchmark, metric = gate.metric.split(".", 1)
        measured = results.score("student", benchmark, metric)
        bound = gate.at_least if gate.at_least is not None else gate.at_most
        outcome: dict[str, Any] = {"gate": gate.describe(), "metric": gate.metric, "passed": False}
        if measured is None:
            outcomes.append(outcome | {"message": f"the student has no {gate.metric}"})
            continue
        required = bound
        if gate.relative_to_teacher:
            teacher = results.score("teacher", benchmark, metric)
            if teacher is None:
                outcomes.append(outcome | {"measured": measured.value, "message": f"the teacher has no {gate.metric}"})
                continue
            required = bound * teacher.value
        passed = measured.value >= required if gate.at_least is not None else measured.value <= required
        relation = ">=" if gate.at_least is not None else "<="
        outcomes.append(
            outcome
            | {
                "measured": measured.value,
                "required": required,
                "passed": passed,
                "message": f"{gate.metric} {measured.value:.4g} {'' if passed else 'not '}{relation} {required:.4g}",
            }
        )
    return outcomes


def headline(results: EvaluationResults) -> dict[str, Any]:
    """The numbers a status shows: each student metric, and its share of the teacher's where there is one."""
    numbers: dict[str, Any] = {}
    for benchmark, metric, teacher, student in compared_rows(results):
        if student is None:
            continue
        numbers[f"{benchmark}.{metric}"] = round(student.value, 6)
        if teacher is not None and teacher.value:
            numbers[f"{benchmark}.{metric}.shareOfTeacher"] = round(student.value / teacher.value, 6)
    return numbers


def gate_metrics(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stage's metrics (and so its job's status and QualityGate condition) carry of its gates."""
    if not outcomes:
        return {}
    failures = [outcome["message"] for outcome in outcomes if not outcome["passed"]]
    summary: dict[str, Any] = {"gatesPassed": len(outcomes) - len(failures), "gatesFailed": len(failures)}
    if failures:
        summary["gateFailures"] = "; ".join(failures)
    return summary


def stage_results(metrics: dict[str, Any]) -> EvaluationResults:
    """A distillation stage's own validation numbers, as results its gates can be checked against."""

    def measured(role: str, perplexity: float) -> ModelResults:
        parameters = int(metrics[f"{role}Parameters"])
        return ModelResults(
            reference=role,
            parameters=parameters,
            benchmarks={
                "perplexity": {"perplexity": Score(value=perplexity, n=int(metrics.get("validationTokens", 0)))},
                "parameters": {"count": Score(value=parameters, n=1, higher_is_better=False)},
            },
        )

    models = {"student": measured("student", metrics["studentPerplexityAfter"])}
    if metrics["teacherPerplexity"] is not None:  # None: a teacher behind an API
        models["teacher"] = measured("teacher", metrics["teacherPerplexity"])
    return EvaluationResults(models=models)
