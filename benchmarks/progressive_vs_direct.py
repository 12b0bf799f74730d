"""Progressive (135M -> ~100M -> ~70M) vs pruning straight to ~70M, at equal total steps.

Both start from SmolLM2-135M-Instruct and use the same pruning (layers, then MLP channels) and
the same KD loss; the progressive chain spends half its steps per stage, the direct run all of
them on one stage. Held-out perplexity on the standard-library corpus after every stage.

    python benchmarks/progressive_vs_direct.py [--steps 40] [--sizes 100M 70M]
"""

from __future__ import annotations

from common import arguments, run


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=40)
    parser.add_argument("--sizes", nargs="+", default=["100M", "70M"])
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    per_stage = args.steps // len(args.sizes)
    early = {"evalEverySteps": args.eval_every, "earlyStoppingPatience": 2}

    def method(sizes):
        return {"progressive": {"intermediateSizes": sizes[:-1], "finalSize": sizes[-1]}}

    chain = run("progressive-chain", method(args.sizes), args, maxSteps=per_stage, **early)
    direct = run("progressive-direct", method(args.sizes[-1:]), args, maxSteps=per_stage * len(args.sizes), **early)
    print(
        f"\nheld-out perplexity, teacher {chain[0]['teacherPerplexity']:.2f}; "
        f"{per_stage * len(args.sizes)} steps x {args.batch_size} x {args.seq_length} tokens in total per run"
    )
    print(f"{'run / stage':28}{'params':>12}{'layers':>8}{'pruned':>14}{'distilled':>12}{'steps':>7}{'early':>7}")
    for label, stages in (("progressive", chain), ("direct", direct)):
        for size, row in zip(args.sizes[-len(stages) :], stages, strict=True):
            print(
                f"{label + ' -> ' + size:28}{row['studentParameters']:12,}{len(row['keptLayers']):8}"
                f"{row['studentPerplexityBefore']:14,.1f}{row['studentPerplexityAfter']:12,.1f}"
                f"{row['steps']:7}{'yes' if row['stoppedEarly'] else 'no':>7}"
            )
    ratio = chain[-1]["studentPerplexityAfter"] / direct[-1]["studentPerplexityAfter"]
    print(f"progressive / direct final held-out perplexity: {ratio:.3f}")


if __name__ == "__main__":
    main()
