"""Resume: what a checkpoint holds, putting it back in any number of processes, and stopping on SIGTERM.

A run is preempted, suspended, rescheduled and resized. A checkpoint records the step and how many
processes and micro-batches made it, so a resumed run with another world size keeps the global batch,
data order and schedule it implies. SIGTERM (a node drain, preemption, `suspend: true`) lets the
current step finish, writes a checkpoint and exits: at most one step is lost.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from ..spec.errors import Preempted, StageError
from ..spec.models import DistillationJob
from ..spec.plan import spec_hash
from ..storage import ArtifactStore
from . import checkpoint
from .loop import EarlyStopping
from .runtime import Runtime
from .sharding import (
    full_optimizer_state,
    is_sharded,
    load_full_optimizer_state,
    load_shards,
    load_trained_state,
    save_shards,
    trained_state,
)
from .stage_setup import StageSetup

log = logging.getLogger(__name__)


def accumulation_for(job: DistillationJob, restored: checkpoint.Restored | None, world_size: int) -> int:
    """Micro-batches per process and step: the spec's, or, resuming with another number of processes,
    as many as keep the checkpoint's global batch (rows per step). Refused when none can."""
    training = job.spec.training
    if restored is None:
        return training.gradient_accumulation_steps
    state = restored.training_state
    written_by, accumulation = state["world_size"], state["accumulation"]
    if written_by == world_size:
        return accumulation
    micro_batches = written_by * accumulation  # of batchSize rows, over all processes, per step
    if micro_batches % world_size:
        fitting = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
        raise StageError(
            f"the checkpoint at step {restored.step} was made by {written_by} process(es) taking {micro_batches} "
            f"micro-batches of {training.batch_size} per step; {world_size} processes cannot split that evenly: "
            f"resume with {', '.join(map(str, fitting))} processes (resources.nodes x gpusPerNode), or delete the "
            "stage's checkpoints/ to start over with this size"
        )
    log.info(
        "checkpoint made by %d process(es) x %d micro-batch(es); resuming on %d process(es) x %d to keep "
        "its global batch of %d sequences per step",
        written_by,
        accumulation,
        world_size,
        micro_batches // world_size,
        micro_batches * training.batch_size,
    )
    return micro_batches // world_size


def training_state(
    job: DistillationJob,
    setup: StageSetup,
    step: int,
    before: dict[str, float],
    early_stopping: dict[str, Any],
    optimizer: dict[str, Any],
) -> dict[str, Any]:
    return {
        "optimizer": optimizer,
        "scheduler": setup.scheduler.state_dict(),
        "rng": checkpoint.rng_state(),
        "step": step,
        "world_size": setup.runtime.world_size,
        "accumulation": setup.batches.accumulation,
        "spec_hash": spec_hash(job),
        "before": before,
        "facts": setup.facts,
        "early_stopping": early_stopping,
    }


def restore(
    job: DistillationJob, setup: StageSetup, restored: checkpoint.Restored, early: EarlyStopping, where: str
) -> dict[str, float]:
    """Put a checkpoint back into the setup; returns the perplexities measured before training."""
    state = restored.training_state
    if state["spec_hash"] != spec_hash(job):
        raise StageError(
            f"{where} holds checkpoints of a different spec; change metadata.name or "
            "output.uri, or delete that folder to start over"
        )
    early.restore(state["early_stopping"])
    if restored.shards is not None:
        best_of = setup.student if state["early_stopping"].get("best_in_shards") else None
        groups = state["optimizer"]["param_groups"]
        best = load_shards(setup.objective, setup.optimizer, restored.shards_folder, groups, best_of)
        restored.shards.cleanup()  # a large student's files need not stay on disk while it trains
        if best is not None:
            early.best_state = best
    else:
        load_trained_state(setup.objective, restored.student_state)
        load_full_optimizer_state(setup.objective, setup.optimizer, state["optimizer"])
    setup.scheduler.load_state_dict(_fitted(state["scheduler"], len(setup.optimizer.param_groups)))
    checkpoint.restore_rng(state["rng"])
    return state["before"]


def _fitted(scheduler: dict[str, Any], groups: int) -> dict[str, Any]:
    """A scheduler's state for `groups` parameter groups: another strategy groups the same parameters otherwise
    (`sharding.parameter_groups`), and every group follows one schedule, so each list's first entry serves all."""
    written_for = len(scheduler["base_lrs"])
    if written_for == groups:
        return scheduler
    return {k: [v[0]] * groups if isinstance(v, list) and len(v) == written_for else v for k, v in scheduler.items()}


def save(
    job: DistillationJob,
    setup: StageSetup,
    store: ArtifactStore,
    step: int,
    before: dict[str, float],
    early: EarlyStopping,
) -> None:
    """Rank 0 writes the checkpoint; every process waits for it (within checkpoint.uploadTimeoutMinutes).
    A sharded student is not gathered: every process uploads its own shards first."""
    runtime, shards, early_stopping = setup.runtime, None, early.state()
    if is_sharded(setup.objective):
        # The best student so far is this process's shards of it, written with the others.
        best = None if early.best_state is None else (setup.student, early.best_state)
        with tempfile.TemporaryDirectory(prefix="potential-meme-shards-") as local:
            groups = save_shards(setup.objective, setup.optimizer, Path(local) / checkpoint.STUDENT_SHARDS, best)
            uploaded = checkpoint.upload(store, step, Path(local))
        shards = {name: facts for files in runtime.gather(uploaded) for name, facts in files.items()}
        student, optimizer = None, {"param_groups": groups}
        early_stopping |= {"best_state": None, "best_in_shards": best is not None}
    else:
        student = trained_state(setup.objective)
        optimizer = full_optimizer_state(setup.objective, setup.optimizer)
    if runtime.is_main:
        state = training_state(job, setup, step, before, early_stopping, optimizer)
        checkpoint.save(store, step, student, state, keep=job.spec.checkpoint.keep, shards=shards)
        log.info("checkpoint written at step %d", step)
    runtime.barrier()


class Preemption:
    """While active, SIGTERM is a request to stop after the current step instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        # Only a flag: the handler runs between any two bytecodes of the main thread, possibly in the
        # middle of a log line to stderr, where logging again raises and the request would be lost.
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, runtime: Runtime) -> bool:
        """Whether any process was asked to stop: all stop at the same step, or the others would hang."""
        if runtime.world_size == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, step: int) -> Preempted:
        return Preempted(f"stopped by SIGTERM after step {step}, checkpoint written: run it again to resume there")
