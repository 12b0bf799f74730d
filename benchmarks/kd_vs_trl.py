"""Tokens per second and peak memory of the engine's KD against TRL's GKDTrainer doing the same work.

Both train the same student (the real teacher with every other layer dropped: 15 of 30, evenly
spaced) from the same teacher on the same packed rows of the standard-library corpus, with the same
batch, sequence length and number of steps, the same AdamW rate, warm-up and cosine schedule, and
the same loss: forward KL at temperature 1 against the teacher's full next-token distribution, no
hard-label term (GKD with lmbda 0, so it never generates, and beta 0; the engine's alpha 0). Each
side runs in a process of its own under the same precision, so its peak resident set (models,
optimizer state and the step's working set) is its own.

    python benchmarks/kd_vs_trl.py [--steps 20] [--precision fp32 bf16]

bf16 is autocast for both (TRL: bf16=True, its Trainer's autocast; the engine: training.precision).
Needs TRL: pip install -c constraints.txt -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time

from common import arguments, job

LAYERS = 15


def _job(args: argparse.Namespace, output: str):
    args.output = output
    return job(
        f"kd-vs-trl-{args.precision}",
        {"knowledge": {"alpha": 0.0, "temperature": 1.0, "divergence": "forwardKL"}},
        args,
        {"fromTeacher": {"numLayers": LAYERS, "layerSelection": "even"}},
        precision=args.precision,
        weightDecay=0.0,
        maxGradNorm=1.0,
        lrScheduler="cosine",
    )


def engine_side(args: argparse.Namespace) -> dict:
    from potential_meme.engine.trainer import run_job

    with tempfile.TemporaryDirectory() as output:
        metrics = run_job(_job(args, output))[-1]["metrics"]
    return {
        "tokensPerSecond": metrics["tokensPerSecond"],
        "trainSeconds": metrics["trainSeconds"],
        "peakBytes": metrics["peakMemoryBytes"],
        "finalLoss": metrics["finalLoss"],
    }


def trl_side(args: argparse.Namespace, keep_freed_memory: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from potential_meme.engine.models import evenly_spaced_layers, keep_layers, load_model, load_tokenizer, resolve
    from potential_meme.engine.runtime import freed_memory_kept
    from potential_meme.engine.sharding import peak_memory_bytes
    from potential_meme.engine.stage_setup import corpus_rows

    planned = _job(args, tempfile.mkdtemp())
    teacher_reference = resolve(planned.spec.teacher.model)
    tokenizer = load_tokenizer(teacher_reference)
    rows = corpus_rows(planned, tokenizer).train
    teacher = load_model(teacher_reference, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    student = keep_layers(teacher, evenly_spaced_layers(teacher.config.num_hidden_layers, LAYERS)).float()
    teacher.eval().requires_grad_(False)

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([example["input_ids"] for example in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class Clock(TrainerCallback):
        started = ended = losses = None

        def on_train_begin(self, *_, **__):
            self.started, self.losses = time.monotonic(), []

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

        def on_train_end(self, *_, **__):
            self.ended = time.monotonic()

    clock = Clock()
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=round(0.1 * args.steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        lmbda=0.0,
        beta=0.0,
        max_length=args.seq_length,
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    with freed_memory_kept(student.device) if keep_freed_memory else contextlib.nullcontext():
        trainer.train()
    seconds = clock.ended - clock.started
    return {
        "tokensPerSecond": round(args.steps * args.batch_size * args.seq_length / seconds, 1),
        "trainSeconds": round(seconds, 2),
        "peakBytes": peak_memory_bytes(student.device),
        "finalLoss": clock.losses[-1],
    }


def trl_keeping_freed_memory(args: argparse.Namespace) -> dict:
    """TRL with glibc's malloc set around its training as the engine sets it around its steps on a CPU
    (`freed_memory_kept`): how much of the engine's lead that setting alone makes, since any trainer could."""
    return trl_side(args, keep_freed_memory=True)


SIDES = {"engine": engine_side, "trl": trl_side, "trl-kept": trl_keeping_freed_memory}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=20)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # one side, in its own process
    args = parser.parse_args()
    args.other_text = []  # speed and memory of training: the validation passes stay small
    args.validation_sequences = 4
    if args.side:
        (args.precision,) = args.precision
        print(json.dumps(SIDES[args.side](args)))
        return
    rows = {}
    for precision in args.precision:
        for side in SIDES:
            command = [sys.executable, __file__, "--side", side, "--precision", precision]
            command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            command += ["--seq-length", str(args.seq_length), "--learning-rate", str(args.learning_rate)]
            command += ["--teacher", args.teacher]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows[(precision, side)] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{precision} {side}: {rows[(precision, side)]}", file=sys.stderr)
    tokens = args.steps * args.batch_size * args.seq_length
    print(f"\n{args.steps} steps of {args.batch_size} x {args.seq_length} tokens ({tokens:,}); student {LAYERS} layers")
    print("trl-kept: TRL with freed memory kept for reuse while it trains, as the engine keeps it around its steps")
    print(
        f"{'precision':10}{'trainer':10}{'tokens/s':>10}{'x TRL':>7}{'x kept':>8}{'peak MiB':>10}{'x TRL':>7}"
        f"{'x kept':>8}{'last loss':>11}"
    )
    for (precision, side), row in rows.items():
        trl, kept = rows[(precision, "trl")], rows[(precision, "trl-kept")]
        print(
            f"{precision:10}{side:10}{row['tokensPerSecond']:>10,.1f}"
            f"{row['tokensPerSecond'] / trl['tokensPerSecond']:>7.2f}"
            f"{row['tokensPerSecond'] / kept['tokensPerSecond']:>8.2f}"
            f"{row['peakBytes'] / 2**20:>10,.0f}{row['peakBytes'] / trl['peakBytes']:>7.2f}"
            f"{row['peakBytes'] / kept['peakBytes']:>8.2f}{row['finalLoss']:>11.4f}"
        )


if __name__ == "__main__":
    main()
