"""Job specs: pydantic models, loading with clear errors, CRD generation and stage planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import SpecError
from .models import (
    API_GROUP,
    API_VERSION,
    DistillationJob,
    DistillationJobSpec,
    EvaluationJob,
    JobStatus,
    KnowledgeMethod,
)
from .plan import Stage, plan_stages

JOB_KINDS = {"DistillationJob": DistillationJob, "EvaluationJob": EvaluationJob}


def parse_job(data: Any, source: str = "job") -> DistillationJob | EvaluationJob:
    """Validate a job document (a dict as read from YAML); raise SpecError naming each bad field."""
    if not isinstance(data, dict):
        raise SpecError([("(top level)", "expected a mapping with apiVersion, kind, metadata and spec")], source)
    kind = data.get("kind")
    model = JOB_KINDS.get(kind)
    if model is None:
        raise SpecError([("kind", f"got {kind!r}; accepted: {', '.join(JOB_KINDS)}")], source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError.from_validation(model, exc, source) from None


def load_job(path: str | Path) -> DistillationJob | EvaluationJob:
    """Read and validate a job file (YAML or JSON)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError([("(file)", f"cannot read {path}: {exc.strerror}")], str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            [
                (
                    "(file)",
                    f"not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8",
                )
            ],
            str(path),
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError([("(file)", f"not valid YAML: {exc}")], str(path)) from None
    return parse_job(data, str(path))


__all__ = [
    "API_GROUP",
    "API_VERSION",
    "DistillationJob",
    "DistillationJobSpec",
    "EvaluationJob",
    "JobStatus",
    "KnowledgeMethod",
    "SpecError",
    "Stage",
    "load_job",
    "parse_job",
    "plan_stages",
]
