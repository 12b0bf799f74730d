"""Prometheus metrics: the trainer's (steps, losses, checkpoints) and the operator's (reconciliations, API calls)."""
