"""The evaluate stage: held-out perplexity of a student and its teacher on the same documents.

Each model reads the held-out documents through its own tokenizer, so a student with another
vocabulary is still measured fairly (per token of its own tokenizer; the token counts are reported).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..metrics import trainer as metrics
from ..spec.models import EvaluationJob
from ..spec.plan import MANIFEST, RESULTS, Stage, stage_manifest
from ..storage import open_store, write_json
from .data import load_documents, pack
from .models import ResolvedModel, load_model, load_tokenizer, parameter_count
from .runtime import Runtime, perplexity

log = logging.getLogger(__name__)


def _measure(
    reference: str, resolved: ResolvedModel, documents, job: EvaluationJob, runtime: Runtime
) -> dict[str, Any]:
    spec = job.spec
    tokenizer = load_tokenizer(resolved)
    rows = pack(documents, tokenizer, spec.max_seq_length, "spec.maxSeqLength")[: spec.dataset.max_validation_sequences]
    model = load_model(resolved, dtype=runtime.autocast_dtype or torch.float32).to(runtime.device)
    started = time.monotonic()
    value = perplexity(model, rows, runtime, spec.batch_size, spec.chunk_size)
    return {
        "model": reference,
        "perplexity": value,
        "parameters": parameter_count(model),
        "sequences": int(rows.shape[0]),
        "tokens": int(rows.numel()),
        "seconds": round(time.monotonic() - started, 2),
    }


def run_evaluation_stage(
    job: EvaluationJob, stage: Stage, runtime: Runtime, resolved: dict[str, ResolvedModel]
) -> dict[str, Any]:
    """`resolved`: the models by role, as the checks before the stage resolved them."""
    spec = job.spec
    _, documents = load_documents(spec.dataset)  # the held-out split, as the distillation kept it apart
    results: dict[str, Any] = {"dataset": spec.dataset.source}
    for role, reference in (("student", spec.student), ("teacher", spec.teacher)):
        if reference is None:
            continue
        results[role] = _measure(reference, resolved[role], documents, job, runtime)
        metrics.VALIDATION_PERPLEXITY.labels(
            job=job.metadata.name, stage=stage.name, model=role, when="evaluation"
        ).set(results[role]["perplexity"])
        log.info("%s %s: held-out perplexity %.3f", role, reference, results[role]["perplexity"])
    summary = {
        "studentPerplexity": results["student"]["perplexity"],
        "studentParameters": results["student"]["parameters"],
        "sequences": results["student"]["sequences"],
    }
    if "teacher" in results:
        summary.update(
            teacherPerplexity=results["teacher"]["perplexity"],
            teacherParameters=results["teacher"]["parameters"],
            perplexityRatio=results["student"]["perplexity"] / results["teacher"]["perplexity"],
            parameterRatio=results["student"]["parameters"] / results["teacher"]["parameters"],
        )
    manifest = stage_manifest(job, stage, runtime.world_size, metrics=summary, results=stage.output_uri + RESULTS)
    if runtime.is_main:
        store = open_store(stage.output_uri)
        write_json(store, RESULTS, results)
        write_json(store, MANIFEST, manifest)  # last: its presence marks the evaluation done
    runtime.barrier()
    return manifest
