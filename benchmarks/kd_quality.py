"""Does distillation beat plain fine-tuning? KD (alpha < 1) vs cross-entropy only (alpha = 1).

Both runs start from the same student derived from SmolLM2-135M-Instruct, see the same tokens in
the same order for the same number of steps, and are scored on the same held-out modules of the
standard-library corpus. Printed side by side, with the ratio of held-out perplexities.

    python benchmarks/kd_quality.py [--steps 40] [--layers 10] [--alpha 0.5]
"""

from __future__ import annotations

from common import arguments, run


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=40)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    student = {"fromTeacher": {"numLayers": args.layers}}
    rows = {}
    for label, alpha in ((f"KD (alpha={args.alpha}, T={args.temperature})", args.alpha), ("CE only (alpha=1)", 1.0)):
        method = {"knowledge": {"alpha": alpha, "temperature": args.temperature}}
        rows[label] = run(f"kd-quality-a{alpha:g}".replace(".", "p"), method, args, student)[-1]
    kd, ce = rows.values()
    print(
        f"\n{args.steps} steps x {args.batch_size} x {args.seq_length} tokens, student = {args.layers} layers "
        f"of the teacher (held-out perplexity; teacher {kd['teacherPerplexity']:.2f})"
    )
    print(f"{'':28}{'before':>14}{'after':>12}")
    for label, row in rows.items():
        print(f"{label:28}{row['studentPerplexityBefore']:14,.1f}{row['studentPerplexityAfter']:12,.1f}")
    ratio = kd["studentPerplexityAfter"] / ce["studentPerplexityAfter"]
    print(f"KD / CE-only held-out perplexity: {ratio:.3f} ({'KD better' if ratio < 1 else 'KD not better'})")


if __name__ == "__main__":
    main()
