"""Quality gates: numbers a student must reach, checked against an evaluation's results."""

from __future__ import annotations

from typing import Any

from ..spec.models import QualityGate
from .report import compared_rows
from .results import EvaluationResults


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
        numbers[f"{benchmark}.{metric}"] = round(student.value, 6)
        if teacher is not None and teacher.value:
            numbers[f"{benchmark}.{metric}.shareOfTeacher"] = round(student.value / teacher.value, 6)
    return numbers
