"""The export stage of a mobile job: the distill stage's student written in each of the job's formats, every file
run in its own runtime against PyTorch's logits (`potential_meme.export`), published with its sha256."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ..export import ExportUnavailable, export_model
from ..metrics import trainer as metrics
from ..spec.errors import SpecError
from ..spec.models import DistillationJob
from ..spec.plan import MANIFEST, STUDENT_DIR, Stage, stage_manifest
from ..storage import open_store, publish_folder, write_json
from .finish import finished_manifest
from .models import load_model, resolve
from .runtime import Runtime
from .stage_setup import previous_stage

log = logging.getLogger(__name__)


def run_export_stage(job: DistillationJob, stage: Stage, runtime: Runtime) -> dict[str, Any]:
    method = job.spec.method.mobile
    previous = previous_stage(job, stage)
    student = load_model(resolve(previous.output_uri + STUDENT_DIR))
    precision = finished_manifest(job, previous)["metrics"]["architecture"]["precision"]  # the search chose it
    store = open_store(stage.output_uri)
    manifest = stage_manifest(job, stage, runtime.world_size)
    if runtime.is_main:  # one process converts; the others of a multi-process pod wait
        with tempfile.TemporaryDirectory(prefix="potential-meme-export-") as tmp:
            try:
                exported = export_model(student, method.formats, tmp, job.spec.training.seed, precision)
            except ExportUnavailable as exc:
                raise SpecError([("spec.method.mobile.formats", str(exc))], job.metadata.name) from None
            limit = method.target_size_mb * 1e6
            formats = {
                name: {**result.as_dict(), "withinTargetSize": result.bytes <= limit}
                for name, result in exported.items()
            }
            files = publish_folder(store, Path(tmp), "")
        for name, result in formats.items():
            checked = (
                result["runtime"]
                if result["maxLogitDifference"] is None
                else f"{result['latencyMs']:.2f} ms a forward of 32 tokens in {result['runtime']}, logits within "
                f"{result['maxLogitDifference']:.2g} of PyTorch's"
            )
            over = "" if result["withinTargetSize"] else f" (over the {method.target_size_mb:g} MB target)"
            log.info("%s: %.1f MB%s, %s", name, result["bytes"] / 1e6, over, checked)
            labels = {"job": job.metadata.name, "stage": stage.name}
            metrics.STUDENT_BYTES.labels(**labels, variant=name).set(result["bytes"])
            if result["maxLogitDifference"] is not None:  # run in its runtime, not only declared
                metrics.EXPORT_LOGIT_DIFFERENCE.labels(**labels, format=name).set(result["maxLogitDifference"])
                metrics.EXPORT_LATENCY.labels(**labels, format=name).set(result["latencyMs"] / 1000)
        manifest |= {"files": files, "metrics": {"formats": formats, "targetSizeMb": method.target_size_mb}}
        write_json(store, MANIFEST, manifest)
    runtime.barrier()
    return manifest
