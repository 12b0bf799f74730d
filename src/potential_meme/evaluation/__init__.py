"""Benchmarks of a teacher and its students (MMLU, HumanEval, MT-Bench, latency and memory)."""

from .evaluator import DistillationEvaluator, EvaluationSettings
from .results import EvaluationResults, ModelResults, Score

__all__ = ["DistillationEvaluator", "EvaluationResults", "EvaluationSettings", "ModelResults", "Score"]
