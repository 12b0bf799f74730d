"""Planning: a pure function from a job to the ordered stages that run it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from .models import DistillationJob, EvaluationJob, format_parameter_count

MANIFEST = "manifest.json"  # written last by a stage: its presence means the stage is done
STUDENT_DIR = "student/"  # the stage's student, a Hugging Face folder
ADAPTERS_DIR = "adapters/"  # a quantize stage's LoRA adapters (peft), over the quantized distill student
RESULTS = "results.json"  # an evaluation's results, next to its manifest
RESPONSES = "responses.jsonl"  # a generate stage's teacher answers, one record a prompt
AUGMENTED = "augmented.jsonl"  # an augment stage's kept variants, one record each
PLOT, REPORT = "comparison.png", "report.pdf"  # and the two views of them


class StageKind(StrEnum):
    """What the engine does in a stage."""

    DISTILL = "distill"  # knowledge or layerwise: one student from the teacher (or a given student)
    PROGRESSIVE = "progressive"  # prune the previous stage's model to a size, then distill from it
    EVALUATE = "evaluate"  # held-out perplexity of a student and its teacher
    GENERATE = "generate"  # the teacher answers the dataset's prompts; a later stage learns the answers
    AUGMENT = "augment"  # the teacher rewrites training passages; a later stage distills on them too
    QUANTIZE = "quantize"  # quantize the previous stage's student; with QAT, train LoRA adapters over it by KD
    EXPORT = "export"  # the previous stage's student as mobile formats, each run in its runtime and checked
    CACHE_TEACHER = "cache-teacher"  # the teacher's top-k log-probabilities over the corpus, for KD without it


@dataclass(frozen=True)
class Stage:
    """One unit of work: a PyTorchJob in the cluster, a step of `potential-meme run` locally."""

    index: int  # 0-based position in the plan
    name: str  # deterministic, DNS-label safe: it becomes part of the PyTorchJob name
    kind: StageKind
    output_uri: str  # <output>/<job>/<stage>/
    inputs: tuple[str, ...] = ()  # names of earlier stages whose artifacts this one reads
    target_parameters: int | None = None  # progressive: the size this stage prunes to


def model_references(job: DistillationJob | EvaluationJob) -> list[tuple[str, str]]:
    """(field, reference) of every model the job loads."""
    spec = job.spec
    if isinstance(job, EvaluationJob):
        return [(f"spec.{role}", ref) for role, ref in (("student", spec.student), ("teacher", spec.teacher)) if ref]
    references = [] if spec.teacher.endpoint else [("spec.teacher.model", spec.teacher.model)]
    if spec.student is not None and spec.student.model is not None:
        references.append(("spec.student.model", spec.student.model))
    return references


def spec_hash(job: DistillationJob | EvaluationJob) -> str:
    """Hash of what determines a stage's result; placement, retries and suspension do not."""
    placement = {
        "suspend": True,
        "resources": True,
        "run_policy": True,
        "output": {"credentials_secret", "endpoint"},
        "checkpoint": {"upload_timeout_minutes"},
        # ddp and fsdp train the same weights, compiled layers compute what eager ones do: a run resumes under either
        "training": {"strategy", "compile"},
    }
    # Fields added after hashes were first published (models.added_later) drop out at their default: a new field
    # must not turn every finished stage, and every running job's accepted spec, into "a different spec".
    relevant = job.spec.model_dump(mode="json", exclude=placement)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def measurement_key(job: EvaluationJob) -> str:
    """An evaluation's spec hash without the fields that only choose which pieces run, or judge them (benchmarks,
    metrics, MMLU formulations, HumanEval formats, gates): a rerun that adds a piece measures that piece alone."""
    spec = job.spec
    chosen_elsewhere = {
        "benchmarks": [],
        "metrics": [],
        "gates": [],
        "mmlu": spec.mmlu.model_copy(update={"formulations": []}),
        "humaneval": spec.humaneval.model_copy(update={"formats": []}),
    }
    return spec_hash(job.model_copy(update={"spec": spec.model_copy(update=chosen_elsewhere)}))


def stage_manifest(job: DistillationJob | EvaluationJob, stage: Stage, world_size: int, **content: Any) -> dict:
    """What a finished stage records in its MANIFEST: which job, stage and spec, when; then its own content."""
    return {
        "job": job.metadata.name,
        "stage": stage.name,
        "specHash": spec_hash(job),
        "finishedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "worldSize": world_size,
        **content,
    }


def job_output_uri(job: DistillationJob | EvaluationJob) -> str:
    return f"{job.spec.output.uri.rstrip('/')}/{job.metadata.name}/"


def plan_stages(job: DistillationJob | EvaluationJob) -> list[Stage]:
    root = job_output_uri(job)
    if isinstance(job, EvaluationJob):
        return [Stage(index=0, name="evaluate", kind=StageKind.EVALUATE, output_uri=f"{root}evaluate/")]
    method = job.spec.method.name
    if method == "knowledge" and job.spec.teacher.cache is not None and job.spec.teacher.cache.top_k is not None:
        return [
            Stage(index=0, name="cache-teacher", kind=StageKind.CACHE_TEACHER, output_uri=f"{root}cache-teacher/"),
            Stage(
                index=1,
                name="distill",
                kind=StageKind.DISTILL,
                output_uri=f"{root}distill/",
                inputs=("cache-teacher",),
            ),
        ]
    if method in ("knowledge", "layerwise"):
        return [Stage(index=0, name="distill", kind=StageKind.DISTILL, output_uri=f"{root}distill/")]
    if method == "augmented":
        return [
            Stage(index=0, name="augment", kind=StageKind.AUGMENT, output_uri=f"{root}augment/"),
            Stage(index=1, name="distill", kind=StageKind.DISTILL, output_uri=f"{root}distill/", inputs=("augment",)),
        ]
    if method == "quantized":
        return [
            Stage(index=0, name="distill", kind=StageKind.DISTILL, output_uri=f"{root}distill/"),
            Stage(
                index=1, name="quantize", kind=StageKind.QUANTIZE, output_uri=f"{root}quantize/", inputs=("distill",)
            ),
        ]
    if method == "mobile":
        return [
            Stage(index=0, name="distill", kind=StageKind.DISTILL, output_uri=f"{root}distill/"),
            Stage(index=1, name="export", kind=StageKind.EXPORT, output_uri=f"{root}export/", inputs=("distill",)),
        ]
    if method == "response":
        train = Stage(index=0, name="train", kind=StageKind.DISTILL, output_uri=f"{root}train/")
        if job.spec.method.response.responses is not None:
            return [train]
        generate = Stage(index=0, name="generate", kind=StageKind.GENERATE, output_uri=f"{root}generate/")
        return [
            generate,
            Stage(index=1, name="train", kind=StageKind.DISTILL, output_uri=train.output_uri, inputs=("generate",)),
        ]
    if method == "progressive":
        stages: list[Stage] = []
        sizes = job.spec.method.progressive.sizes
        digits = 3
        while len({format_parameter_count(size, digits) for size in sizes}) < len(sizes):
            digits += 1  # sizes too close for the short form: as many digits as tell them apart
        for index, size in enumerate(sizes):
            name = f"distill-{format_parameter_count(size, digits)}"
            stages.append(
                Stage(
                    index=index,
                    name=name,
                    kind=StageKind.PROGRESSIVE,
                    output_uri=f"{root}{name}/",
                    inputs=(stages[-1].name,) if stages else (),
                    target_parameters=size,
                )
            )
        return stages
    raise NotImplementedError(f"no plan for method {method!r}")  # unreachable: the spec refuses it


def teacher_cache_uri(job: DistillationJob) -> str | None:
    """Where a job's distill stage reads the teacher's cached targets; None when it runs the teacher."""
    cache = job.spec.teacher.cache
    if cache is None:
        return None
    return cache.uri.rstrip("/") + "/" if cache.uri else f"{job_output_uri(job)}cache-teacher/"


def responses_uri(job: DistillationJob) -> str:
    """Where a response job's train stage reads the teacher's answers: given in the spec, or generated."""
    given = job.spec.method.response.responses
    return given if given is not None else plan_stages(job)[0].output_uri + RESPONSES


def final_artifacts(job: DistillationJob | EvaluationJob) -> dict[str, str]:
    """What a finished job leaves for its users: the final student, or an evaluation's results."""
    last = plan_stages(job)[-1]
    if isinstance(job, EvaluationJob):
        return {
            "results": last.output_uri + RESULTS,
            "plot": last.output_uri + PLOT,
            "report": last.output_uri + REPORT,
        }
    if last.kind is StageKind.EXPORT:  # the files for devices, beside the student they were made from
        return {"student": plan_stages(job)[-2].output_uri + STUDENT_DIR, "exports": last.output_uri}
    return {"student": last.output_uri + STUDENT_DIR}


INHERITED_BY_EVALUATION = ("student", "teacher", "dataset", "output", "max_seq_length")


def _fill_unset(evaluation: EvaluationJob, values: dict[str, object]) -> EvaluationJob:
    spec = evaluation.spec
    kept = {field: value for field, value in values.items() if field not in spec.model_fields_set}
    return evaluation.model_copy(update={"spec": spec.model_copy(update=kept)})


def resolve_evaluation(evaluation: EvaluationJob, distillation: DistillationJob) -> EvaluationJob:
    """The evaluation with the DistillationJob's final student, teacher, dataset and output filled in.

    Fields the evaluation sets itself win; the result names its student, so it runs without the cluster.
    The sequence length is the distillation's, so the numbers compare with its validation figures.
    """
    return _fill_unset(
        evaluation,
        {
            "student": final_artifacts(distillation)["student"],
            "teacher": distillation.spec.teacher.model,
            "dataset": distillation.spec.dataset,
            "output": distillation.spec.output,
            "max_seq_length": distillation.spec.training.max_seq_length,
        },
    )


def resolve_evaluation_as_recorded(evaluation: EvaluationJob, recorded: EvaluationJob) -> EvaluationJob:
    """Resolve again from an earlier resolution (the operator's ConfigMap), not from the DistillationJob."""
    return _fill_unset(evaluation, {field: getattr(recorded.spec, field) for field in INHERITED_BY_EVALUATION})
