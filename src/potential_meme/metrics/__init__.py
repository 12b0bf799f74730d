"""Prometheus metrics of the trainer (and, later, the operator)."""
