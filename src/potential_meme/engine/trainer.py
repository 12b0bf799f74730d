"""The engine: run one planned stage of a job, or all of them.

One training loop serves the CLI (`run`: every stage in this process), the pods (`train --stage`:
one stage, possibly under torchrun) and the library classes. An EvaluationJob's one stage
(`engine.evaluation`) runs through the same `run_stage`, so it skips, resumes and reports alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..metrics import trainer as metrics
from ..spec.errors import SpecError, StageError
from ..spec.models import DistillationJob, EvaluationJob
from ..spec.plan import MANIFEST, STUDENT_DIR, Stage, plan_stages, spec_hash, stage_manifest
from ..storage import ArtifactStore, file_sha256, open_store, read_json_if_exists, sync_up, write_json
from . import checkpoint
from .data import epoch_order, load_documents, pack, shifted_labels
from .evaluation import run_evaluation_stage
from .models import derive_student, load_model, load_tokenizer, parameter_count, resolve
from .objective import DistillationObjective, HiddenStateTap, check_layer_indices, hidden_states
from .pruning import prune_to
from .runtime import Runtime, perplexity, start_runtime

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- schedule and progress


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


class Progress:
    """A tqdm bar on an interactive terminal; plain log lines every N steps elsewhere (pods, CI)."""

    def __init__(self, runtime: Runtime, total: int, start: int, every: int, label: str):
        self.enabled = runtime.is_main
        self.every = every
        self.total = total
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=label, unit="step", dynamic_ncols=True)
        self.started = time.monotonic()
        self.start_step = start

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            log.info("step %d/%d loss %.4f %.0f tok/s eta %.0fs", step, self.total, loss, tokens_per_second, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the distill stage


class Batches:
    """Which rows each process reads at each step: a pure function of (step, rank), so resume replays it.

    A step takes `rows_per_step` rows of the epoch's permutation; micro-batch m of rank r reads
    the m * world_size + r-th slice of them, so N processes read exactly what one process with
    N times the batch would.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, accumulation: int, world_size: int, seed: int):
        self.rows, self.batch_size, self.accumulation, self.seed = rows, batch_size, accumulation, seed
        self.world_size = world_size
        self.rows_per_step = batch_size * accumulation * world_size
        self.steps_per_epoch = rows.shape[0] // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise SpecError(
                [
                    (
                        "spec.training.batchSize",
                        (
                            f"{rows.shape[0]} training sequences cannot fill one step of {self.rows_per_step} "
                            "(batchSize x gradientAccumulationSteps x processes); lower batchSize or add data"
                        ),
                    )
                ]
            )

    def step_batches(self, step: int, runtime: Runtime) -> list[torch.Tensor]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.rows.shape[0], epoch, self.seed)
        first = position * self.rows_per_step
        batches = []
        for micro in range(self.accumulation):
            offset = first + (micro * self.world_size + runtime.rank) * self.batch_size
            batches.append(self.rows[order[offset : offset + self.batch_size]].to(runtime.device))
        return batches


@dataclass
class Teacher:
    model: nn.Module
    tap: HiddenStateTap | None  # layerwise: the teacher states the student matches

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        with torch.inference_mode():
            hidden = hidden_states(self.model, batch)
            states = self.tap.take() if self.tap else {}
        # Clones leave inference mode, so autograd may save them for backward.
        return hidden.clone(), {index: state.clone() for index, state in states.items()}


def _accumulate_gradients(model, teacher: Teacher, teacher_weight, batches, runtime: Runtime) -> dict[str, float]:
    """Forward and backward every micro-batch of one step; returns its mean losses over processes."""
    totals = [0.0, 0.0, 0.0, 0.0]
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        # DDP all-reduces gradients only after the last micro-batch of a step.
        skip_sync = model.no_sync() if runtime.world_size > 1 and not last else contextlib.nullcontext()
        with skip_sync, runtime.autocast():
            teacher_hidden, teacher_states = teacher.forward(batch) if teacher_weight is not None else (None, None)
            loss, *components = model(batch, shifted_labels(batch), teacher_hidden, teacher_weight, teacher_states)
            (loss / len(batches)).backward()
        for index, value in enumerate((loss.detach(), *components)):
            totals[index] += float(value) / len(batches)
    means = [value / runtime.world_size for value in runtime.all_sum(totals)]
    return dict(zip(("total", "ce", "kd", "layers"), means, strict=True))


def _previous_stage(job: DistillationJob, stage: Stage) -> Stage | None:
    """The stage whose student a progressive stage distills from; StageError while it is unfinished."""
    if stage.kind != "progressive" or stage.index == 0:
        return None
    previous = plan_stages(job)[stage.index - 1]
    if finished_manifest(job, previous) is None:
        raise StageError(
            f"stage {stage.name} distills the student of stage {previous.name}, which has not finished: "
            f"run `potential-meme train --stage {previous.name}` first"
        )
    return previous


def _load_models(
    job: DistillationJob, stage: Stage, previous: Stage | None, teacher_ref, train_rows: torch.Tensor, runtime: Runtime
):
    """(teacher, student, stage facts) for a stage; progressive stages prune their student."""
    dtype = runtime.autocast_dtype or torch.float32
    facts: dict[str, Any] = {}
    if stage.kind == "progressive":
        # Each stage learns from the model the stage before produced; the first from the teacher.
        teacher = load_model(resolve(previous.output_uri + STUDENT_DIR) if previous else teacher_ref, dtype=dtype)
        method = job.spec.method.progressive
        try:
            student, report = prune_to(
                teacher.float(), stage.target_parameters, train_rows[: method.calibration_sequences]
            )
        except ValueError as exc:
            last = stage.index == len(method.sizes) - 1
            field = "finalSize" if last else f"intermediateSizes.{stage.index}"
            raise SpecError([(f"spec.method.progressive.{field}", str(exc))], job.metadata.name) from None
        teacher = teacher.to(dtype)
        facts = report.as_metrics()
    elif job.spec.student.from_teacher is not None:
        teacher = load_model(teacher_ref, dtype=dtype)
        student = derive_student(teacher, job.spec.student.from_teacher.num_layers)
    else:
        teacher = load_model(teacher_ref, dtype=dtype)
        student = load_model(resolve(job.spec.student.model))
    teacher.to(runtime.device).eval().requires_grad_(False)
    return teacher, student.float().to(runtime.device), facts


def _save_student(student: nn.Module, tokenizer, store: ArtifactStore) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="potential-meme-student-") as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = []
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                files.append(
                    {
                        "path": STUDENT_DIR + str(path.relative_to(tmp)),
                        "sha256": file_sha256(path),
                        "bytes": path.stat().st_size,
                    }
                )
        sync_up(store, Path(tmp), STUDENT_DIR)
    return files


@dataclass
class EarlyStopping:
    """Held-out perplexity every N steps; keeps the best student and stops after `patience` misses."""

    patience: int | None
    best: float = math.inf
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    misses: int = 0

    def observe(self, step: int, value: float, student: nn.Module) -> bool:
        """Record an evaluation; True when training should stop."""
        if value < self.best:
            self.best, self.best_step, self.misses = value, step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        else:
            self.misses += 1
        return self.patience is not None and self.misses >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "best_state": self.best_state, "misses": self.misses}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_state, self.misses = state["best_state"], state["misses"]


def run_distill_stage(job: DistillationJob, stage: Stage, runtime: Runtime) -> dict[str, Any]:
    spec = job.spec
    method = spec.method.selected
    training = spec.training
    store = open_store(stage.output_uri)
    labels = {"job": job.metadata.name, "stage": stage.name}
    torch.manual_seed(training.seed)

    previous = _previous_stage(job, stage)  # before any work: its input must be ready
    train_docs, validation_docs = load_documents(spec.dataset)  # before the models: data errors come fast
    teacher_ref = resolve(spec.teacher.model)
    tokenizer = load_tokenizer(teacher_ref)
    train_rows = pack(train_docs, tokenizer, training.max_seq_length)
    validation_rows = pack(validation_docs, tokenizer, training.max_seq_length)[: spec.dataset.max_validation_sequences]
    teacher_model, student, stage_facts = _load_models(job, stage, previous, teacher_ref, train_rows, runtime)
    if training.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    layerwise = spec.method.layerwise
    if layerwise is not None:
        check_layer_indices(layerwise, teacher_model.config.num_hidden_layers, student.config.num_hidden_layers)
    teacher = Teacher(teacher_model, HiddenStateTap(teacher_model, layerwise.teacher_layers) if layerwise else None)
    batches = Batches(
        train_rows, training.batch_size, training.gradient_accumulation_steps, runtime.world_size, training.seed
    )
    total_steps = training.max_steps or training.epochs * batches.steps_per_epoch
    warmup_steps = int(training.warmup_ratio * total_steps)

    objective = DistillationObjective(student, method, teacher_model.config.hidden_size).to(runtime.device)
    model: nn.Module = objective
    if runtime.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        objective.parameters(),
        lr=training.learning_rate,
        weight_decay=training.weight_decay,
        fused=runtime.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training.lr_scheduler, warmup_steps, total_steps)
    )

    def evaluate(model_: nn.Module) -> float:
        return perplexity(model_, validation_rows, runtime, training.batch_size, method.chunk_size)

    early = EarlyStopping(training.early_stopping_patience)
    step, before, resumed_from, stopped_early = 0, {}, None, False
    restored = checkpoint.load_newest(store)
    if restored is not None:
        step, objective_state, state = restored.step, restored.student_state, restored.training_state
        if state["spec_hash"] != spec_hash(job):
            raise StageError(
                f"{stage.output_uri} holds checkpoints of a different spec; change metadata.name or "
                "output.uri, or delete that folder to start over"
            )
        objective.load_state_dict(objective_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.restore_rng(state["rng"])
        early.restore(state["early_stopping"])
        before, resumed_from = state["before"], step
        log.info("resuming %s/%s from checkpoint at step %d", job.metadata.name, stage.name, step)
    else:
        before = {"teacherPerplexity": evaluate(teacher_model), "studentPerplexityBefore": evaluate(student)}
        if training.eval_every_steps:
            early.observe(0, before["studentPerplexityBefore"], student)  # training must beat the start
        if runtime.is_main:
            log.info(
                "validation perplexity: teacher %.2f, student before %.2f",
                before["teacherPerplexity"],
                before["studentPerplexityBefore"],
            )

    metrics.TOTAL_STEPS.labels(**labels).set(total_steps)
    metrics.CURRENT_STEP.labels(**labels).set(step)
    teacher_weight = teacher_model.get_output_embeddings().weight if method.alpha < 1 or layerwise else None
    tokens_per_step = batches.rows_per_step * training.max_seq_length
    progress = Progress(runtime, total_steps, step, training.log_every_steps, f"{job.metadata.name}/{stage.name}")
    started, losses = time.monotonic(), []
    objective.train()
    while step < total_steps:
        step_started = time.monotonic()
        step_losses = _accumulate_gradients(
            model, teacher, teacher_weight, batches.step_batches(step, runtime), runtime
        )
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_losses["total"])
        tokens_per_second = tokens_per_step / (time.monotonic() - step_started)
        metrics.step_done(labels, step, tokens_per_step, tokens_per_second, **step_losses)
        progress.update(step, step_losses["total"], tokens_per_second)

        if training.eval_every_steps and step % training.eval_every_steps == 0:
            value = evaluate(student)
            stopped_early = early.observe(step, value, student)
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
        if step % spec.checkpoint.every_steps == 0 and step < total_steps:
            if runtime.is_main:
                checkpoint.save(
                    store,
                    step,
                    objective.state_dict(),
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": checkpoint.rng_state(),
                        "step": step,
                        "spec_hash": spec_hash(job),
                        "before": before,
                        "early_stopping": early.state(),
                    },
                    keep=spec.checkpoint.keep,
                )
                metrics.CHECKPOINT_WRITES.labels(**labels).inc()
                log.info("checkpoint written at step %d", step)
            runtime.barrier()
    progress.close()
    train_seconds = time.monotonic() - started
    if early.best_state is not None:
        student.load_state_dict(early.best_state)  # the best evaluated student, not the last
    after = evaluate(student)

    for model_name, when, value in (
        ("teacher", "before", before["teacherPerplexity"]),
        ("student", "before", before["studentPerplexityBefore"]),
        ("student", "after", after),
    ):
        metrics.VALIDATION_PERPLEXITY.labels(**labels, model=model_name, when=when).set(value)
    steps_run = step - (resumed_from or 0)
    manifest = stage_manifest(
        job,
        stage,
        runtime.world_size,
        resumedFromStep=resumed_from,
        metrics={
            **before,
            "studentPerplexityAfter": after,
            "finalLoss": losses[-1] if losses else None,
            "steps": step,
            "stoppedEarly": stopped_early,
            "bestStep": early.best_step if training.eval_every_steps else step,
            "tokens": step * tokens_per_step,
            "trainSeconds": round(train_seconds, 2),
            "tokensPerSecond": round(steps_run * tokens_per_step / train_seconds, 1) if train_seconds else None,
            "teacherParameters": parameter_count(teacher_model),
            "studentParameters": parameter_count(student),
            **stage_facts,
        },
    )
    if runtime.is_main:
        manifest["files"] = _save_student(student, tokenizer, store)
        write_json(store, MANIFEST, manifest)  # last: its presence marks the stage done
        store.delete_prefix(checkpoint.PREFIX)  # the student supersedes them
    runtime.barrier()
    return manifest


# ---------------------------------------------------------------- stages and jobs


def finished_manifest(job: DistillationJob | EvaluationJob, stage: Stage) -> dict[str, Any] | None:
    """The stage's manifest when it already finished for this spec; StageError when another spec's."""
    manifest = read_json_if_exists(open_store(stage.output_uri), MANIFEST)
    if manifest is None:
        return None
    if manifest.get("specHash") != spec_hash(job):
        raise StageError(
            f"{stage.output_uri} holds a finished stage of a different spec; change metadata.name or "
            "output.uri, or delete that folder to run again"
        )
    return manifest


def _model_references(job: DistillationJob | EvaluationJob) -> list[tuple[str, str]]:
    """(field, reference) of every model the job loads."""
    spec = job.spec
    if isinstance(job, EvaluationJob):
        return [(f"spec.{role}", ref) for role, ref in (("student", spec.student), ("teacher", spec.teacher)) if ref]
    references = [("spec.teacher.model", spec.teacher.model)]
    if spec.student is not None and spec.student.model is not None:
        references.append(("spec.student.model", spec.student.model))
    return references


def preflight(job: DistillationJob | EvaluationJob) -> None:
    """Check the local model references before anything loads; SpecError names the field."""
    if isinstance(job, EvaluationJob) and job.spec.student is None:
        raise SpecError(
            [
                (
                    "spec.distillationJob",
                    f"{job.spec.distillation_job!r} is a name in the cluster; here, pass its job file "
                    "(potential-meme evaluate EVAL.yaml --distillation-job JOB.yaml) or set spec.student",
                )
            ],
            job.metadata.name,
        )
    references = _model_references(job)
    problems = []
    for field, reference in references:
        if reference.startswith("s3://"):
            continue  # reached over the network when the stage starts
        try:
            resolve(reference)
        except (FileNotFoundError, ValueError) as exc:
            problems.append((field, str(exc)))
    if problems:
        raise SpecError(problems, job.metadata.name)


def run_stage(
    job: DistillationJob | EvaluationJob,
    stage: Stage,
    metrics_port: int | None = None,
    metrics_address: str = "127.0.0.1",
) -> dict[str, Any]:
    """Run one stage unless its manifest says it is done; returns the manifest."""
    preflight(job)
    done = finished_manifest(job, stage)
    if done is not None:
        log.info("stage %s of %s is done (manifest.json exists): skipped", stage.name, job.metadata.name)
        return done
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # carriage-return bars garble pod logs; ours logs lines instead
    precision = job.spec.precision if isinstance(job, EvaluationJob) else job.spec.training.precision
    runtime = start_runtime(precision)
    if metrics_port is not None and runtime.is_main:
        metrics.serve(metrics_port, metrics_address)
    metrics.stage_started(job.metadata.name, stage.name, stage.index)
    try:
        if stage.kind == "evaluate":
            return run_evaluation_stage(job, stage, runtime)
        return run_distill_stage(job, stage, runtime)  # distill and progressive stages share the loop
    finally:
        metrics.stage_finished(job.metadata.name, stage.name)
        if runtime.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_job(job: DistillationJob | EvaluationJob, metrics_port: int | None = None) -> list[dict[str, Any]]:
    """Every planned stage in order, in this process."""
    return [run_stage(job, stage, metrics_port) for stage in plan_stages(job)]


def find_stage(job: DistillationJob | EvaluationJob, name: str) -> Stage:
    stages = plan_stages(job)
    for stage in stages:
        if stage.name == name:
            return stage
    planned = ", ".join(stage.name for stage in stages)
    raise SpecError([("--stage", f"{name!r} is not in the plan; {job.metadata.name} has {planned}")], job.metadata.name)
