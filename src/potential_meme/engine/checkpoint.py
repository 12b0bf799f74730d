"""Resumable checkpoints in the artifact store.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding `student.pt`, `training_state.pt` and, written
last, `COMPLETE`. A crash while writing leaves no COMPLETE marker, so resume ignores that folder.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..storage import ArtifactStore, sync_down, sync_up

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^checkpoints/step-(\d+)/COMPLETE$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_steps(store: ArtifactStore) -> list[int]:
    steps = []
    for key in store.list(PREFIX):
        match = _STEP_DIR.match(key)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _folder(step: int) -> str:
    return f"{PREFIX}step-{step:08d}/"


def save(store: ArtifactStore, step: int, student_state: dict, training_state: dict, keep: int) -> None:
    with tempfile.TemporaryDirectory(prefix="potential-meme-ckpt-") as tmp:
        torch.save(student_state, Path(tmp) / "student.pt")
        torch.save(training_state, Path(tmp) / "training_state.pt")
        sync_up(store, Path(tmp), _folder(step))
    store.write_bytes(_folder(step) + MARKER, json.dumps({"step": step}).encode())
    for old in complete_steps(store)[:-keep]:
        store.delete_prefix(_folder(old))


def load_newest(store: ArtifactStore) -> tuple[int, dict, dict] | None:
    """(step, student state, training state) of the newest complete checkpoint, or None."""
    steps = complete_steps(store)
    if not steps:
        return None
    step = steps[-1]
    with tempfile.TemporaryDirectory(prefix="potential-meme-ckpt-") as tmp:
        sync_down(store, _folder(step), Path(tmp))
        student_state = torch.load(Path(tmp) / "student.pt", map_location="cpu", weights_only=True)
        training_state = torch.load(Path(tmp) / "training_state.pt", map_location="cpu", weights_only=False)
    return step, student_state, training_state
