"""The engine: run one planned stage of a job, or all of them.

One training loop serves the CLI (`run`: every stage in this process), the pods (`train --stage`:
one stage, possibly under torchrun) and the library classes. An EvaluationJob's one stage
(`engine.evaluation`) runs through the same `run_stage`, so it skips, resumes and reports alike.

A distill stage, piece by piece: `preflight` refuses what the configs refute, `stage_setup` loads
data and models, `resume` restores a checkpoint, `loop` runs the steps, `finish` publishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..metrics import trainer as metrics
from ..spec.errors import SpecError
from ..spec.models import DistillationJob, EvaluationJob
from ..spec.plan import Stage, StageKind, plan_stages, stage_manifest
from ..storage import open_store
from . import checkpoint, preflight, resume
from .cache_stage import run_cache_stage
from .evaluation import run_evaluation_stage
from .export_stage import run_export_stage
from .finish import finished_manifest, publish
from .generation_stage import run_augment_stage, run_generate_stage
from .loop import EarlyStopping, accumulate_gradients
from .models import parameter_count
from .progress import Progress, shown_perplexity
from .quantize import add_quantization_report, as_loaded, is_adapted, publish_adapters
from .runtime import Runtime, freed_memory_kept, start_runtime
from .sharding import clip_gradients, full_state, held_bytes, is_sharded, peak_memory_bytes, restore_copy
from .stage_setup import set_up

log = logging.getLogger(__name__)


def run_distill_stage(
    job: DistillationJob, stage: Stage, runtime: Runtime, models: preflight.CheckedModels
) -> dict[str, Any]:
    spec, training = job.spec, job.spec.training
    store = open_store(stage.output_uri)
    labels = {"job": job.metadata.name, "stage": stage.name}
    restored = checkpoint.load_newest(store)
    facts_before = restored.training_state.get("facts") if restored is not None else None
    setup = set_up(
        job, stage, runtime, resume.accumulation_for(job, restored, runtime.world_size), models, facts_before
    )
    early = EarlyStopping(training.early_stopping_patience)
    step, resumed_from, stopped_early = 0, None, False
    if restored is not None:
        before = resume.restore(job, setup, restored, early, stage.output_uri)
        step = resumed_from = restored.step
        log.info("resuming %s/%s from checkpoint at step %d", job.metadata.name, stage.name, step)
    else:
        cached = setup.teacher.cache.teacher_metrics if setup.teacher.cache is not None else None  # measured there
        before = {
            "teacherPerplexity": cached["teacherPerplexity"] if cached else setup.perplexity(setup.teacher_model),
            "studentPerplexityBefore": setup.perplexity(setup.student),
        }
        if setup.validation_sets:
            student = setup.perplexities_elsewhere(setup.student)
            if cached:
                elsewhere = cached.get("validationSets", {})
                teacher = {name: elsewhere.get(name, {}).get("teacherPerplexity") for name in student}
            else:
                teacher = setup.perplexities_elsewhere(setup.teacher_model)
            before["validationSets"] = {
                name: {"teacherPerplexity": teacher[name], "studentPerplexityBefore": student[name]} for name in teacher
            }
        if training.eval_every_steps:
            early.observe(0, before["studentPerplexityBefore"], setup.student)  # training must beat the start
        if runtime.is_main:
            log.info(
                "validation perplexity: teacher %s, student before %.2f",
                shown_perplexity(before["teacherPerplexity"], ".2f"),
                before["studentPerplexityBefore"],
            )
            for name, measured in before.get("validationSets", {}).items():
                log.info(
                    "validation perplexity on %s: teacher %s, student before %.2f",
                    name,
                    shown_perplexity(measured["teacherPerplexity"], ".2f"),
                    measured["studentPerplexityBefore"],
                )

    total_steps = setup.total_steps
    metrics.TOTAL_STEPS.labels(**labels).set(total_steps)
    metrics.CURRENT_STEP.labels(**labels).set(step)
    tokens_per_step = setup.batches.rows_per_step * training.max_seq_length
    progress = Progress(runtime, total_steps, step, training.log_every_steps, f"{job.metadata.name}/{stage.name}")
    started, losses, held = time.monotonic(), [], None
    setup.objective.train()
    with resume.Preemption() as preemption, freed_memory_kept(runtime.device):
        while step < total_steps:
            step_started = time.monotonic()
            step_losses = accumulate_gradients(
                setup.model,
                setup.teacher,
                setup.teacher_weight,
                setup.batches.step_batches(step, runtime),
                runtime,
                spec.method.selected.on_policy,
                setup.student,
                seed=training.seed * 100_003 + step,
            )
            if training.max_grad_norm is not None:
                clip_gradients(setup.objective, training.max_grad_norm)
            setup.optimizer.step()
            if held is None:  # gradients and optimizer state all exist now
                held = held_bytes([setup.objective, setup.teacher_model], setup.optimizer)
            setup.scheduler.step()
            setup.optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_losses["total"])
            tokens_per_second = tokens_per_step / (time.monotonic() - step_started)
            metrics.step_done(labels, step, tokens_per_step, tokens_per_second, **step_losses)
            progress.update(step, step_losses["total"], tokens_per_second)

            if training.eval_every_steps and step % training.eval_every_steps == 0:
                value = setup.perplexity(setup.student)
                stopped_early = early.observe(step, value, setup.student)
                if runtime.is_main:
                    log.info(
                        "step %d: validation perplexity %.2f (best %.2f at step %d)",
                        step,
                        value,
                        early.best,
                        early.best_step,
                    )
                if stopped_early:
                    log.info("early stop at step %d: %d evaluations without improvement", step, early.misses)
                    break
            preempted = preemption.agreed(runtime) and step < total_steps
            if preempted:
                log.warning("SIGTERM: step %d is done; writing a checkpoint and stopping", step)
            if (step % spec.checkpoint.every_steps == 0 or preempted) and step < total_steps:
                resume.save(job, setup, store, step, before, early)
                metrics.CHECKPOINT_WRITES.labels(**labels).inc()
            if preempted:
                progress.close()
                raise preemption.stop(step)
    progress.close()
    train_seconds = time.monotonic() - started
    if early.best_state is not None:
        restore_copy(setup.student, early.best_state)  # the best evaluated student, not the last
    adapters, adapter_files, published = {}, [], setup.student
    if is_adapted(setup.student):  # QAT: the adapters as trained, then the merged student as users load it
        adapters["adaptersPerplexity"] = setup.perplexity(setup.student)
        if runtime.is_main:
            adapter_files = publish_adapters(setup.student, store)
        published = setup.student.merge_and_unload()
        setup.student = as_loaded(published, runtime.device)  # measured; transformers cannot save it again
    after = setup.perplexity(setup.student)
    elsewhere = {
        name: {
            **before["validationSets"][name],
            "studentPerplexityAfter": value,
            "sequences": len(setup.validation_sets[name]),
        }
        for name, value in setup.perplexities_elsewhere(setup.student).items()
    }
    measured = {metrics.HELD_OUT_SPLIT: {**before, "studentPerplexityAfter": after}, **elsewhere}
    for dataset, values in measured.items():
        for model_name, when, key in (
            ("teacher", "before", "teacherPerplexity"),
            ("student", "before", "studentPerplexityBefore"),
            ("student", "after", "studentPerplexityAfter"),
        ):
            if values[key] is not None:
                metrics.VALIDATION_PERPLEXITY.labels(**labels, model=model_name, when=when, dataset=dataset).set(
                    values[key]
                )
        if runtime.is_main and dataset != metrics.HELD_OUT_SPLIT:
            log.info("validation perplexity on %s: student after %.2f", dataset, values["studentPerplexityAfter"])
    steps_run = step - (resumed_from or 0)
    peaks = runtime.gather(peak_memory_bytes(runtime.device))
    manifest = stage_manifest(
        job,
        stage,
        runtime.world_size,
        resumedFromStep=resumed_from,
        metrics={
            **before,
            "studentPerplexityAfter": after,
            **({"validationSets": elsewhere} if elsewhere else {}),
            "finalLoss": losses[-1] if losses else None,
            "steps": step,
            "stoppedEarly": stopped_early,
            "bestStep": early.best_step if training.eval_every_steps else step,
            "tokens": step * tokens_per_step,
            "trainSeconds": round(train_seconds, 2),
            "tokensPerSecond": round(steps_run * tokens_per_step / train_seconds, 1) if train_seconds else None,
            "teacherParameters": parameter_count(setup.teacher_model) if setup.teacher_model is not None else None,
            "studentParameters": parameter_count(setup.student),
            "validationTokens": int(setup.validation_rows.numel()),
            "heldBytesPerProcess": held,
            "peakMemoryBytes": peaks[0],
            "peakMemoryBytesByRank": peaks,
            **adapters,
            **setup.facts,
        },
    )
    if stage.kind is StageKind.QUANTIZE:
        add_quantization_report(manifest["metrics"], published, labels)
    if spec.gates and (spec.gated_stages == "every" or stage.index == len(plan_stages(job)) - 1):
        from ..evaluation.gates import check_gates, gate_metrics, stage_results

        manifest["gates"] = check_gates(spec.gates, stage_results(manifest["metrics"]))
        manifest["metrics"] |= gate_metrics(manifest["gates"])
        for gate in manifest["gates"]:
            log.info(
                "quality gate %s: %s (%s)", gate["gate"], "passed" if gate["passed"] else "FAILED", gate["message"]
            )
    whole = full_state(published) if is_sharded(published) else None  # every process sends its shards
    if runtime.is_main:
        publish(store, published, setup.tokenizer, manifest, checkpoint.PREFIX, adapter_files, whole)
    runtime.barrier()
    return manifest


# ---------------------------------------------------------------- stages and jobs


@contextlib.contextmanager
def _store_endpoint(job: DistillationJob | EvaluationJob) -> Iterator[None]:
    """`output.endpoint` for every S3 call of the stage, as the operator gives it to a job's pods."""
    endpoint, variable = job.spec.output.endpoint, "AWS_ENDPOINT_URL_S3"
    if endpoint is None:
        yield
        return
    previous = os.environ.get(variable)
    os.environ[variable] = endpoint
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous


def run_stage(
    job: DistillationJob | EvaluationJob,
    stage: Stage,
    metrics_port: int | None = None,
    metrics_address: str = "127.0.0.1",
) -> dict[str, Any]:
    """Run one stage unless its manifest says it is done; returns the manifest."""
    with _store_endpoint(job):
        return _run_stage(job, stage, metrics_port, metrics_address)


def _run_stage(
    job: DistillationJob | EvaluationJob, stage: Stage, metrics_port: int | None, metrics_address: str
) -> dict[str, Any]:
    preflight.check_references(job)
    done = finished_manifest(job, stage)
    if done is not None:
        log.info("stage %s of %s is done (manifest.json exists): skipped", stage.name, job.metadata.name)
        return done
    # Everything the configs can refute, before any weights load.
    if isinstance(job, EvaluationJob):
        models, timeout = preflight.check_evaluation(job), None
    else:
        models = preflight.check_distillation(job, stage)
        timeout = timedelta(minutes=job.spec.checkpoint.upload_timeout_minutes)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # carriage-return bars garble pod logs; ours logs lines instead
    precision = job.spec.precision if isinstance(job, EvaluationJob) else job.spec.training.precision
    runtime = start_runtime(precision, timeout)
    if runtime.is_main:
        preflight.check_writable(open_store(stage.output_uri), job.metadata.name)
    if metrics_port is not None and runtime.is_main:
        metrics.serve(metrics_port, metrics_address)
    metrics.stage_started(job.metadata.name, stage.name, stage.index)
    try:
        if stage.kind is StageKind.EVALUATE:
            return run_evaluation_stage(job, stage, runtime, models)
        if stage.kind is StageKind.GENERATE:
            return run_generate_stage(job, stage, runtime, models)
        if stage.kind is StageKind.AUGMENT:
            return run_augment_stage(job, stage, runtime, models)
        if stage.kind is StageKind.EXPORT:
            return run_export_stage(job, stage, runtime)
        if stage.kind is StageKind.CACHE_TEACHER:
            return run_cache_stage(job, stage, runtime, models)
        return run_distill_stage(job, stage, runtime, models)  # distill and progressive stages share the loop
    finally:
        metrics.stage_finished(job.metadata.name, stage.name)
        if runtime.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_job(job: DistillationJob | EvaluationJob, metrics_port: int | None = None) -> list[dict[str, Any]]:
    """Every planned stage in order, in this process, until one whose student fails a quality gate."""
    manifests = []
    for stage in plan_stages(job):
        manifests.append(run_stage(job, stage, metrics_port))
        if manifests[-1]["metrics"].get("gatesFailed"):
            break
    return manifests


def find_stage(job: DistillationJob | EvaluationJob, name: str) -> Stage:
    stages = plan_stages(job)
    for stage in stages:
        if stage.name == name:
            return stage
    planned = ", ".join(stage.name for stage in stages)
    raise SpecError([("--stage", f"{name!r} is not in the plan; {job.metadata.name} has {planned}")], job.metadata.name)
