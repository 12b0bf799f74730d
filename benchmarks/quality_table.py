"""Every method on one table: held-out perplexity, parameters and training time at equal tokens.

The same student size for every method (the teacher's layers halved, by default), the same number
of training tokens, the same held-out modules of the standard-library corpus, and the same further
validation text of another kind (`--other-text`, default the Python Language Reference):

- CE only: the derived student fine-tuned on the corpus (alpha 1), no teacher;
- logit KD: the spec's default knowledge distillation;
- layerwise: logit KD plus hidden-state matching, each matched student layer paired with the
  teacher layer it was copied from;
- progressive: pruned to a size halfway, distilled, pruned to the final size, distilled, half the
  steps each;
- direct pruning: pruned straight to the final size, all the steps on one stage;
- on-policy KD: half of each batch's rows continued by the student and scored by the teacher,
  the other half logit KD as above (same divergence: the two rows differ in that alone);
- augmented KD: logit KD on the corpus plus the teacher's paraphrases and back-translations of
  `--augment-passages` training passages (the time column includes the teacher's writing);
- response matching: the student learns the teacher's answers to the built-in questions about the
  standard library (loss on the answers alone), then is measured on the same held-out text as the
  rest: it never trains on the corpus (the time column includes the teacher's writing, unless
  `--responses` gives answers written before);
- quantized: the logit-KD student (the same spec, so the same student) quantized to 4 bits (NF4),
  as it is (PTQ) and after `--qat-steps` steps of LoRA adapters trained by KD over it (QAT); a
  second table puts both beside the full-precision student with their bytes on disk and in memory.

    python benchmarks/quality_table.py [--steps 60] [--layers 15] [--other-text SOURCE ...] [--rows kd on-policy ...]
"""

from __future__ import annotations

from potential_meme.engine.trainer import run_job
from potential_meme.spec.plan import final_artifacts

from common import (
    arguments,
    copied_layer_pairs,
    corpus_perplexities,
    job,
    other_text_names,
    perplexity_cells,
    perplexity_header,
    run,
    student_arguments,
)

ROWS = ("ce", "kd", "layerwise", "progressive", "direct", "on-policy", "augmented", "response", "quantized")


def response_matching(args, student: dict) -> list[dict]:
    """The teacher's answers to the built-in questions (or `--responses`), learned by the student; measured, like
    every other row, on the corpus' held-out split and the other text."""
    generation = {"temperature": 0.7, "maxNewTokens": 128, "batchSize": 16}
    response = {"generation": generation} | ({"responses": args.responses} if args.responses else {})
    dataset = {"source": "builtin:python-questions", "maxValidationSequences": args.validation_sequences}
    answers = job("table-response", {"response": response}, args, student, dataset=dataset)
    stages = [manifest["metrics"] for manifest in run_job(answers)]
    return stages[:-1] + [stages[-1] | corpus_perplexities(final_artifacts(answers)["student"], args)]


def quantized_row(quantize_stage: dict, key: str, seconds: float) -> dict:
    """One student of a quantize stage (`fullPrecision`, `postTraining` or `quantizationAware`) as a table row."""
    entry = quantize_stage[key]
    return {
        "studentParameters": quantize_stage["studentParameters"],
        "studentPerplexityAfter": entry["perplexity"],
        "validationSets": {name: {"studentPerplexityAfter": value} for name, value in entry["validationSets"].items()},
        "trainSeconds": seconds,
    }


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=60)
    student_arguments(parser)
    parser.add_argument("--augment-passages", type=int, default=24, help="training passages the teacher rewrites")
    parser.add_argument("--responses", help="the response row learns these answers (a responses.jsonl) instead")
    parser.add_argument("--qat-steps", type=int, default=20, help="steps of the quantized row's adapter training")
    parser.add_argument(
        "--rows", nargs="+", choices=ROWS, default=list(ROWS), help="the methods to run (logit KD always runs)"
    )
    args = parser.parse_args()
    student = {"fromTeacher": {"numLayers": args.layers}}
    wanted = set(args.rows)
    rows: dict[str, list[dict]] = {}
    kd = run("table-kd", {"knowledge": {}}, args, student)
    if "ce" in wanted:
        rows["CE only (alpha 1)"] = run("table-ce", {"knowledge": {"alpha": 1.0}}, args, student)
    rows["logit KD (defaults)"] = kd
    if "layerwise" in wanted:
        layerwise = copied_layer_pairs(args, kd[-1]["keptLayers"])
        rows["layerwise"] = run("table-layerwise", {"layerwise": layerwise}, args, student)
    final = kd[-1]["studentParameters"]
    halfway = (kd[-1]["teacherParameters"] + final) // 2
    per_stage = args.steps // 2
    if "progressive" in wanted:
        progressive = {"progressive": {"intermediateSizes": [halfway], "finalSize": final}}
        rows["progressive (via halfway)"] = run("table-progressive", progressive, args, maxSteps=per_stage)
    if "direct" in wanted:
        direct = {"progressive": {"finalSize": final}}
        rows["direct pruning"] = run("table-direct", direct, args, maxSteps=2 * per_stage)
    if "on-policy" in wanted:
        on_policy = {"fraction": 0.5, "maxNewTokens": args.seq_length // 4}
        rows["on-policy KD (half)"] = run("table-on-policy", {"knowledge": {"onPolicy": on_policy}}, args, student)
    if "augmented" in wanted:
        augmented = {"augmented": {"factor": 3, "maxPassages": args.augment_passages}}
        rows["augmented KD (factor 3)"] = run("table-augmented", augmented, args, student)
    if "response" in wanted:
        rows["response matching"] = response_matching(args, student)
    quantized = None
    if "quantized" in wanted:
        method = {"quantized": {"bits": 4, "lora": {"steps": args.qat_steps}}}
        distilled, quantized = run("table-quantized", method, args, student)
        assert distilled["studentPerplexityAfter"] == kd[-1]["studentPerplexityAfter"], "not the logit-KD student"
        rows["4-bit PTQ of logit KD"] = [distilled, quantized_row(quantized, "postTraining", 0)]
        rows["4-bit QAT of logit KD"] = [
            distilled,
            quantized_row(quantized, "quantizationAware", quantized["trainSeconds"]),
        ]

    first = kd[0]  # distilled from the original teacher: its numbers are the teacher's
    names = other_text_names(args)
    sources = ", ".join(f"{name} = {source}" for name, source in zip(names, args.other_text, strict=True))
    print(
        f"\n{args.steps} steps x {args.batch_size} x {args.seq_length} tokens per method; perplexity on the "
        f"corpus' held-out split and on {sources}"
    )
    print(f"{'':28}{'params':>13}{perplexity_header(names)}{'seconds':>9}")
    print(f"{'teacher':28}{first['teacherParameters']:13,}{perplexity_cells(first, first, names, 'teacherPerplexity')}")
    before = perplexity_cells(first, first, names, "studentPerplexityBefore")
    print(f"{'student before training':28}{first['studentParameters']:13,}{before}")
    for label, stages in rows.items():
        last = stages[-1]
        seconds = sum(stage.get("trainSeconds", 0) + stage.get("generateSeconds", 0) for stage in stages)
        after = perplexity_cells(last, first, names, "studentPerplexityAfter")
        print(f"{label:28}{last['studentParameters']:13,}{after}{seconds:9,.0f}")
    if quantized is not None:
        print(f"\n{'':28}{'disk MB':>10}{'memory MB':>10}{perplexity_header(names)}")
        for label, key in (
            ("full precision", "fullPrecision"),
            ("4-bit PTQ", "postTraining"),
            ("4-bit QAT", "quantizationAware"),
        ):
            entry, row = quantized[key], quantized_row(quantized, key, 0)
            cells = perplexity_cells(row, first, names, "studentPerplexityAfter")
            print(f"{label:28}{entry['diskBytes'] / 1e6:10.1f}{entry['memoryBytes'] / 1e6:10.1f}{cells}")
    after = {label: stages[-1]["studentPerplexityAfter"] for label, stages in rows.items()}
    for top, bottom in (
        ("logit KD (defaults)", "CE only (alpha 1)"),
        ("layerwise", "logit KD (defaults)"),
        ("progressive (via halfway)", "direct pruning"),
        ("on-policy KD (half)", "logit KD (defaults)"),
        ("augmented KD (factor 3)", "logit KD (defaults)"),
        ("response matching", "logit KD (defaults)"),
    ):
        if top in after and bottom in after:
            print(f"{top} / {bottom}: {after[top] / after[bottom]:.3f}")


if __name__ == "__main__":
    main()
