"""The step loop of a distill stage: which rows each process reads, one optimizer step, early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..spec.errors import SpecError
from ..spec.models import OnPolicySpec
from .data import epoch_order, shifted_labels
from .objective import HiddenStateTap, hidden_states
from .on_policy import pieces
from .runtime import Runtime
from .sharding import average_whole_gradients, gradient_sync, is_sharded, kept_copy
from .teacher_cache import CachedTeacher


class Batches:
    """Which rows each process reads at each step: a pure function of (step, rank), so resume replays it.

    A step takes `rows_per_step` rows of the epoch's permutation; micro-batch m of rank r reads
    the m * world_size + r-th slice of them, so N processes read exactly what one process with
    N times the batch (or N times the micro-batches) would.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        batch_size: int,
        accumulation: int,
        world_size: int,
        seed: int,
        labels: torch.Tensor | None = None,
    ):
        """`labels`: the next token of each position, where not every one is learned (a response, not its prompt)."""
        self.rows, self.batch_size, self.accumulation, self.seed = rows, batch_size, accumulation, seed
        self.labels = shifted_labels(rows) if labels is None else labels
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

    def step_batches(self, step: int, runtime: Runtime) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(input ids, labels, row indices) of each micro-batch this process runs at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.rows.shape[0], epoch, self.seed)
        first = position * self.rows_per_step
        batches = []
        for micro in range(self.accumulation):
            offset = first + (micro * self.world_size + runtime.rank) * self.batch_size
            chosen = order[offset : offset + self.batch_size]
            batches.append((self.rows[chosen].to(runtime.device), self.labels[chosen].to(runtime.device), chosen))
        return batches


@dataclass
class Teacher:
    model: nn.Module | None  # None: a cache stands in for it, or an API teacher wrote the text
    tap: HiddenStateTap | None  # layerwise: the teacher states the student matches
    cache: CachedTeacher | None = None  # its targets, read instead of running it

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        with torch.inference_mode():
            hidden = hidden_states(self.model, batch)
            states = self.tap.take() if self.tap else {}
        # Clones leave inference mode, so autograd may save them for backward.
        return hidden.clone(), {index: state.clone() for index, state in states.items()}


def accumulate_gradients(
    model,
    teacher: Teacher,
    teacher_weight,
    batches,
    runtime: Runtime,
    on_policy: OnPolicySpec | None = None,
    student: nn.Module | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Forward and backward every micro-batch of one step; returns its mean losses over processes.
    `on_policy`: a share of each micro-batch is rewritten by `student` first (seeded by `seed` and the micro-batch)."""
    totals = [0.0, 0.0, 0.0, 0.0]
    for micro, (batch, labels, rows) in enumerate(batches):
        parts = pieces(batch, labels, on_policy, student, seed * 1_000 + micro)
        targets = teacher.cache.targets(rows) if teacher.cache is not None else None  # no on-policy: one piece
        for number, piece in enumerate(parts):
            last = micro == len(batches) - 1 and number == len(parts) - 1
            with gradient_sync(model, runtime, last), runtime.autocast():
                teacher_hidden, teacher_states = (
                    teacher.forward(piece.input_ids) if teacher_weight is not None else (None, None)
                )
                loss, *components = model(
                    piece.input_ids, piece.labels, teacher_hidden, teacher_weight, teacher_states, piece.alpha, targets
                )
                (loss * piece.share / len(batches)).backward()
            for index, value in enumerate((loss.detach(), *components)):
                totals[index] += float(value) * piece.share / len(batches)
    if is_sharded(model):
        average_whole_gradients(model, runtime)
    means = [value / runtime.world_size for value in runtime.all_sum(totals)]
    return dict(zip(("total", "ce", "kd", "layers"), means, strict=True))


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
            self.best_state = kept_copy(student)
        else:
            self.misses += 1
        return self.patience is not None and self.misses >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "best_state": self.best_state, "misses": self.misses}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_state, self.misses = state["best_state"], state["misses"]
