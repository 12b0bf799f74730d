"""Chunked KD loss vs a naive full-logit implementation: peak memory and time, forward + backward.

Each variant runs in a fresh process so peaks do not mix. On CPU the peak is the process'
resident-set high-water mark above the inputs (VmHWM, reset through /proc/self/clear_refs); on
CUDA it is torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/kd_loss_memory.py [--tokens 4096] [--vocab 49152 128256 152064] [--hidden 576]

The vocabularies: SmolLM2's, Llama 3's and Qwen2.5's (7B and up).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time

from potential_meme.spec.memory import tokens_per_chunk


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int) -> dict:
    import torch

    from potential_meme.engine.losses import chunked_kd_loss, reference_kd_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device="cpu").manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(device).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden, generator=generator).to(device)
    teacher_weight = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    kwargs = dict(alpha=0.5, temperature=2.0, divergence="forwardKL")

    def step():
        if variant == "naive":
            student_logits = student_hidden @ student_weight.T
            loss = reference_kd_loss(student_logits, teacher_hidden @ teacher_weight.T, labels, **kwargs)
        else:
            loss = chunked_kd_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, labels, chunk_size=chunk, **kwargs
            )[0]
        loss.backward()
        student_hidden.grad = student_weight.grad = None
        return float(loss)

    step()  # warm-up: allocator pools, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS:") * 1024
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM:") * 1024 - base
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"variant": variant, "peak_bytes": peak, "seconds": min(times), "loss": loss, "device": device.type}


def _compare(args: argparse.Namespace, vocab: int) -> tuple[float, float]:
    """Run both variants at one vocabulary, print them; returns (memory ratio, time ratio) chunked/naive."""
    results = {}
    for variant in ("naive", "chunked"):
        command = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab", str(vocab)]
        command += ["--hidden", str(args.hidden), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode == -signal.SIGKILL:
            print(f"\n{variant} at vocab {vocab:,} x {args.tokens} tokens: killed, out of memory (try fewer --tokens)")
            return math.nan, math.nan
        finished.check_returncode()
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    print(
        f"\nKD loss forward+backward, {args.tokens} tokens x vocab {vocab:,}, hidden {args.hidden}, "
        f"chunks of {tokens_per_chunk(args.chunk, vocab)} tokens (chunkSize {args.chunk}), fp32, {naive['device']}"
    )
    print(f"{'':10}{'peak MiB':>12}{'seconds':>10}{'loss':>12}")
    for name, row in results.items():
        print(f"{name:10}{row['peak_bytes'] / 2**20:12.0f}{row['seconds']:10.3f}{row['loss']:12.5f}")
    print(f"loss difference: {abs(chunked['loss'] - naive['loss']):.2e}")
    return chunked["peak_bytes"] / naive["peak_bytes"], chunked["seconds"] / naive["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4 * 1024, help="batch x sequence length")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256, 152064])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.vocab[0], args.hidden, args.chunk, args.repeats)))
        return
    ratios = {vocab: _compare(args, vocab) for vocab in args.vocab}
    print(f"\n{'vocabulary':>12}{'peak chunked/naive':>20}{'time chunked/naive':>20}   (targets <= 10 %, <= 1.0x)")
    for vocab, (memory, seconds) in ratios.items():
        print(f"{vocab:>12,}{memory:>20.1%}{seconds:>19.2f}x")


if __name__ == "__main__":
    main()
