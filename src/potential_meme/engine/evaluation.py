"""The evaluate stage: a student and its teacher on the EvaluationJob's benchmarks, with its quality gates.

Held-out perplexity reads each model's held-out documents through its own tokenizer, so a student with
another vocabulary is still measured fairly (per token of its own tokenizer). The benchmarks are the
DistillationEvaluator's. The stage publishes results.json (the evaluator's results), comparison.png and
report.pdf, each with its sha256 in the manifest, whose metrics carry the headline numbers and gates.
"""

from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from ..metrics import trainer as metrics
from ..spec.models import EvaluationJob
from ..spec.plan import MANIFEST, PLOT, REPORT, RESULTS, Stage, measurement_key, stage_manifest
from ..storage import file_sha256, open_store, read_json_if_exists, write_json
from .data import Document, load_documents, pack
from .models import ResolvedModel
from .runtime import Runtime, perplexity

log = logging.getLogger(__name__)


def held_out_perplexity(
    model: Any,
    tokenizer: Any,
    documents: list[Document],
    runtime: Runtime,
    max_seq_length: int,
    max_sequences: int | None,
    batch_size: int,
    chunk_size: int = 256,
) -> Any:
    from ..evaluation.results import Score

    rows = pack(documents, tokenizer, max_seq_length, "spec.maxSeqLength", max_rows=max_sequences)
    value = perplexity(model, rows, runtime, batch_size, chunk_size)
    return Score(value=value, n=int(rows.numel()), unit="perplexity", higher_is_better=False)


MEASURED = "measured/"  # each model's results so far: a restarted evaluation keeps what it measured


def _measured_before(job: EvaluationJob, store: Any) -> dict[str, Any]:
    """What earlier runs measured with the same settings, by role: a finished evaluation that chose other pieces
    (its results), then an interrupted run (what it kept); another setting's measurements are ignored."""
    from ..evaluation.results import EvaluationResults, ModelResults

    key = measurement_key(job)
    done = {}
    finished = read_json_if_exists(store, MANIFEST)
    if finished is not None and finished.get("measurementKey") == key:
        done = dict(EvaluationResults.model_validate(read_json_if_exists(store, RESULTS)).models)
    for role in ("teacher", "student"):
        kept = read_json_if_exists(store, f"{MEASURED}{role}.json")
        if kept is not None and kept.get("measurementKey") == key:
            done[role] = ModelResults.model_validate(kept["results"])
    return done


def _keep_measured(job: EvaluationJob, store: Any, role: str, results: Any) -> None:
    content = {"measurementKey": measurement_key(job), "results": results.model_dump(mode="json")}
    write_json(store, f"{MEASURED}{role}.json", content)


def _settings(job: EvaluationJob) -> Any:
    from ..engine.chat_api import ChatEndpoint
    from ..evaluation import EvaluationSettings

    spec = job.spec
    judge = spec.mt_bench.judge if spec.mt_bench else None
    return EvaluationSettings(
        limit=spec.limit,
        mmlu_source=spec.mmlu.source,
        mmlu_subjects=spec.mmlu.subjects,
        mmlu_formulations=tuple(spec.mmlu.formulations),
        num_fewshot=spec.mmlu.num_fewshot,
        humaneval_limit=spec.humaneval.limit,
        humaneval_samples=spec.humaneval.samples,
        humaneval_temperature=spec.humaneval.temperature,
        humaneval_formats=tuple(spec.humaneval.formats),
        max_new_tokens=spec.humaneval.max_new_tokens,
        batch_size=spec.batch_size,
        mt_bench_source=spec.mt_bench.source if spec.mt_bench else None,
        mt_bench_max_tokens=spec.mt_bench.max_new_tokens if spec.mt_bench else 512,
        judge=ChatEndpoint(judge.model, judge.base_url, judge.api_key_env, judge.concurrency) if judge else None,
        judge_max_tokens=judge.max_new_tokens if judge else 1024,
        extra_setup={"job": job.metadata.name, "dataset": spec.dataset.source if spec.dataset else None},
    )


def _summary(job: EvaluationJob, results: Any, gates: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's metrics: what the job's status shows."""
    from ..evaluation.gates import gate_metrics, headline

    summary = headline(results)
    for role in results.models:
        score = results.score(role, "perplexity", "perplexity")
        if score is not None:
            summary[f"{role}Perplexity"] = score.value
            summary["sequences"] = score.n // job.spec.max_seq_length
        summary[f"{role}Parameters"] = results.models[role].parameters
    if "teacher" in results.models:
        summary["parameterRatio"] = results.models["student"].parameters / results.models["teacher"].parameters
        if "teacherPerplexity" in summary:
            summary["perplexityRatio"] = summary["studentPerplexity"] / summary["teacherPerplexity"]
    return summary | gate_metrics(gates)


def run_evaluation_stage(
    job: EvaluationJob, stage: Stage, runtime: Runtime, resolved: dict[str, ResolvedModel]
) -> dict[str, Any]:
    """`resolved`: the models by role, as the checks before the stage resolved them."""
    from ..evaluation import DistillationEvaluator
    from ..evaluation.gates import check_gates
    from ..evaluation.report import comparison_figure, pdf_report

    spec = job.spec
    held_out = None
    if "perplexity" in spec.benchmarks:
        _, documents = load_documents(spec.dataset)  # the held-out split, as the distillation kept it apart
        held_out = partial(
            held_out_perplexity,
            documents=documents,
            runtime=runtime,
            max_seq_length=spec.max_seq_length,
            max_sequences=spec.dataset.max_validation_sequences,
            batch_size=spec.batch_size,
            chunk_size=spec.chunk_size,
        )
    roles = (("teacher", spec.teacher), ("student", spec.student))
    models = {role: (reference, resolved[role]) for role, reference in roles if reference is not None}
    wanted = ["memory_usage" if metric == "memoryUsage" else metric for metric in spec.metrics]
    store = open_store(stage.output_uri)
    results = DistillationEvaluator(_settings(job)).measure(
        models,
        list(spec.benchmarks),
        wanted,
        held_out,
        runtime,
        done=_measured_before(job, store),
        checkpoint=partial(_keep_measured, job, store) if runtime.is_main else None,
    )
    for role in results.models:
        score = results.score(role, "perplexity", "perplexity")
        if score is not None:
            metrics.VALIDATION_PERPLEXITY.labels(
                job=job.metadata.name, stage=stage.name, model=role, when="evaluation", dataset=metrics.HELD_OUT_SPLIT
            ).set(score.value)
            log.info("%s: held-out perplexity %.3f", role, score.value)
    gates = check_gates(spec.gates, results)
    for gate in gates:
        log.info("quality gate %s: %s (%s)", gate["gate"], "passed" if gate["passed"] else "FAILED", gate["message"])
    manifest = stage_manifest(
        job, stage, runtime.world_size, metrics=_summary(job, results, gates), results=stage.output_uri + RESULTS
    )
    manifest["gates"] = gates
    manifest["measurementKey"] = measurement_key(job)
    if runtime.is_main:
        with tempfile.TemporaryDirectory(prefix="evaluation-") as scratch:
            files = {
                RESULTS: results.save(Path(scratch) / RESULTS),
                PLOT: comparison_figure(results, Path(scratch) / PLOT),
                REPORT: pdf_report(results, Path(scratch) / REPORT),
            }
            manifest["files"] = [
                {"path": name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
                for name, path in files.items()
            ]
            for name, path in files.items():
                store.upload_file(path, name)
        write_json(store, MANIFEST, manifest)  # last: its presence marks the evaluation done
        store.delete_prefix(MEASURED)
    runtime.barrier()
    return manifest
