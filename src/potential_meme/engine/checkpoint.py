"""Resumable checkpoints in the artifact store.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding `training_state.pt`, the student and, written
last, `COMPLETE`: the size and sha256 of each file. The student is `student.pt`, or, sharded, `student/`:
one safetensors file a process from torch.distributed.checkpoint, whose headers say where each piece of
each tensor belongs, so any number of processes reads it back, each taking its own share. A crash while
writing leaves no marker, so resume ignores that folder; a file changed or cut short afterwards fails its
digest, and resume falls back to the checkpoint before; a file the marker does not list is never read.
Nothing is unpickled but with `weights_only=True`: whoever can write to the store can spoil a checkpoint,
never run code with it.
"""

from __future__ import annotations

import contextlib
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

from ..storage import ArtifactStore, file_sha256, publish_folder, sync_down

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"
MARKER = "COMPLETE"
WHOLE_STUDENT = "student.pt"
TRAINING_STATE = "training_state.pt"
STUDENT_SHARDS = "student/"
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


def upload(store: ArtifactStore, step: int, local_dir: Path) -> dict[str, dict[str, Any]]:
    """Every file under `local_dir` into the checkpoint of `step`: their sizes and digests, by name in it."""
    folder = _folder(step)
    return {
        entry["path"].removeprefix(folder): {"bytes": entry["bytes"], "sha256": entry["sha256"]}
        for entry in publish_folder(store, local_dir, folder)
    }


def save(
    store: ArtifactStore,
    step: int,
    student_state: dict | None,
    training_state: dict,
    keep: int,
    shards: dict[str, dict[str, Any]] | None = None,
) -> None:
    """`student_state` None: a sharded student, whose files every process has uploaded (`shards`, from `upload`)."""
    folder = _folder(step)
    with tempfile.TemporaryDirectory(prefix="potential-meme-ckpt-") as tmp:
        if student_state is not None:
            torch.save(student_state, Path(tmp) / WHOLE_STUDENT)
        torch.save(training_state, Path(tmp) / TRAINING_STATE)
        files = upload(store, step, Path(tmp)) | (shards or {})
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
    student_state: dict[str, Any] | None  # None: a sharded student, in `shards`
    training_state: dict[str, Any]
    shards: tempfile.TemporaryDirectory | None = None  # its files, downloaded and checked; removed with this

    @property
    def shards_folder(self) -> Path:
        return Path(self.shards.name) / STUDENT_SHARDS


def _verified(local_dir: Path, expected: dict[str, Any]) -> None:
    """Every file the marker lists is there with its size and digest. Files it does not list are removed: shards
    a crashed attempt at the same step left (by more processes than wrote the marker), or planted ones."""
    present = {path.relative_to(local_dir).as_posix() for path in local_dir.rglob("*") if path.is_file()}
    for unlisted in present - set(expected):
        (local_dir / unlisted).unlink()
    has_student = WHOLE_STUDENT in expected or any(name.startswith(STUDENT_SHARDS) for name in expected)
    if TRAINING_STATE not in expected or not has_student:
        raise UnusableCheckpoint(f"its {MARKER} marker lists no {TRAINING_STATE} or no student")
    for name, facts in expected.items():
        path = local_dir / name
        if name not in present:
            raise UnusableCheckpoint(f"{name} is missing")
        size, digest = path.stat().st_size, file_sha256(path)
        if (size, digest) != (facts.get("bytes"), facts.get("sha256")):
            raise UnusableCheckpoint(
                f"{name} is {size} bytes with sha256 {digest[:12]}, its marker says "
                f"{facts.get('bytes')} bytes with sha256 {str(facts.get('sha256'))[:12]}"
            )


def _unpickled(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UnusableCheckpoint(f"{path.name} is not tensors and plain values, refused: {exc}") from None


def _load(store: ArtifactStore, step: int) -> Restored:
    folder = _folder(step)
    try:
        expected = dict(json.loads(store.read_bytes(folder + MARKER))["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UnusableCheckpoint(f"its {MARKER} marker lists no file digests ({exc})") from None
    downloaded = tempfile.TemporaryDirectory(prefix="potential-meme-ckpt-")
    local = Path(downloaded.name)
    with contextlib.ExitStack() as until_read:
        until_read.callback(downloaded.cleanup)
        try:
            sync_down(store, folder, local)
        except ValueError as exc:  # a planted key that leads outside the folder
            raise UnusableCheckpoint(str(exc)) from None
        _verified(local, expected)
        training_state = _unpickled(local / TRAINING_STATE)
        if WHOLE_STUDENT in expected:
            return Restored(step, _unpickled(local / WHOLE_STUDENT), training_state)
        until_read.pop_all()  # the shards stay until the restored checkpoint is dropped
        return Restored(step, None, training_state, shards=downloaded)


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
