"""A stage's published results: its student, and its manifest, written last to mark the stage done."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..spec.errors import StageError
from ..spec.models import DistillationJob, EvaluationJob
from ..spec.plan import MANIFEST, STUDENT_DIR, Stage, measurement_key, spec_hash
from ..storage import ArtifactStore, open_store, publish_folder, read_json_if_exists, write_json


def finished_manifest(job: DistillationJob | EvaluationJob, stage: Stage) -> dict[str, Any] | None:
    """The stage's manifest when it already finished for this spec; StageError when another spec's, except an
    evaluation that measured the same way and chose other pieces: that one runs again, keeping its measurements."""
    manifest = read_json_if_exists(open_store(stage.output_uri), MANIFEST)
    if manifest is None:
        return None
    if manifest.get("specHash") != spec_hash(job):
        if isinstance(job, EvaluationJob) and manifest.get("measurementKey") == measurement_key(job):
            return None
        raise StageError(
            f"{stage.output_uri} holds a finished stage of a different spec; change metadata.name or "
            "output.uri, or delete that folder to run again"
        )
    return manifest


def _save_student(
    student: nn.Module, tokenizer, store: ArtifactStore, state: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Upload the student as a Hugging Face folder; returns each file's path, size and sha256, which
    every later reader checks (models.verify_student). `state`: its weights, where the module holds shards."""
    with tempfile.TemporaryDirectory(prefix="potential-meme-student-") as tmp:
        student.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        return publish_folder(store, Path(tmp), STUDENT_DIR)


def publish(
    store: ArtifactStore,
    student: nn.Module,
    tokenizer,
    manifest: dict[str, Any],
    leftovers: str,
    files: list[dict[str, Any]] = (),
    state: dict[str, Any] | None = None,
) -> None:
    """The student, then the manifest (its presence marks the stage done), then drop `leftovers`
    (the checkpoints the student supersedes). `files`: what the stage uploaded besides, listed in the manifest.
    `state`: the student's whole weights, where `student` holds only this process's shards."""
    manifest["files"] = [*files, *_save_student(student, tokenizer, store, state)]
    write_json(store, MANIFEST, manifest)
    store.delete_prefix(leftovers)
