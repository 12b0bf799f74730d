"""What an evaluation measured: per model, per benchmark, per metric, each number with its sample count
and, where one applies, a 95 % confidence interval. Serializes to JSON and reads back, so a plot or a
report can be rebuilt from a results file without measuring again."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Z95 = 1.959963984540054


class Score(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float
    n: int = Field(description="How many samples (questions, problems, tokens, runs) the value is over.")
    low: float | None = Field(default=None, description="95 % confidence interval, where one applies.")
    high: float | None = None
    unit: str = ""
    higher_is_better: bool = True


def proportion(successes: int, n: int, unit: str = "accuracy") -> Score:
    """A share of successes with its Wilson interval (sound at 0, 1 and small n, unlike the normal one)."""
    if n <= 0:
        raise ValueError("a proportion needs at least one sample")
    share = successes / n
    centre = (share + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(share * (1 - share) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return Score(value=share, n=n, low=max(0.0, centre - half), high=min(1.0, centre + half), unit=unit)


def macro_mean(parts: list[Score], unit: str = "accuracy") -> Score:
    """The unweighted mean of proportions (MMLU's macro accuracy), its interval from the parts' variances."""
    if not parts:
        raise ValueError("a macro mean needs at least one part")
    mean = sum(part.value for part in parts) / len(parts)
    variance = sum(part.value * (1 - part.value) / part.n for part in parts) / len(parts) ** 2
    half = Z95 * math.sqrt(variance)
    return Score(
        value=mean, n=sum(part.n for part in parts), low=max(0.0, mean - half), high=min(1.0, mean + half), unit=unit
    )


def sample_mean(values: list[float], unit: str = "", higher_is_better: bool = True) -> Score:
    """A mean with its normal-approximation interval (a single value gets none)."""
    if not values:
        raise ValueError("a mean needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return Score(value=mean, n=1, unit=unit, higher_is_better=higher_is_better)
    deviation = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    half = Z95 * deviation / math.sqrt(len(values))
    return Score(
        value=mean, n=len(values), low=mean - half, high=mean + half, unit=unit, higher_is_better=higher_is_better
    )


class ModelResults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str
    parameters: int
    benchmarks: dict[str, dict[str, Score]] = Field(
        default_factory=dict, description="benchmark -> metric -> score, e.g. mmlu -> accuracy."
    )
    details: dict[str, dict[str, Score]] = Field(
        default_factory=dict, description="benchmark -> part -> score, e.g. mmlu_letter -> anatomy."
    )
    samples: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="benchmark -> a few examples of what the model wrote."
    )


class EvaluationResults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelResults] = Field(description="role (teacher, student) -> what it scored.")
    setup: dict[str, Any] = Field(default_factory=dict, description="versions, dates, commands, settings.")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResults:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def from_json(cls, text: str) -> EvaluationResults:
        return cls.model_validate(json.loads(text))

    def score(self, role: str, benchmark: str, metric: str) -> Score | None:
        return self.models.get(role, ModelResults(reference="", parameters=0)).benchmarks.get(benchmark, {}).get(metric)


def compared_rows(results: EvaluationResults) -> list[tuple[str, str, Score | None, Score | None]]:
    """(benchmark, metric, teacher's score, student's score) for everything either has (None: that one has not;
    a weak judge may rate one model's answers and none of the other's), the student's first."""
    student = results.models["student"]
    teacher = results.models.get("teacher")
    metrics_of: dict[str, dict[str, None]] = {}  # benchmark -> its metrics, in the order first seen
    for model in [student, teacher] if teacher else [student]:
        for benchmark, metrics in model.benchmarks.items():
            metrics_of.setdefault(benchmark, {}).update(dict.fromkeys(metrics))
    return [
        (benchmark, metric, results.score("teacher", benchmark, metric), results.score("student", benchmark, metric))
        for benchmark, metrics in metrics_of.items()
        for metric in metrics
    ]
