"""The seed API: thin faces that build a DistillationJob spec and hand it to the engine."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from ..spec import DistillationJob, SpecError, parse_job
from ..spec.models import (
    KnowledgeMethod,
    LayerwiseMethod,
    MobileMethod,
    ProgressiveMethod,
    QuantizedMethod,
)
from ..spec.plan import final_artifacts
from ..storage import open_store, sync_down, sync_up


def _camel(fields: dict[str, Any]) -> dict[str, Any]:
    """Python keyword names to the spec's YAML names, so errors name the field as the CRD does."""
    return {to_camel(key): value for key, value in fields.items()}


def _validated(model: type[BaseModel], fields: dict[str, Any], source: str) -> Any:
    """Check constructor arguments at once, before anything loads."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise SpecError.from_validation(model, exc, source) from None


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
    """Shared plumbing: build the job, run it through the engine, copy the student out.

    Every distiller also takes `output_uri` (where runs go), `job_name` (default: from the spec, so a
    rerun resumes) and `verbose` (False: no progress and no summary on screen).
    """

    def __init__(self, output_uri: str, job_name: str | None, verbose: bool):
        self.output_uri = output_uri
        self.job_name = job_name
        self.verbose = verbose  # progress and each stage's summary on screen, as `potential-meme run` shows
        self.job: DistillationJob | None = None
        self.results: list[dict[str, Any]] = []

    def _job(self, spec: dict[str, Any], prefix: str) -> DistillationJob:
        spec = {**spec, "output": {"uri": self.output_uri}}
        # Same spec, same name: a rerun resumes or skips instead of starting over.
        name = self.job_name or f"{prefix}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]}"
        document = {
            "apiVersion": "distill.potential-meme.io/v1alpha1",
            "kind": "DistillationJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        return parse_job(document, source=name)  # type: ignore[return-value]  # kind is DistillationJob

    def _run(self, job: DistillationJob, metrics_port: int | None) -> dict[str, Any]:
        from ..engine.progress import shown_to_the_caller, stage_summary
        from ..engine.trainer import run_job

        self.job = job
        with shown_to_the_caller(self.verbose):
            self.results = run_job(job, metrics_port=metrics_port)
        if self.verbose:
            print(stage_summary(job.metadata.name, self.results, final_artifacts(job)["student"]), flush=True)
        return self.results[-1]["metrics"]

    def save_student(self, path: str | Path) -> str:
        """Copy the distilled student (a Hugging Face folder) to a local path or an s3:// URI."""
        if self.job is None:
            raise RuntimeError("nothing distilled yet: call distill() first")
        from ..engine.models import verify_student

        student = final_artifacts(self.job)["student"]
        destination = str(path)
        with tempfile.TemporaryDirectory(prefix="potential-meme-copy-") as tmp:
            local = Path(tmp) if destination.startswith("s3://") else Path(destination)
            sync_down(open_store(student), "", local)
            verify_student(student, local)
            if destination.startswith("s3://"):
                sync_up(open_store(destination), local, "")
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
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.method = _validated(
            KnowledgeMethod,
            {"temperature": temperature, "alpha": alpha, "divergence": divergence, "beta": beta},
            "KnowledgeDistiller",
        )
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


class LayerwiseDistiller(_Distiller):
    """Intermediate-representation distillation: the student's hidden states learn the teacher's.

    Layer index 0 is the embedding output and i the output of decoder layer i, so
    teacher_layers=[0, 8, 16, 24, 32] with student_layers=[0, 4, 8, 12, 16] matches every 8th
    teacher layer to every 4th student layer. Where hidden sizes differ a learned linear projection
    maps the student's state to the teacher's width; it is trained with the student and not
    exported. The logit-KD loss (temperature, alpha) is added as in KnowledgeDistiller.
    """

    def __init__(
        self,
        teacher_model: str,
        student_model: str | int | dict,
        teacher_layers: list[int],
        student_layers: list[int],
        *,
        temperature: float = 2.0,
        alpha: float = 0.5,
        layer_loss: str = "cosine",
        output_uri: str = "file://./runs",
        job_name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.teacher_model = teacher_model
        self.student = _student_spec(student_model)
        self.method = {
            "temperature": temperature,
            "alpha": alpha,
            "layerLoss": layer_loss,
            "teacherLayers": list(teacher_layers),
            "studentLayers": list(student_layers),
        }
        _validated(LayerwiseMethod, self.method, "LayerwiseDistiller")

    def distill(
        self,
        dataset: str,
        batch_size: int = 8,
        epochs: int = 1,
        layer_loss_weights: list[float] | None = None,
        *,
        learning_rate: float = 5e-5,
        metrics_port: int | None = None,
        **training: Any,
    ) -> dict[str, Any]:
        """Run the distillation; returns the final metrics. Extra keywords are training fields."""
        method = {**self.method, "layerLossWeights": layer_loss_weights}
        spec = {
            "teacher": {"model": self.teacher_model},
            "student": self.student,
            "dataset": {"source": dataset},
            "method": {"layerwise": {k: v for k, v in method.items() if v is not None}},
            "training": _camel(
                {"batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate, **training}
            ),
        }
        return self._run(self._job(spec, "layerwise"), metrics_port)


class ProgressiveDistiller(_Distiller):
    """A chain of students of decreasing size, each pruned from the previous model and distilled from it.

    Sizes are parameter counts: "30B", "13B", 7e9, "60M" or ints, from largest to smallest.
    """

    def __init__(
        self,
        teacher_model: str,
        intermediate_sizes: list[str | int | float],
        final_size: str | int | float,
        *,
        temperature: float = 2.0,
        alpha: float = 0.5,
        output_uri: str = "file://./runs",
        job_name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.teacher_model = teacher_model
        self.method = {
            "temperature": temperature,
            "alpha": alpha,
            "intermediateSizes": list(intermediate_sizes),
            "finalSize": final_size,
        }
        _validated(ProgressiveMethod, self.method, "ProgressiveDistiller")

    def distill_progressively(
        self,
        dataset: str,
        steps_per_stage: int = 1000,
        patience: int | None = 3,
        *,
        eval_every_steps: int | None = None,
        batch_size: int = 8,
        learning_rate: float = 5e-5,
        metrics_port: int | None = None,
        **training: Any,
    ) -> list[dict[str, Any]]:
        """Run every stage; returns each stage's metrics, in order.

        Evaluates every `eval_every_steps` (default: a tenth of a stage) and stops a stage after
        `patience` evaluations without improvement, keeping its best student.
        """
        every = eval_every_steps or max(1, steps_per_stage // 10)
        spec = {
            "teacher": {"model": self.teacher_model},
            "dataset": {"source": dataset},
            "method": {"progressive": self.method},
            "training": _camel(
                {
                    "max_steps": steps_per_stage,
                    "eval_every_steps": every,
                    "early_stopping_patience": patience,
                    "batch_size": batch_size,
                    "learning_rate": learning_rate,
                    **training,
                }
            ),
        }
        self._run(self._job(spec, "progressive"), metrics_port)
        return [result["metrics"] for result in self.results]


class ResponseMatcher(_Distiller):
    """Response matching: the teacher answers prompts, then the student learns those answers (the loss on
    the response tokens, read through the student's chat template; the prompts are context, not targets).

    `student_model` is a model reference, or an int: keep that many of the teacher's layers. `alpha` below 1
    adds token-level KD on the teacher's responses (a teacher that shares the student's tokenizer).
    """

    def __init__(
        self,
        teacher_model: str,
        student_model: str | int | dict,
        *,
        alpha: float = 1.0,
        output_uri: str = "file://./runs",
        job_name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.teacher_model = teacher_model
        self.student = _student_spec(student_model)
        self.alpha = alpha
        self.prompts: str | None = None

    def _spec(self, dataset: str, response: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
        return {
            "teacher": {"model": self.teacher_model},
            "student": self.student,
            "dataset": {"source": dataset},
            "method": {"response": {"alpha": self.alpha, **response}},
            "training": _camel(training),
        }

    def generate_teacher_responses(
        self, prompts_dataset: str, temperature: float = 0.7, max_tokens: int = 256, *, batch_size: int = 8
    ) -> str:
        """The teacher answers every prompt of `prompts_dataset` (a file or folder of .txt (one prompt a line),
        .jsonl, .csv or .parquet files, an s3:// prefix or a dataset name); returns where the answers are, a
        JSON Lines file of one record a prompt, for `train_student`. A rerun asks only unanswered prompts."""
        from ..engine.progress import shown_to_the_caller
        from ..engine.trainer import run_stage
        from ..spec.plan import RESPONSES, plan_stages

        generation = {"temperature": temperature, "maxNewTokens": max_tokens, "batchSize": batch_size}
        job = self._job(self._spec(prompts_dataset, {"generation": generation}, {}), "responses")
        generate = plan_stages(job)[0]
        with shown_to_the_caller(self.verbose):
            run_stage(job, generate)
        self.prompts = prompts_dataset
        return generate.output_uri + RESPONSES

    def train_student(
        self,
        teacher_responses: str,
        batch_size: int = 8,
        epochs: int = 1,
        learning_rate: float = 5e-5,
        *,
        metrics_port: int | None = None,
        **training: Any,
    ) -> dict[str, Any]:
        """Fine-tune the student on `teacher_responses` (what `generate_teacher_responses` returned, or any JSON
        Lines file of {"prompt", "response"} records); returns the final metrics. Extra keyword arguments
        are training fields in snake_case (max_steps, max_seq_length, ...)."""
        fields = {"batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate, **training}
        spec = self._spec(self.prompts or teacher_responses, {"responses": teacher_responses}, fields)
        return self._run(self._job(spec, "response"), metrics_port)


class AugmentedDistiller(_Distiller):
    """Logit KD on the corpus and on text the teacher writes from it: paraphrases and back-translations of
    every training passage, filtered (empty, too short or long, copies, exact and near duplicates).

    `student_model` is a model reference, or an int: keep that many of the teacher's layers.
    """

    def __init__(
        self,
        teacher_model: str,
        student_model: str | int | dict,
        temperature: float = 2.0,
        alpha: float = 0.5,
        *,
        pivot_language: str = "French",
        shortest_share: float = 0.5,
        longest_share: float = 2.0,
        near_duplicate_similarity: float = 0.8,
        output_uri: str = "file://./runs",
        job_name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.teacher_model = teacher_model
        self.student = _student_spec(student_model)
        self.method = _camel(
            {
                "temperature": temperature,
                "alpha": alpha,
                "pivot_language": pivot_language,
                "shortest_share": shortest_share,
                "longest_share": longest_share,
                "near_duplicate_similarity": near_duplicate_similarity,
            }
        )

    def distill_with_augmentation(
        self,
        base_dataset: str,
        augmentation_methods: list[str] = ["paraphrase", "back_translation"],  # noqa: B006 - the design's signature
        augmentation_factor: int = 3,
        *,
        max_passages: int | None = None,
        metrics_port: int | None = None,
        **training: Any,
    ) -> dict[str, Any]:
        """Augment the training passages of `base_dataset`, then distill on base and augmented text; returns
        the final metrics. How many variants each method kept, and why others were dropped, is in
        `self.results[0]["metrics"]["variants"]`. Extra keyword arguments are training fields in snake_case."""
        method = {**self.method, "methods": list(augmentation_methods), "factor": augmentation_factor}
        if max_passages is not None:
            method["maxPassages"] = max_passages
        spec = {
            "teacher": {"model": self.teacher_model},
            "student": self.student,
            "dataset": {"source": base_dataset},
            "method": {"augmented": method},
            "training": _camel({"batch_size": 8, **training}),
        }
        return self._run(self._job(spec, "augmented"), metrics_port)


class QuantizedDistiller(_Distiller):
    """Logit KD in full precision, then the student's linear layers quantized with bitsandbytes (NF4 for 4 bits,
    int8 for 8), optionally followed by quantization-aware training: LoRA adapters over the quantized student
    trained with the same KD loss against the full-precision teacher.

    `student_model` is a model reference, or an int: keep that many of the teacher's layers. The result is saved
    as a quantized Hugging Face folder (`save_student`; it loads back with `from_pretrained`) and, with QAT, as
    the adapters alone (`<run>/quantize/adapters/`).
    """

    def __init__(
        self,
        teacher_model: str,
        student_model: str | int | dict,
        quantization_bits: int = 4,
        *,
        temperature: float = 2.0,
        alpha: float = 0.5,
        lora_rank: int = 16,
        lora_steps: int | None = None,
        lora_learning_rate: float = 1e-3,
        output_uri: str = "file://./runs",
        job_name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.teacher_model = teacher_model
        self.student = _student_spec(student_model)
        self.method = {
            "bits": quantization_bits,
            "temperature": temperature,
            "alpha": alpha,
            "lora": {"rank": lora_rank, "steps": lora_steps, "learningRate": lora_learning_rate},
        }
        _validated(QuantizedMethod, self.method, "QuantizedDistiller")

    def distill_and_quantize(
        self,
        dataset: str,
        quantization_aware_training: bool = True,
        *,
        batch_size: int = 8,
        learning_rate: float = 5e-5,
        metrics_port: int | None = None,
        **training: Any,
    ) -> dict[str, Any]:
        """Distill, quantize and (with QAT) train the adapters; returns the quantize stage's metrics, whose
        `fullPrecision`, `postTraining` and (with QAT) `quantizationAware` entries hold each student's held-out
        perplexity and bytes on disk and in memory. Extra keyword arguments are training fields in snake_case."""
        lora = {key: value for key, value in self.method["lora"].items() if value is not None}
        method = {**self.method, "lora": lora, "quantizationAwareTraining": quantization_aware_training}
        spec = {
            "teacher": {"model": self.teacher_model},
            "student": self.student,
            "dataset": {"source": dataset},
            "method": {"quantized": method},
            "training": _camel({"batch_size": batch_size, "learning_rate": learning_rate, **training}),
        }
        return self._run(self._job(spec, "quantized"), metrics_port)


class MobileDistiller(_Distiller):
    """A student for a phone or an edge box: architectures derived from the teacher (fewer layers, narrower MLPs)
    are built and measured on this machine (weight bytes, per-token decode latency, energy per token), the one
    within `target_size_mb` and `target_latency_ms` that `optimize_for` prefers is distilled, then exported and
    checked in each format's runtime."""

    def __init__(
        self,
        teacher_model: str,
        target_size_mb: float = 500,
        target_latency_ms: float = 100,
        *,
        temperature: float = 2.0,
        alpha: float = 0.5,
        output_uri: str = "file://./runs",
        job_name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__(output_uri, job_name, verbose)
        self.teacher_model = teacher_model
        self.method = _camel(
            {
                "target_size_mb": target_size_mb,
                "target_latency_ms": target_latency_ms,
                "temperature": temperature,
                "alpha": alpha,
            }
        )
        _validated(MobileMethod, self.method, "MobileDistiller")

    def distill_for_mobile(
        self,
        dataset: str,
        optimize_for: str = "battery_efficiency",
        *,
        formats: list[str] = ["onnx", "executorch"],  # noqa: B006 - never mutated
        batch_size: int = 8,
        learning_rate: float = 5e-5,
        metrics_port: int | None = None,
        **training: Any,
    ) -> dict[str, Any]:
        """Choose, distill and export; returns the distill stage's metrics (`architecture`: the choice and the
        measurements that made it, `candidates`: every one measured) with `exports`: each format's file, size,
        runtime, latency and largest logit difference against PyTorch."""
        method = {**self.method, "optimizeFor": optimize_for, "formats": list(formats)}
        spec = {
            "teacher": {"model": self.teacher_model},
            "dataset": {"source": dataset},
            "method": {"mobile": method},
            "training": _camel({"batch_size": batch_size, "learning_rate": learning_rate, **training}),
        }
        self._run(self._job(spec, "mobile"), metrics_port)
        distilled, exported = (result["metrics"] for result in self.results)
        return {**distilled, "exports": exported["formats"]}

    def export_to_mobile(
        self,
        model: Any = None,
        formats: list[str] = ["tflite", "coreml"],  # noqa: B006 - the design's signature
        output_dir: str | Path | None = None,
    ) -> dict[str, Any]:
        """Write `model` (a loaded model, or any model reference; default: the student distilled last) in each of
        `formats` under `output_dir` (default: beside the job's other exports) and check each file in its runtime;
        returns each format's report (files, bytes, runtime, latency, largest logit difference against PyTorch)."""
        from ..engine.models import load_model
        from ..export import export_model

        if model is None:
            if self.job is None:
                raise RuntimeError("nothing distilled yet: pass a model, or call distill_for_mobile() first")
            model = final_artifacts(self.job)["student"]
        if isinstance(model, str):
            model = load_model(model)
        if output_dir is None:
            if self.job is None:
                raise ValueError("output_dir: required when no job ran here")
            output_dir = open_store(final_artifacts(self.job)["exports"]).root
        return {name: result.as_dict() for name, result in export_model(model, formats, output_dir).items()}


__all__ = [
    "AugmentedDistiller",
    "KnowledgeDistiller",
    "LayerwiseDistiller",
    "MobileDistiller",
    "ProgressiveDistiller",
    "QuantizedDistiller",
    "ResponseMatcher",
]
