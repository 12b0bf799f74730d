"""KD from a teacher cache against KD from the online teacher: tokens per second, bytes per token, quality.

Two jobs train the same student (15 of the real teacher's 30 layers, chosen by importance) with the
same loss, data order and number of steps over a slice of the standard-library corpus. One runs the
teacher at every step. The other first runs it once over the slice (its cache-teacher stage: top-k
log-probabilities and ids per token plus the tail's mass, or with --targets sampled k draws from the
teacher's distribution at their shares) and then reads only the cache: the rate
every epoch after the cache is made, the first included when another job made it. Both students are
measured on the same held-out split and on text of another kind. A third job trains the same student
on the same rows with alpha 1 (plain fine-tuning: no teacher, online or cached): its rate bounds what
any cache can reach on this machine, and says what share of an online step the teacher's forward is.

With --width the student is not derived from the teacher but built at random from its config at that hidden
size (and --layers layers): a student as much smaller than its teacher as the design document's 7B is than
its 70B, which the teacher's own width and embeddings keep a derived student from being.

    python benchmarks/teacher_cache.py [--steps 60] [--characters 150000] [--top-k 32] [--targets top|sampled]
        [--temperature 1] [--layers 15] [--width W] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from potential_meme.engine.data import stdlib_documents
from potential_meme.engine.models import load_config, load_tokenizer, resolve
from potential_meme.engine.trainer import run_job

from common import arguments, corpus_dataset, job, other_text_names, perplexity_cells, perplexity_header


def corpus_slice(characters: int, output: Path) -> Path:
    """The standard-library pages of the first modules (by name) up to `characters`, one JSON line each."""
    path = output / f"stdlib-slice-{characters}.jsonl"
    if not path.exists():
        output.mkdir(parents=True, exist_ok=True)
        taken, lines = 0, []
        for document in sorted(stdlib_documents(), key=lambda document: document.group):
            if taken >= characters:
                break
            lines.append(json.dumps({"text": document.text}))
            taken += len(document.text)
        path.write_text("\n".join(lines) + "\n")
    return path


def narrow_student(teacher: str, width: int, layers: int, output: Path) -> Path:
    """A student of the teacher's architecture and tokenizer but `width` channels (heads of the teacher's size,
    one key-value head, an MLP 8/3 as wide) and `layers` layers, at random initialization: the size ratio of the
    design document's 70B -> 7B pair, which a student derived from the teacher (its width and its 28M-parameter
    embeddings kept) cannot reach."""
    path = output / f"student-w{width}-l{layers}"
    if not (path / "config.json").exists():
        reference = resolve(teacher)
        config = load_config(reference)
        head_size = config.hidden_size // config.num_attention_heads
        config.hidden_size, config.num_hidden_layers = width, layers
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = width // head_size, 1, head_size
        config.intermediate_size = round(width * 8 / 3 / 64) * 64
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        load_tokenizer(reference).save_pretrained(path)
    return path


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=60)
    parser.add_argument("--characters", type=int, default=150_000, help="size of the corpus slice")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--targets", choices=["top", "sampled"], default="top", help="teacher.cache.targets")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="of both jobs' KD (the cache keeps the top k at it)"
    )
    parser.add_argument("--layers", type=int, default=15, help="decoder layers of the student")
    parser.add_argument(
        "--width",
        type=int,
        help="train a student of this hidden size, built at random from the teacher's config, instead of one "
        "derived from the teacher (its width kept)",
    )
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="training.precision")
    args = parser.parse_args()
    output = Path(args.output).resolve()
    dataset = corpus_dataset(args) | {"source": str(corpus_slice(args.characters, output))}
    student = {"fromTeacher": {"numLayers": args.layers}}
    if args.width:
        student = {"model": str(narrow_student(args.teacher, args.width, args.layers, output))}
    method = {"knowledge": {"temperature": args.temperature}}
    runs = {}
    for name, run_name, teacher, alpha in (
        ("online", "online", {}, 0.5),
        (
            "cached",
            f"{args.targets}-k{args.top_k}",
            {"cache": {"topK": args.top_k, "targets": args.targets}},
            0.5,
        ),
        ("no-teacher", "no-teacher", {}, 1.0),
    ):
        planned = job(
            f"cache-bench-{run_name}-{args.characters // 1000}k-t{args.temperature:g}"
            + (f"-w{args.width}" if args.width else "")
            + (f"-l{args.layers}" if args.layers != 15 else "")
            + ("" if args.precision == "auto" else f"-{args.precision}"),
            {"knowledge": method["knowledge"] | {"alpha": alpha}},
            args,
            student,
            dataset,
            teacher,
            precision=args.precision,
        )
        runs[name] = {manifest["stage"]: manifest for manifest in run_job(planned)}
    online, cached = runs["online"]["distill"]["metrics"], runs["cached"]["distill"]["metrics"]
    alone = runs["no-teacher"]["distill"]["metrics"]
    cache = runs["cached"]["cache-teacher"]
    stored = sum(entry["bytes"] for entry in cache["files"])
    tokens = cache["cache"]["tokens"]
    print(f"\ncorpus slice: {tokens:,} training tokens; {args.steps} steps of {args.batch_size} x {args.seq_length}")
    print(f"cache: {args.targets} {args.top_k}, {cache['cache']['bytesPerToken']} bytes a token planned, ", end="")
    print(f"{stored / tokens:.1f} on disk ({stored:,} bytes in {len(cache['files'])} shard(s)); ", end="")
    print(f"{cache['cache']['tailMass']:.1%} of the teacher's probability in the tail bucket")
    names = other_text_names(args)
    print(f"\n{'teacher':10}{'tokens/s':>10}{'x online':>10}" + perplexity_header(names))
    for name, metrics in (("online", online), ("cached", cached)):
        rate = metrics["tokensPerSecond"]
        print(
            f"{name:10}{rate:>10,.1f}{rate / online['tokensPerSecond']:>10.2f}"
            + perplexity_cells(metrics, online, names, "studentPerplexityAfter")
        )
    held_out = cached["studentPerplexityAfter"] / online["studentPerplexityAfter"]
    print(f"\nheld-out perplexity, cached / online: {held_out:.4f}")
    bound = alone["tokensPerSecond"]
    print(
        f"no teacher at all (alpha 1): {bound:,.1f} tokens/s, {bound / online['tokensPerSecond']:.2f}x online: the "
        f"teacher's forward is {1 - online['tokensPerSecond'] / bound:.0%} of an online step here; the cache reaches "
        f"{cached['tokensPerSecond'] / bound:.0%} of the no-teacher rate"
    )


if __name__ == "__main__":
    main()
