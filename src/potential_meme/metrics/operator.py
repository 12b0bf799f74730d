"""Operator metrics, `potential_meme_operator_*`. No per-job labels on counters and histograms."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ..spec.models import JobStatus

RECONCILIATIONS = Counter(
    "potential_meme_operator_reconciliations", "Reconciliations by kind and result", ("kind", "result")
)
JOBS = Gauge("potential_meme_operator_jobs", "Jobs by kind and phase", ("kind", "phase"))
STAGE_DURATION = Histogram(
    "potential_meme_operator_stage_duration_seconds",
    "Stage wall time, start to finish",
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800, float("inf")),
)
PYTORCHJOBS_CREATED = Counter("potential_meme_operator_pytorchjobs_created", "PyTorchJobs created")
API_REQUESTS = Counter(
    "potential_meme_operator_api_requests",
    "Kubernetes API requests of the operator's own client (kopf's watches aside), by method and outcome: "
    "ok, retried (throttled, 5xx, timeout or 401, then sent again), refused (another 4xx), failed (out of attempts)",
    ("method", "outcome"),
)

_phases: dict[tuple[str, str | None, str], str] = {}


def job_phase(kind: str, namespace: str | None, name: str, phase: str | None) -> None:
    """Record a job's phase (None: deleted); the per-phase gauges move by one, not by a recount."""
    key = (kind, namespace, name)
    before = _phases.pop(key, None)
    if before is not None:
        JOBS.labels(kind=kind, phase=before).dec()
    if phase is not None:
        _phases[key] = phase
        JOBS.labels(kind=kind, phase=phase).inc()


def _seconds(start: str, finish: str) -> float:
    parse = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    return (parse(finish) - parse(start)).total_seconds()


def stage_durations(previous: JobStatus | None, current: JobStatus) -> None:
    """Observe each stage once, when it first shows as Succeeded with both times known."""
    done_before = {row.name for row in (previous.stages if previous else []) if row.phase == "Succeeded"}
    for row in current.stages:
        if row.phase == "Succeeded" and row.name not in done_before and row.start_time and row.finish_time:
            STAGE_DURATION.observe(_seconds(row.start_time, row.finish_time))


def serve(port: int) -> None:
    start_http_server(port)
