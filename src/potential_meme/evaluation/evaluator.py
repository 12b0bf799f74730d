"""DistillationEvaluator: a teacher and its student on the benchmarks people quote, side by side.

Measuring (`evaluate`) and showing (`visualize_comparison`, `generate_report`) are separate: the
results object serializes to JSON, and a plot or report is rebuilt from it without measuring again.
Models are measured one at a time (the previous one freed first), so each one's memory is its own.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property, partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic_core import to_jsonable_python

from ..engine.chat_api import ChatClient, ChatEndpoint
from ..engine.models import ResolvedModel, load_model, load_tokenizer, parameter_count, resolve
from ..engine.runtime import Runtime, default_device
from ..spec.errors import SpecError
from ..spec.models import HUMANEVAL_FORMATS, humaneval_result
from ..storage import cache_folder
from .results import EvaluationResults, ModelResults, Score

log = logging.getLogger(__name__)

BENCHMARKS = ("mmlu", "humaneval", "mt-bench", "perplexity")
METRICS = ("accuracy", "latency", "memory_usage")


@dataclass
class EvaluationSettings:
    """How much of each benchmark to run. `limit`: questions per MMLU subject and MT-Bench category, and
    HumanEval problems unless `humaneval_limit` says otherwise."""

    limit: int | None = None
    mmlu_source: str | None = None  # a folder or s3:// prefix in the MMLU CSV layout; None: the hub
    mmlu_subjects: list[str] | None = None
    mmlu_formulations: tuple[str, ...] = ("letter", "cloze")
    num_fewshot: int = 5
    humaneval_limit: int | None = None  # problems; unset: `limit`
    humaneval_samples: int = 1
    humaneval_temperature: float = 0.0
    humaneval_formats: tuple[str, ...] = ("completion",)  # completion (original protocol) and/or chat
    max_new_tokens: int = 384
    batch_size: int = 8
    latency_runs: int = 5
    latency_tokens: int = 32
    perplexity_dataset: str | None = None  # a source the engine reads (its held-out split is measured)
    mt_bench_source: str | None = None  # a folder or s3:// prefix with FastChat's MT-Bench files
    judge: ChatEndpoint | None = None  # the MT-Bench judge
    judge_cache: Path | None = None  # judgments already made (default: in the engine's cache folder)
    mt_bench_max_tokens: int = 512
    judge_max_tokens: int = 1024
    extra_setup: dict[str, Any] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("potential-meme", "torch", "transformers", "lm-eval"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _release_memory() -> None:
    """Give freed tensors back to the system, so the next model's peak memory is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _check_choices(given: list[str], accepted: tuple[str, ...], name: str) -> None:
    unknown = [item for item in given if item not in accepted]
    if unknown:
        raise SpecError([(name, f"unknown {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}")])


def model_reference(reference: str) -> str:
    """The engine's references, and a DistillationJob file: its final student."""
    path = Path(reference)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        from ..spec import load_job
        from ..spec.models import DistillationJob
        from ..spec.plan import final_artifacts

        job = load_job(path)
        if not isinstance(job, DistillationJob):
            raise SpecError([("model", f"{reference} is an {job.kind}; give a model or a DistillationJob file")])
        return final_artifacts(job)["student"]
    return reference


PerplexityOf = Callable[[Any, Any], Score]  # (model, tokenizer) -> held-out perplexity
Checkpoint = Callable[[str, ModelResults], None]  # (role, what it has measured so far)


class DistillationEvaluator:
    def __init__(self, settings: EvaluationSettings | None = None, **overrides: Any):
        self.settings = settings or EvaluationSettings(**overrides)
        self.device = default_device()

    def evaluate(
        self,
        teacher_model: str | None,
        student_model: str,
        evaluation_datasets: list[str] = ["mmlu", "humaneval", "mt-bench"],  # noqa: B006 - the design's signature
        metrics: list[str] = ["accuracy", "latency", "memory_usage"],  # noqa: B006
    ) -> EvaluationResults:
        if "perplexity" in evaluation_datasets and not self.settings.perplexity_dataset:
            raise SpecError([("perplexity_dataset", "perplexity needs a dataset: set perplexity_dataset=SOURCE")])
        roles = {"teacher": teacher_model, "student": student_model}
        references = {role: model_reference(ref) for role, ref in roles.items() if ref is not None}
        models = {role: (reference, resolve(reference)) for role, reference in references.items()}
        return self.measure(models, list(evaluation_datasets), list(metrics), perplexity=self._perplexity)

    def measure(
        self,
        models: dict[str, tuple[str, ResolvedModel]],
        benchmarks: list[str],
        metrics: list[str],
        perplexity: PerplexityOf | None = None,
        runtime: Runtime | None = None,
        done: dict[str, ModelResults] | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> EvaluationResults:
        """Each model (role -> reference, resolved) on `benchmarks` and `metrics`, one loaded at a time. Under torchrun,
        every rank measures perplexity (it is split over them) and the main rank alone the rest. `done`: what an
        interrupted run measured (role -> results), kept; `checkpoint(role, results)` after each benchmark."""
        _check_choices(benchmarks, BENCHMARKS, "evaluation_datasets")
        _check_choices(metrics, METRICS, "metrics")
        _check_choices(list(self.settings.humaneval_formats), HUMANEVAL_FORMATS, "humaneval_formats")
        if "mt-bench" in benchmarks and "accuracy" in metrics:
            if self.settings.judge is None:
                raise SpecError([("judge", "mt-bench needs a judge: judge=ChatEndpoint(model=..., base_url=...)")])
            if self.settings.mt_bench_source is None:
                raise SpecError([("mt_bench_source", "mt-bench needs its questions: a folder or s3:// prefix")])
        main = runtime is None or runtime.is_main
        units = self._units(benchmarks, metrics, perplexity, main)
        measured = {
            role: self._measure(role, reference, resolved, units, (done or {}).get(role), checkpoint)
            for role, (reference, resolved) in models.items()
        }
        settings = to_jsonable_python({k: v for k, v in vars(self.settings).items() if k != "extra_setup"})
        setup = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(self.device),
            "versions": _versions(),
            "command": " ".join(sys.argv),
            "benchmarks": benchmarks,
            "metrics": metrics,
            "settings": settings,
            **self.settings.extra_setup,
        }
        return EvaluationResults(models=measured, setup=setup)

    def _units(
        self, benchmarks: list[str], metrics: list[str], perplexity: PerplexityOf | None, main: bool
    ) -> list[tuple[str, Callable[[Any, Any, ModelResults], None]]]:
        """The pieces of work for one model, each named by the results key it fills, in order."""
        units: list[tuple[str, Callable[[Any, Any, ModelResults], None]]] = []
        accuracy = "accuracy" in metrics
        if accuracy and "perplexity" in benchmarks and perplexity is not None:
            units.append(("perplexity", partial(self._perplexity_unit, perplexity)))
        if main and accuracy and "mmlu" in benchmarks:
            units += [(f"mmlu_{f}", partial(self._mmlu_unit, f)) for f in self.settings.mmlu_formulations]
        if main and accuracy and "humaneval" in benchmarks:
            units += [(humaneval_result(f), partial(self._humaneval_unit, f)) for f in self.settings.humaneval_formats]
        if main and accuracy and "mt-bench" in benchmarks:
            units.append(("mt-bench", self._mt_bench_unit))
        if main and "latency" in metrics:
            units.append(("latency", self._latency_unit))
        if main and "memory_usage" in metrics:
            units.append(("memory", self._memory_unit))
        return units

    def _measure(
        self,
        role: str,
        reference: str,
        resolved: ResolvedModel,
        units: list[tuple[str, Callable[[Any, Any, ModelResults], None]]],
        done: ModelResults | None,
        checkpoint: Checkpoint | None,
    ) -> ModelResults:
        if done is not None:  # what was measured before and is still asked for
            chosen = {key for key, _ in units}
            done = done.model_copy(
                update={
                    part: {key: value for key, value in getattr(done, part).items() if key in chosen}
                    for part in ("benchmarks", "details", "samples")
                }
            )
        todo = [(key, run) for key, run in units if done is None or key not in done.benchmarks]
        if done is not None and len(todo) < len(units):
            log.info("the %s's %s: measured before, kept", role, ", ".join(sorted(done.benchmarks)))
        if done is not None and not todo:
            return done
        tokenizer = load_tokenizer(resolved)
        model = load_model(resolved).to(self.device).eval()
        results = (
            done.model_copy(deep=True) if done else ModelResults(reference=reference, parameters=parameter_count(model))
        )
        log.info("evaluating the %s, %s (%d parameters)", role, reference, results.parameters)
        for key, run in todo:
            run(model, tokenizer, results)
            if checkpoint is not None:
                checkpoint(role, results)
            log.info(  # after the checkpoint: what this line reports survives a crash
                "the %s's %s: %s",
                role,
                key,
                ", ".join(f"{m} {s.value:.4g}" for m, s in results.benchmarks[key].items()),
            )
        del model
        _release_memory()
        return results

    def _perplexity_unit(self, perplexity: PerplexityOf, model: Any, tokenizer: Any, results: ModelResults) -> None:
        results.benchmarks["perplexity"] = {"perplexity": perplexity(model, tokenizer)}

    def _mmlu_unit(self, formulation: str, model: Any, tokenizer: Any, results: ModelResults) -> None:
        from .mmlu import run_mmlu

        settings = self.settings
        macro, subjects = run_mmlu(
            model,
            tokenizer,
            settings.mmlu_source,
            formulation=formulation,
            subjects=settings.mmlu_subjects,
            limit=settings.limit,
            num_fewshot=settings.num_fewshot,
            batch_size=settings.batch_size,
        )
        results.benchmarks[f"mmlu_{formulation}"] = {"accuracy": macro}
        results.details[f"mmlu_{formulation}"] = subjects

    def _humaneval_unit(self, prompt_format: str, model: Any, tokenizer: Any, results: ModelResults) -> None:
        from .humaneval import run_humaneval

        settings = self.settings
        scores, shown = run_humaneval(
            model,
            tokenizer,
            limit=settings.humaneval_limit or settings.limit,
            samples=settings.humaneval_samples,
            temperature=settings.humaneval_temperature,
            max_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            prompt_format=prompt_format,
        )
        results.benchmarks[humaneval_result(prompt_format)] = scores
        results.samples[humaneval_result(prompt_format)] = shown

    def _mt_bench_unit(self, model: Any, tokenizer: Any, results: ModelResults) -> None:
        from .mt_bench import run_mt_bench

        settings = self.settings
        scores, categories, shown = run_mt_bench(
            model,
            tokenizer,
            settings.mt_bench_source,
            self._judge,
            limit=settings.limit,
            max_tokens=settings.mt_bench_max_tokens,
            judge_max_tokens=settings.judge_max_tokens,
            batch_size=settings.batch_size,
        )
        results.benchmarks["mt-bench"] = scores
        results.details["mt-bench"] = categories
        results.samples["mt-bench"] = shown

    def _latency_unit(self, model: Any, tokenizer: Any, results: ModelResults) -> None:
        from .latency import measure_speed

        settings = self.settings
        results.benchmarks["latency"] = measure_speed(
            model, tokenizer, settings.latency_tokens, settings.latency_runs, settings.batch_size
        )

    def _memory_unit(self, model: Any, tokenizer: Any, results: ModelResults) -> None:
        from .latency import measure_memory

        settings = self.settings
        results.benchmarks["memory"] = measure_memory(model, tokenizer, settings.latency_tokens, settings.batch_size)

    @cached_property
    def _judge(self) -> ChatClient:
        """One client for every model measured: its judgment cache is read from disk once."""
        judge = self.settings.judge
        cache = self.settings.judge_cache
        if cache is None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{judge.model}@{judge.base_url or 'openai'}")
            cache = cache_folder() / "judgments" / f"{name}.jsonl"
        return ChatClient(judge, cache)

    def _perplexity(self, model: Any, tokenizer: Any) -> Score:
        from ..engine.data import load_documents
        from ..engine.evaluation import held_out_perplexity
        from ..spec.models import DatasetSpec

        _, documents = load_documents(DatasetSpec(source=self.settings.perplexity_dataset))
        return held_out_perplexity(
            model, tokenizer, documents, Runtime.single(self.device), 256, None, self.settings.batch_size
        )

    def visualize_comparison(self, results: EvaluationResults, output_file: str = "comparison.png") -> Path:
        from .report import comparison_figure

        return comparison_figure(results, Path(output_file))

    def generate_report(self, results: EvaluationResults, output_file: str = "report.pdf") -> Path:
        from .report import pdf_report

        return pdf_report(results, Path(output_file))
