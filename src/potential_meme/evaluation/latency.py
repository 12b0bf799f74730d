"""Speed and memory of a model as it generates, measured through the generation engine.

- time to first token (the prompt's prefill and one step) and per-token decode latency at batch 1,
  p50 and p95 over several runs after a warm-up run;
- throughput (generated tokens a second) at a stated batch size;
- parameter bytes, the process's peak resident memory while generating (Linux resets the peak through
  /proc/self/clear_refs, so earlier work does not count) and, on a GPU, peak CUDA memory.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..engine.generation import Sampling, generate
from .results import Score

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _stamp(arrivals: list[float]) -> None:
    arrivals.append(time.perf_counter())


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_timings(model: Any, tokenizer: Any, new_tokens: int, runs: int) -> tuple[list[float], list[float]]:
    """Seconds to the first token of each run, and of every later decoding step, at batch 1 with the KV cache;
    each run generates exactly `new_tokens` after a warm-up run that is not counted."""
    if new_tokens < 2 or runs < 1:
        raise ValueError("latency needs at least 2 new tokens (a first and a decoded one) and 1 run")
    sampling = Sampling(max_tokens=new_tokens, min_tokens=new_tokens)
    first_token, per_token = [], []
    for run in range(runs + 1):  # the first run warms up (allocations, kernels) and is not counted
        arrivals: list[float] = []
        started = time.perf_counter()
        generate(model, tokenizer, [PROMPT], sampling, batch_size=1, on_step=partial(_stamp, arrivals))
        if run == 0:
            continue
        # arrivals[0]: the prompt is read; [1]: the first new token; then one a decoding step.
        first_token.append(arrivals[1] - started)
        per_token.extend(later - earlier for earlier, later in zip(arrivals[1:], arrivals[2:], strict=False))
    return first_token, per_token


def measure_speed(
    model: Any, tokenizer: Any, new_tokens: int = 32, runs: int = 5, batch_size: int = 8
) -> dict[str, Score]:
    """Latency at batch 1 and throughput at `batch_size`, each run generating exactly `new_tokens`."""
    first_token, per_token = decode_timings(model, tokenizer, new_tokens, runs)
    sampling = Sampling(max_tokens=new_tokens, min_tokens=new_tokens)
    started = time.perf_counter()
    generate(model, tokenizer, [PROMPT] * batch_size, sampling, batch_size=batch_size)
    throughput = batch_size * new_tokens / (time.perf_counter() - started)
    milliseconds = {"unit": "ms", "higher_is_better": False}
    return {
        "time_to_first_token_p50_ms": Score(value=1000 * statistics.median(first_token), n=runs, **milliseconds),
        "time_to_first_token_p95_ms": Score(value=1000 * _percentile(first_token, 0.95), n=runs, **milliseconds),
        "per_token_p50_ms": Score(value=1000 * statistics.median(per_token), n=len(per_token), **milliseconds),
        "per_token_p95_ms": Score(value=1000 * _percentile(per_token, 0.95), n=len(per_token), **milliseconds),
        f"throughput_batch{batch_size}_tokens_per_s": Score(
            value=throughput, n=batch_size * new_tokens, unit="tokens/s"
        ),
    }


def measure_memory(model: Any, tokenizer: Any, new_tokens: int = 32, batch_size: int = 8) -> dict[str, Score]:
    """Parameter bytes; peak resident and (on a GPU) CUDA memory while generating a batch."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resettable = _reset_peak_rss()
    generate(model, tokenizer, [PROMPT] * batch_size, Sampling(max_tokens=new_tokens), batch_size=batch_size)
    smaller = {"unit": "bytes", "higher_is_better": False}
    measured = {"parameter_bytes": Score(value=parameter_bytes, n=1, **smaller)}
    peak = _peak_rss_bytes()
    if peak is not None and resettable:
        measured["peak_rss_bytes"] = Score(value=peak, n=1, **smaller)
    if cuda:
        measured["peak_cuda_bytes"] = Score(value=torch.cuda.max_memory_allocated(), n=1, **smaller)
    return measured
