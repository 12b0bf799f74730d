"""Trainer metrics, `potential_meme_trainer_*`, served on /metrics when a port is given.

A pod runs one stage of one job, so the `job` and `stage` labels have one value per process.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

_LABELS = ("job", "stage")

STEPS = Counter("potential_meme_trainer_steps", "Optimizer steps taken", _LABELS)
TOKENS = Counter("potential_meme_trainer_tokens", "Training tokens processed (all processes)", _LABELS)
LOSS = Gauge("potential_meme_trainer_loss", "Loss of the latest optimizer step", (*_LABELS, "component"))
TOKENS_PER_SECOND = Gauge("potential_meme_trainer_tokens_per_second", "Training throughput (all processes)", _LABELS)
CHECKPOINT_WRITES = Counter("potential_meme_trainer_checkpoint_writes", "Checkpoints written", _LABELS)
CURRENT_STEP = Gauge("potential_meme_trainer_step", "Optimizer step reached (survives resume)", _LABELS)
TOTAL_STEPS = Gauge("potential_meme_trainer_planned_steps", "Optimizer steps planned for the stage", _LABELS)
STAGE_INDEX = Gauge("potential_meme_trainer_stage_index", "0-based index of the running stage in the plan", ("job",))
STAGE_INFO = Gauge("potential_meme_trainer_stage_info", "1 for the stage this process runs", _LABELS)
HELD_OUT_SPLIT = "held-out"  # the `dataset` label of the training corpus' held-out split; other sets go by name
VALIDATION_PERPLEXITY = Gauge(
    "potential_meme_trainer_validation_perplexity",
    "Validation perplexity",
    (*_LABELS, "model", "when", "dataset"),
)
STUDENT_BYTES = Gauge(
    "potential_meme_trainer_student_bytes",
    "Bytes on disk of a stage's student: by precision (a quantize stage) or by format (an export stage)",
    (*_LABELS, "variant"),
)
EXPORT_LOGIT_DIFFERENCE = Gauge(
    "potential_meme_trainer_export_max_logit_difference",
    "Largest |exported - PyTorch| logit over the check sequences, in the format's own runtime",
    (*_LABELS, "format"),
)
EXPORT_LATENCY = Gauge(
    "potential_meme_trainer_export_forward_seconds",
    "Median time of one forward of the exported model in its runtime",
    (*_LABELS, "format"),
)

_served_ports: set[int] = set()


def serve(port: int, address: str = "127.0.0.1") -> bool:
    """Start the /metrics endpoint once per port; a busy port is reported, not fatal."""
    if port in _served_ports:
        return True
    try:
        start_http_server(port, addr=address)
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", address, port, exc)
        return False
    _served_ports.add(port)
    log.info("metrics on http://%s:%d/metrics", address, port)
    return True


def stage_started(job: str, stage: str, index: int) -> None:
    """Mark the stage as running and export its counters at 0, so rates work from the first scrape."""
    STAGE_INDEX.labels(job=job).set(index)
    STAGE_INFO.labels(job=job, stage=stage).set(1)
    for counter in (STEPS, TOKENS, CHECKPOINT_WRITES):
        counter.labels(job=job, stage=stage)


def stage_finished(job: str, stage: str) -> None:
    STAGE_INFO.labels(job=job, stage=stage).set(0)


def step_done(labels: dict[str, str], step: int, tokens: int, tokens_per_second: float, **losses: float) -> None:
    STEPS.labels(**labels).inc()
    TOKENS.labels(**labels).inc(tokens)
    CURRENT_STEP.labels(**labels).set(step)
    TOKENS_PER_SECOND.labels(**labels).set(tokens_per_second)
    for component, value in losses.items():
        LOSS.labels(**labels, component=component).set(value)
