"""Benchmarks of a teacher and its students (MMLU, HumanEval, MT-Bench, latency and memory)."""
