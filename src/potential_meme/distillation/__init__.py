"""The seed API: thin faces that build a DistillationJob spec and hand it to the engine."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from ..spec import DistillationJob, SpecError, parse_job
from ..spec.models import KnowledgeMethod
from ..storage import open_store, sync_down, sync_up


def _camel(fields: dict[str, Any]) -> dict[str, Any]:
    """Python keyword names to the spec's YAML names, so errors name the field as the CRD does."""
    return {to_camel(key): value for key, value in fields.items()}


def _student_spec(student_model: str | int | dict) -> dict[str, Any]:
    """A reference string loads a model; an int keeps that many of the teacher's layers."""
    if isinstance(student_model, bool):
        raise SpecError([("student_model", "expected a model reference or a number of teacher layers")], "student")
    if isinstance(student_model, int):
        return {"fromTeacher": {"numLayers": student_model}}
    if isinstance(student_model, dict):
        return student_model
    return {"model": student_model}


class _Distiller:
    """Shared plumbing: build the job, run it through the engine, copy the student out."""

    def __init__(self, output_uri: str, job_name: str | None):
        self.output_uri = output_uri
        self.job_name = job_name
        self.job: DistillationJob | None = None
        self.results: list[dict[str, Any]] = []

    def _job(self, spec: dict[str, Any], prefix: str) -> DistillationJob:
        spec = {**spec, "output": {"uri": self.output_uri}}
        # Same spec, same name: a rerun resumes or skips instead of starting over.
        name = self.job_name or f"{prefix}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]}"
        document = {"apiVersion": "distill.potential-meme.io/v1alpha1", "kind": "DistillationJob",
                    "metadata": {"name": name}, "spec": spec}
        return parse_job(document, source=name)  # type: ignore[return-value]  # kind is DistillationJob

    def _run(self, job: DistillationJob, metrics_port: int | None) -> dict[str, Any]:
        from ..engine.trainer import run_job

        self.job = job
        self.results = run_job(job, metrics_port=metrics_port)
        return self.results[-1]["metrics"]

    def save_student(self, path: str | Path) -> str:
        """Copy the distilled student (a Hugging Face folder) to a local path or an s3:// URI."""
        if self.job is None:
            raise RuntimeError("nothing distilled yet: call distill() first")
        from ..engine.trainer import student_uri

        source = open_store(student_uri(self.job))
        destination = str(path)
        if destination.startswith("s3://"):
            with tempfile.TemporaryDirectory(prefix="potential-meme-copy-") as tmp:
                sync_up(open_store(destination), sync_down(source, "", Path(tmp)), "")
        else:
            sync_down(source, "", Path(destination))
        return destination


class KnowledgeDistiller(_Distiller):
    """Logit distillation: the student learns the teacher's softened next-token distribution.

    alpha weighs hard labels against soft labels (1: corpus tokens only, 0: teacher only).
    `student_model` is a model reference, or an int: keep that many of the teacher's layers.
    """

    def __init__(
        self,
        teacher_model: str,
        student_model: str | int | dict,
        temperature: float = 2.0,
        alpha: float = 0.5,
        *,
        divergence: str = "forwardKL",
        beta: float = 0.5,
        output_uri: str = "file://./runs",
        job_name: str | None = None,
    ):
        super().__init__(output_uri, job_name)
        try:
            self.method = KnowledgeMethod(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta)
        except ValidationError as exc:
            raise SpecError.from_validation(KnowledgeMethod, exc, "KnowledgeDistiller") from None
        self.teacher_model = teacher_model
        self.student = _student_spec(student_model)

    def distill(
        self,
        dataset: str,
        batch_size: int = 8,
        epochs: int = 1,
        learning_rate: float = 5e-5,
        *,
        metrics_port: int | None = None,
        **training: Any,
    ) -> dict[str, Any]:
        """Run the distillation; returns the final metrics (perplexities, loss, tokens/s).

        Extra keyword arguments are training fields in snake_case (max_steps, max_seq_length, ...).
        """
        spec = {
            "teacher": {"model": self.teacher_model},
            "student": self.student,
            "dataset": {"source": dataset},
            "method": {"knowledge": self.method.to_yaml_dict()},
            "training": _camel(
                {"batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate, **training}
            ),
        }
        return self._run(self._job(spec, "kd"), metrics_port)


__all__ = ["KnowledgeDistiller"]
