"""Resumable checkpoints in the artifact store.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding `student.pt`, `training_state.pt` and, written
last, `COMPLETE`: the size and sha256 of each file. A crash while writing leaves no marker, so resume
ignores that folder; a file changed or cut short afterwards fails its digest, and resume falls back
to the checkpoint before. Both files hold tensors and plain values only and are loaded with
`weights_only=True`: whoever can write to the store can spoil a checkpoint, never run code with it.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..storage import ArtifactStore, file_sha256, sync_down, sync_up

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"
MARKER = "COMPLETE"
FILES = ("student.pt", "training_state.pt")
_STEP = re.compile(r"^checkpoints/step-(\d+)/")


class UnusableCheckpoint(Exception):
    """A checkpoint that is incomplete, altered, or not made of tensors and plain values."""


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values (no pickled objects)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _steps_present(store: ArtifactStore) -> tuple[list[int], list[int]]:
    """(steps with a completion marker, every step with any file), each sorted."""
    complete, present = set(), set()
    for key in store.list(PREFIX):
        match = _STEP.match(key)
        if match:
            present.add(int(match.group(1)))
            if key.endswith("/" + MARKER):
                complete.add(int(match.group(1)))
    return sorted(complete), sorted(present)


def complete_steps(store: ArtifactStore) -> list[int]:
    return _steps_present(store)[0]


def _folder(step: int) -> str:
    return f"{PREFIX}step-{step:08d}/"


def save(store: ArtifactStore, step: int, student_state: dict, training_state: dict, keep: int) -> None:
    folder = _folder(step)
    with tempfile.TemporaryDirectory(prefix="potential-meme-ckpt-") as tmp:
        files = {}
        for name, state in zip(FILES, (student_state, training_state), strict=True):
            path = Path(tmp) / name
            torch.save(state, path)
            files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        sync_up(store, Path(tmp), folder)
    store.write_bytes(folder + MARKER, json.dumps({"step": step, "files": files}).encode())
    complete, present = _steps_present(store)
    kept = set(complete[-keep:])
    for old in present:
        if old not in kept and old < step:  # older ones, and folders a crash left without a marker
            store.delete_prefix(_folder(old) + MARKER)  # first: a half-deleted folder is never taken as whole
            store.delete_prefix(_folder(old))


@dataclass(frozen=True)
class Restored:
    step: int
    student_state: dict[str, Any]
    training_state: dict[str, Any]


def _load(store: ArtifactStore, step: int) -> Restored:
    folder = _folder(step)
    try:
        expected = json.loads(store.read_bytes(folder + MARKER))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnusableCheckpoint(f"its {MARKER} marker lists no file digests ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="potential-meme-ckpt-") as tmp:
        try:
            sync_down(store, folder, Path(tmp))
        except ValueError as exc:  # a planted key that leads outside the folder
            raise UnusableCheckpoint(str(exc)) from None
        states = []
        for name in FILES:
            path = Path(tmp) / name
            if name not in expected or not path.is_file():
                raise UnusableCheckpoint(f"{name} is missing")
            size, digest = path.stat().st_size, file_sha256(path)
            if (size, digest) != (expected[name].get("bytes"), expected[name].get("sha256")):
                raise UnusableCheckpoint(
                    f"{name} is {size} bytes with sha256 {digest[:12]}, its marker says "
                    f"{expected[name].get('bytes')} bytes with sha256 {str(expected[name].get('sha256'))[:12]}"
                )
            try:
                states.append(torch.load(path, map_location="cpu", weights_only=True))
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
                raise UnusableCheckpoint(f"{name} is not tensors and plain values, refused: {exc}") from None
    return Restored(step, *states)


def load_newest(store: ArtifactStore) -> Restored | None:
    """The newest checkpoint that is whole and verified; an older one, with a warning, when it is not."""
    steps = complete_steps(store)
    for step in reversed(steps):
        try:
            return _load(store, step)
        except UnusableCheckpoint as exc:
            log.warning("checkpoint %s%s is unusable: %s; trying the one before", store.uri, _folder(step), exc)
    if steps:
        log.warning("no usable checkpoint in %s%s: starting from step 0", store.uri, PREFIX)
    return None
