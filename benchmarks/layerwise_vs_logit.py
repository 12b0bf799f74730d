"""Layerwise KD (hidden states + logits) vs logit-only KD at equal steps, same derived student.

python benchmarks/layerwise_vs_logit.py [--steps 40] [--layers 10]
"""

from __future__ import annotations

from potential_meme.engine.models import evenly_spaced_layers

from common import arguments, run


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=40)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--teacher-layers", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=5, help="matched depths, embeddings and last layer included")
    parser.add_argument("--layer-loss", default="mse", choices=["mse", "cosine"])
    args = parser.parse_args()
    kept = evenly_spaced_layers(args.teacher_layers, args.layers)
    student_layers = [0] + [round(i * args.layers / (args.pairs - 1)) for i in range(1, args.pairs)]
    # Student layer k is teacher layer kept[k - 1]: match each to the teacher state it was copied from.
    teacher_layers = [0 if k == 0 else kept[k - 1] + 1 for k in student_layers]
    student = {"fromTeacher": {"numLayers": args.layers}}
    logit = run("logit-only", {"knowledge": {"alpha": 0.5}}, args, student)[-1]
    layerwise_method = {
        "layerwise": {
            "alpha": 0.5,
            "teacherLayers": teacher_layers,
            "studentLayers": student_layers,
            "layerLoss": args.layer_loss,
        }
    }
    layerwise = run(f"layerwise-{args.layer_loss}", layerwise_method, args, student)[-1]
    print(
        f"\n{args.steps} steps x {args.batch_size} x {args.seq_length} tokens, student = {args.layers} layers; "
        f"pairs teacher {teacher_layers} <-> student {student_layers} ({args.layer_loss})"
    )
    print(f"{'':24}{'before':>14}{'after':>12}")
    for label, row in (("logit KD", logit), (f"layerwise ({args.layer_loss})", layerwise)):
        print(f"{label:24}{row['studentPerplexityBefore']:14,.1f}{row['studentPerplexityAfter']:12,.1f}")
    ratio = layerwise["studentPerplexityAfter"] / logit["studentPerplexityAfter"]
    print(f"layerwise / logit-only held-out perplexity: {ratio:.3f}")


if __name__ == "__main__":
    main()
