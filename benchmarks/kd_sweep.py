"""Which KD settings work best here: one setting changed at a time around the spec's defaults.

Every run trains the same derived student (the teacher's layers halved, by default) for the same
tokens and is scored on the corpus' held-out split and on text of another kind (`--other-text`).
The grid: temperature 1 / 2 / 4, alpha 0 / 0.1 / 0.5 / 0.9, forward KL / reverse KL / JSD, learning
rate 1e-4 / 3e-4 / 1e-3, and layerwise matching (mse, cosine) on top of the default logit KD.

    python benchmarks/kd_sweep.py [--steps 30] [--layers 15]
"""

from __future__ import annotations

from common import (
    arguments,
    copied_layer_pairs,
    other_text_names,
    perplexity_cells,
    perplexity_header,
    run,
    student_arguments,
)

BASELINE = {"temperature": 2.0, "alpha": 0.5, "divergence": "forwardKL"}
CHANGES = [
    ("temperature", 1.0),
    ("temperature", 4.0),
    ("alpha", 0.0),
    ("alpha", 0.1),
    ("alpha", 0.9),  # beyond the grid: at 30 steps more cross-entropy kept helping (0 < 0.1 < 0.5)
    ("divergence", "reverseKL"),
    ("divergence", "jsd"),
]
LEARNING_RATES = [1e-4, 1e-3]
LAYER_LOSSES = ["mse", "cosine"]


def _slug(value) -> str:
    return str(value).lower().replace(".", "p")


def _settings(args) -> dict[str, tuple[str, dict, dict]]:
    """Every setting of the grid by label: (run name, method, training overrides)."""
    prefix = f"sweep-{args.layers}l-"
    changed = {f"{name}={value}": BASELINE | {name: value} for name, value in CHANGES}
    knowledge_settings = {"baseline": BASELINE} | changed
    settings = {
        label: (prefix + "-".join(_slug(v) for v in knowledge.values()), {"knowledge": knowledge}, {})
        for label, knowledge in knowledge_settings.items()
    }
    for rate in LEARNING_RATES:
        settings[f"learningRate={rate:g}"] = (
            f"{prefix}kd",
            {"knowledge": BASELINE},
            {"learningRate": rate},
        )
    for loss in LAYER_LOSSES:
        # the layer pairs depend on the layers the baseline's student kept: filled in once it has run
        settings[f"layerwise {loss}"] = (f"{prefix}layerwise-{loss}", {"layerwise": BASELINE | {"layerLoss": loss}}, {})
    return settings


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=30)
    student_arguments(parser)
    parser.add_argument(
        "--only", nargs="+", metavar="LABEL", help="run these settings alone (the baseline always runs); e.g. alpha=0.9"
    )
    args = parser.parse_args()
    student = {"fromTeacher": {"numLayers": args.layers}}
    settings = _settings(args)
    unknown = set(args.only or ()) - set(settings)
    if unknown:
        parser.error(f"unknown --only setting(s) {sorted(unknown)}: choose from {list(settings)}")
    chosen = [label for label in settings if label != "baseline" and (not args.only or label in args.only)]
    wanted = ["baseline", *chosen]
    rows: dict[str, dict] = {}
    for label in wanted:
        name, method, training = settings[label]
        if "layerwise" in method:
            method = {"layerwise": method["layerwise"] | copied_layer_pairs(args, rows["baseline"]["keptLayers"])}
        rows[label] = run(name, method, args, student, **training)[-1]

    names = other_text_names(args)
    baseline = rows["baseline"]
    print(
        f"\n{args.steps} steps x {args.batch_size} x {args.seq_length} tokens each, student = {args.layers} layers "
        f"(chosen by importance) of the teacher; baseline {BASELINE}, learning rate {args.learning_rate:g}"
    )
    print(f"{'setting':26}{perplexity_header(names)}")
    print(f"{'(before training)':26}{perplexity_cells(baseline, baseline, names, 'studentPerplexityBefore')}")
    for label, row in sorted(rows.items(), key=lambda item: item[1]["studentPerplexityAfter"]):
        print(f"{label:26}{perplexity_cells(row, baseline, names, 'studentPerplexityAfter')}")
    best = min(rows, key=lambda label: rows[label]["studentPerplexityAfter"])
    ratio = rows[best]["studentPerplexityAfter"] / baseline["studentPerplexityAfter"]
    print(f"best held-out: {best} ({ratio:.3f} x the baseline's perplexity)")


if __name__ == "__main__":
    main()
