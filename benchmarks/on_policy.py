"""On-policy KD against logit KD alone at equal wall-clock time, and how each student's own writing scores.

lambda = 0.5 (half of each batch's rows continued by the student and scored by the teacher) trains
for --steps; lambda = 0 trains for --steps too (its seconds per step measured), then for as many
steps as fit in the time lambda = 0.5 took. Same derived student, divergence and everything else.
Each student is measured on the corpus' held-out split and the other text (perplexity), and on its
own writing: it continues the first tokens of each held-out sequence (--new-tokens, sampled at
temperature 1, seeded) and the teacher scores the continuation: its perplexity of the student's
tokens, and the reverse KL(student || teacher) per token, the mismatch on-policy training lowers.
The comparison is by wall-clock time: run it on a quiet machine.

    python benchmarks/on_policy.py [--steps 40] [--layers 10] [--new-tokens 64]
"""

from __future__ import annotations

import math

import torch

from potential_meme.engine.data import pack
from potential_meme.engine.losses import IGNORE_INDEX, align_vocabulary, token_divergence
from potential_meme.engine.on_policy import student_written
from potential_meme.spec.models import OnPolicySpec
from potential_meme.spec.plan import final_artifacts

from common import (
    HELD_OUT,
    arguments,
    corpus_documents,
    job,
    loaded,
    other_text_names,
    perplexity_cells,
    perplexity_header,
    run,
)


@torch.no_grad()
def own_writing(student: str, teacher: torch.nn.Module, rows: torch.Tensor, args) -> dict[str, float]:
    """The teacher's perplexity of the student's continuations of the prefixes of `rows`, and the mean per-token
    reverse KL(student || teacher) on them."""
    _, model = loaded(student)
    writing = OnPolicySpec(fraction=1.0, max_new_tokens=args.new_tokens)
    nll, divergence, tokens = 0.0, 0.0, 0
    for start in range(0, rows.shape[0], args.batch_size):
        written, labels = student_written(model, rows[start : start + args.batch_size], writing, seed=start)
        counted = labels != IGNORE_INDEX
        student_logits = model(written).logits[counted]
        teacher_logits = align_vocabulary(teacher(written).logits[counted], student_logits.shape[-1])
        nll += torch.nn.functional.cross_entropy(teacher_logits.float(), labels[counted], reduction="sum").item()
        divergence += token_divergence(student_logits, teacher_logits, "reverseKL", 1.0).sum().item()
        tokens += int(counted.sum())
    return {"teacherPerplexity": math.exp(nll / tokens), "reverseKL": divergence / tokens, "tokens": tokens}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=40)
    parser.add_argument("--layers", type=int, default=10, help="decoder layers of the derived student")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens the student writes after each prefix")
    args = parser.parse_args()
    student = {"fromTeacher": {"numLayers": args.layers}}
    on_policy = {"knowledge": {"onPolicy": {"fraction": 0.5, "maxNewTokens": args.new_tokens}}}
    name = f"on-policy-{args.layers}l"
    runs = {
        "lambda 0": (f"{name}-lambda0-{args.steps}", {"knowledge": {}}, args.steps),
        "lambda 0.5": (f"{name}-lambda0p5-{args.steps}", on_policy, args.steps),
    }
    metrics = {label: run(job_name, method, args, student)[-1] for label, (job_name, method, _) in runs.items()}
    seconds_per_step = metrics["lambda 0"]["trainSeconds"] / args.steps
    same_time = round(metrics["lambda 0.5"]["trainSeconds"] / seconds_per_step)
    runs["lambda 0, same time"] = (f"{name}-lambda0-{same_time}", {"knowledge": {}}, same_time)
    metrics["lambda 0, same time"] = run(*runs["lambda 0, same time"][:2], args, student, maxSteps=same_time)[-1]

    tokenizer, teacher = loaded(args.teacher)  # a derived student reads text as its teacher does
    held_out = corpus_documents(args)[HELD_OUT]
    rows = pack(held_out, tokenizer, args.seq_length, "--seq-length", max_rows=args.validation_sequences)
    scores = {
        label: own_writing(final_artifacts(job(job_name, method, args, student))["student"], teacher, rows, args)
        for label, (job_name, method, _) in runs.items()
    }
    names = other_text_names(args)
    first = metrics["lambda 0"]
    print(
        f"\n{args.layers}-layer student, {args.batch_size} x {args.seq_length} tokens a step; own writing: "
        f"{args.new_tokens} tokens after each held-out prefix, scored by the teacher"
    )
    print(f"{'':22}{'steps':>6}{'seconds':>9}{perplexity_header(names)}{'teacher ppl':>13}{'rev. KL':>9}")
    print(f"{'teacher':22}{'':15}{perplexity_cells(first, first, names, 'teacherPerplexity')}")
    for label, (_, _, steps) in runs.items():
        row, own = metrics[label], scores[label]
        cells = perplexity_cells(row, first, names, "studentPerplexityAfter")
        print(f"{label:22}{steps:6}{row['trainSeconds']:9,.0f}{cells}{own['teacherPerplexity']:13,.2f}", end="")
        print(f"{own['reverseKL']:9.3f}")
    same, half = metrics["lambda 0, same time"], metrics["lambda 0.5"]
    print(
        f"lambda 0.5 / lambda 0 at equal time: held-out perplexity "
        f"{half['studentPerplexityAfter'] / same['studentPerplexityAfter']:.3f}, own writing's reverse KL "
        f"{scores['lambda 0.5']['reverseKL'] / scores['lambda 0, same time']['reverseKL']:.3f}"
    )


if __name__ == "__main__":
    main()
