"""Planning: a pure function from a job to the ordered stages that run it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .models import format_parameter_count

if TYPE_CHECKING:
    from .models import DistillationJob


MANIFEST = "manifest.json"  # written last by a stage: its presence means the stage is done
STUDENT_DIR = "student/"  # the stage's student, a Hugging Face folder


@dataclass(frozen=True)
class Stage:
    """One unit of work: a PyTorchJob in the cluster, a step of `potential-meme run` locally."""

    index: int  # 0-based position in the plan
    name: str  # deterministic, DNS-label safe: it becomes part of the PyTorchJob name
    kind: str  # what the engine does in this stage
    output_uri: str  # <output>/<job>/<stage>/
    inputs: tuple[str, ...] = ()  # names of earlier stages whose artifacts this one reads
    target_parameters: int | None = None  # progressive: the size this stage prunes to


def spec_hash(job: DistillationJob) -> str:
    """Hash of what determines a stage's result; placement, retries and suspension do not."""
    placement = {"suspend": True, "resources": True, "run_policy": True, "output": {"credentials_secret", "endpoint"}}
    relevant = job.spec.model_dump(mode="json", exclude=placement)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def job_output_uri(job: DistillationJob) -> str:
    return f"{job.spec.output.uri.rstrip('/')}/{job.metadata.name}/"


def plan_stages(job: DistillationJob) -> list[Stage]:
    method = job.spec.method.name
    root = job_output_uri(job)
    if method in ("knowledge", "layerwise"):
        return [Stage(index=0, name="distill", kind="distill", output_uri=f"{root}distill/")]
    if method == "progressive":
        stages: list[Stage] = []
        for index, size in enumerate(job.spec.method.progressive.sizes):
            name = f"distill-{format_parameter_count(size)}"
            if any(stage.name == name for stage in stages):  # sizes too close for the short form
                name = f"distill-{size}"
            stages.append(
                Stage(
                    index=index,
                    name=name,
                    kind="progressive",
                    output_uri=f"{root}{name}/",
                    inputs=(stages[-1].name,) if stages else (),
                    target_parameters=size,
                )
            )
        return stages
    raise NotImplementedError(f"no plan for method {method!r}")  # unreachable: the spec refuses it
