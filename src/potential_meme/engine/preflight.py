"""Refuse early: everything that can be checked before any weights load, reported as the field to fix.

Checks read the models' configs and tokenizers only (kilobytes), so a job that cannot run fails in
seconds with exit code 2 instead of after the teacher has been loaded onto a GPU.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..spec.errors import SpecError
from ..spec.models import DistillationJob, EvaluationJob, LayerwiseMethod
from ..spec.plan import Stage, StageKind, model_references
from ..storage import ArtifactStore, LocalStore
from .models import ResolvedModel, load_config, load_tokenizer, resolve

log = logging.getLogger(__name__)

Problems = list[tuple[str, str]]


def check_references(job: DistillationJob | EvaluationJob) -> None:
    """Local model references exist; an evaluation knows its student."""
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
    problems = []
    for field, reference in model_references(job):
        if reference.startswith("s3://"):
            continue  # reached over the network when the stage starts
        try:
            resolve(reference)
        except (FileNotFoundError, ValueError) as exc:
            problems.append((field, str(exc)))
    if problems:
        raise SpecError(problems, job.metadata.name)


@dataclass(frozen=True)
class Shape:
    """What a model's config says about it, without its weights."""

    config: PretrainedConfig

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def context(self) -> int | None:
        """The longest sequence its positions cover."""
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def vocabulary_rows(self) -> int:
        return self.config.vocab_size

    @cached_property
    def parameters(self) -> int:
        """Counted on the meta device (no memory, no initialisation); only progressive jobs ask."""
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(self.config).parameters())


def shape_of(resolved: ResolvedModel) -> Shape:
    return Shape(load_config(resolved))


def layer_index_problems(method: LayerwiseMethod, teacher_layers: int, student_layers: int) -> Problems:
    problems = []
    for field, indices, depth in (
        ("teacherLayers", method.teacher_layers, teacher_layers),
        ("studentLayers", method.student_layers, student_layers),
    ):
        beyond = [i for i in indices if i > depth]
        if beyond:
            problems.append(
                (
                    f"spec.method.layerwise.{field}",
                    f"{beyond} beyond the model's {depth} decoder layers; use 0 (embeddings) to {depth}",
                )
            )
    return problems


def _context_problems(field: str, length: int, shapes: dict[str, Shape]) -> Problems:
    return [
        (field, f"{length} tokens is more than the {role}'s context of {shape.context}; use at most {shape.context}")
        for role, shape in shapes.items()
        if shape.context is not None and length > shape.context
    ]


@dataclass(frozen=True)
class Vocabulary:
    """How teacher and student logits line up: the KD loss compares them row by row."""

    tokens: int  # the shared tokenizer's size
    teacher_rows: int
    student_rows: int


def shared_vocabulary(
    job: DistillationJob, teacher: ResolvedModel, student: ResolvedModel, shapes: dict[str, Shape]
) -> Vocabulary:
    """Teacher and student must share a tokenizer; their embedding matrices may be padded differently
    (Qwen2.5 sizes: 151,936 and 152,064 rows for 151,665 tokens), which the loss aligns."""
    teacher_tokenizer, student_tokenizer = load_tokenizer(teacher), load_tokenizer(student)
    teacher_vocabulary, student_vocabulary = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocabulary != student_vocabulary:
        differing = sorted(set(teacher_vocabulary.items()) ^ set(student_vocabulary.items()), key=lambda item: item[1])
        raise SpecError(
            [
                (
                    "spec.student.model",
                    f"{job.spec.student.model} and the teacher {job.spec.teacher.model} have different tokenizers "
                    f"({len(student_vocabulary):,} and {len(teacher_vocabulary):,} tokens; first difference: "
                    f"{differing[0]!r}); logit distillation compares their outputs token by token, so it needs one "
                    "tokenizer: pick a student of the teacher's family, or student.fromTeacher",
                )
            ],
            job.metadata.name,
        )
    return Vocabulary(len(teacher_tokenizer), shapes["teacher"].vocabulary_rows, shapes["student"].vocabulary_rows)


@dataclass(frozen=True)
class CheckedModels:
    """The job's models as the checks resolved them: the stage loads these (an s3:// model is copied once)."""

    teacher: ResolvedModel | None  # None: a teacher behind an API
    student: ResolvedModel | None  # a student model of its own; None when derived from the teacher
    vocabulary: Vocabulary | None  # how the two line up, for a student of its own


def check_distillation(job: DistillationJob, stage: Stage) -> CheckedModels:
    """Every field that the models' configs can refute."""
    spec = job.spec
    if spec.teacher.endpoint is not None:
        return _check_with_api_teacher(job, stage)
    teacher_ref = resolve(spec.teacher.model)
    teacher = shape_of(teacher_ref)
    shapes, problems = {"teacher": teacher}, []
    student_layers = teacher.layers
    vocabulary, student_ref = None, None
    if spec.student is not None and spec.student.from_teacher is not None:
        student_layers = spec.student.from_teacher.num_layers
        if student_layers > teacher.layers:
            problems.append(
                (
                    "spec.student.fromTeacher.numLayers",
                    f"{student_layers} is more than the teacher's {teacher.layers} decoder layers; "
                    f"choose 1 to {teacher.layers}",
                )
            )
    elif spec.student is not None and spec.student.model is not None and stage.kind is StageKind.DISTILL:
        student_ref = resolve(spec.student.model)
        shapes["student"] = student = shape_of(student_ref)
        student_layers = student.layers
        vocabulary = shared_vocabulary(job, teacher_ref, student_ref, shapes)
        if min(vocabulary.teacher_rows, vocabulary.student_rows) < vocabulary.tokens:
            problems.append(
                (
                    "spec.student.model",
                    f"the tokenizer has {vocabulary.tokens:,} tokens but the teacher's output has "
                    f"{vocabulary.teacher_rows:,} rows and the student's {vocabulary.student_rows:,}: "
                    "a model that cannot emit every token cannot be distilled into or from",
                )
            )
    if spec.method.layerwise is not None:
        problems += layer_index_problems(spec.method.layerwise, teacher.layers, student_layers)
    progressive = spec.method.progressive
    if progressive is not None and stage.index == 0:
        sizes = [*progressive.intermediate_sizes, progressive.final_size]
        problems += [
            (
                f"spec.method.progressive.{'finalSize' if index == len(sizes) - 1 else f'intermediateSizes.{index}'}",
                f"{size:,} parameters is not smaller than the teacher's {teacher.parameters:,}; "
                "each size must be below the model before it",
            )
            for index, size in enumerate(sizes)
            if size >= teacher.parameters
        ]
    if stage.kind is StageKind.QUANTIZE:
        from .quantize import check_bitsandbytes
        from .runtime import default_device

        check_bitsandbytes(job.metadata.name, default_device())
    if stage.kind is StageKind.GENERATE:  # the answer and its prompt must fit; training rows come later
        length = spec.method.response.generation.max_new_tokens
        problems += _context_problems("spec.method.response.generation.maxNewTokens", length, shapes)
    else:
        problems += _context_problems("spec.training.maxSeqLength", spec.training.max_seq_length, shapes)
    if problems:
        raise SpecError(problems, job.metadata.name)
    return CheckedModels(teacher_ref, student_ref, vocabulary)


def _check_with_api_teacher(job: DistillationJob, stage: Stage) -> CheckedModels:
    """A teacher behind an API has no config to check: the student alone, where a stage trains it."""
    if stage.kind is StageKind.GENERATE:
        return CheckedModels(None, None, None)
    student_ref = resolve(job.spec.student.model)
    length = job.spec.training.max_seq_length
    problems = _context_problems("spec.training.maxSeqLength", length, {"student": shape_of(student_ref)})
    if problems:
        raise SpecError(problems, job.metadata.name)
    return CheckedModels(None, student_ref, None)


def check_evaluation(job: EvaluationJob) -> dict[str, ResolvedModel]:
    """`maxSeqLength` against each model's context (it is perplexity's); returns the models resolved, by role."""
    resolved = {field.split(".")[-1]: resolve(reference) for field, reference in model_references(job)}
    if "perplexity" not in job.spec.benchmarks:
        return resolved
    shapes = {role: shape_of(model) for role, model in resolved.items()}
    problems = _context_problems("spec.maxSeqLength", job.spec.max_seq_length, shapes)
    if problems:
        raise SpecError(problems, job.metadata.name)
    return resolved


def check_writable(store: ArtifactStore, job_name: str) -> None:
    """Write and delete a probe where the stage will publish, so a read-only or missing bucket fails now,
    not after hours of training. Refusals (no such bucket, access denied) are the spec's to fix; other
    failures (the store is down) propagate as crashes worth a retry."""
    if isinstance(store, LocalStore):  # no probe: it would leave the folders it made behind
        existing = next(folder for folder in (store.root, *store.root.parents) if folder.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise SpecError(
                [("spec.output.uri", f"cannot write to {store.uri}: {existing} is not a folder this user can write")],
                job_name,
            )
        return
    probe = f".write-check-{uuid.uuid4().hex}"
    try:
        store.write_bytes(probe, b"")
        store.delete_prefix(probe)
    except Exception as exc:  # noqa: BLE001 - classified below; the rest is re-raised
        if not _is_refusal(exc):
            raise
        raise SpecError(
            [
                (
                    "spec.output.uri",
                    f"cannot write to {store.uri}: {type(exc).__name__}: {exc}; fix it or its access",
                )
            ],
            job_name,
        ) from None


def _is_refusal(exc: Exception) -> bool:
    if isinstance(exc, (PermissionError, NotADirectoryError, FileExistsError)):
        return True
    response: Any = getattr(exc, "response", None)
    code = (response or {}).get("Error", {}).get("Code", "") if isinstance(response, dict) else ""
    return code in ("AccessDenied", "NoSuchBucket", "AllAccessDisabled", "InvalidBucketName", "403")
