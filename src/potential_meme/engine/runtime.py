"""Where the engine runs: one process or a torchrun group, CPU or GPU, fp32 or bf16; held-out perplexity."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data import shifted_labels
from .losses import IGNORE_INDEX, chunked_nll
from .objective import hidden_states

BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")  # instruction sets oneDNN multiplies bf16 with


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    teacher_dtype: torch.dtype = torch.float32  # the frozen teacher's weights: it never needs fp32 master copies

    @classmethod
    def single(cls, device: torch.device) -> Runtime:
        """One process, full precision: measuring outside a training run."""
        return cls(rank=0, world_size=1, device=device, autocast_dtype=None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every process: a choice every rank must make alike (a float tie on one
        GPU must not give the ranks different models)."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, by rank, on every process."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def default_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK) where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def start_runtime(precision: str, timeout: timedelta | None = None) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1; pick device and autocast dtype.

    `timeout`: how long a collective waits for a slow process. Rank 0 uploads checkpoints and the
    student while the others wait at a barrier, so it must outlast the slowest upload.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    rank = dist.get_rank() if world_size > 1 else 0
    native_bf16 = native_bf16_matmul(device)
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and native_bf16)
    teacher_bf16 = use_bf16 or (precision == "auto" and native_bf16)
    return Runtime(
        rank,
        world_size,
        device,
        torch.bfloat16 if use_bf16 else None,
        torch.bfloat16 if teacher_bf16 else torch.float32,
    )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
# What glibc's own settings come to once a process has freed a large block (its thresholds adapt up to these);
# setting any of them by mallopt stops that adapting.
_GLIBC_SETTLED = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}


@functools.cache
def _glibc(name: str) -> Any:
    """A function of glibc's malloc, or None where the C library is another (macOS, musl). Looked up once: finding
    the library may run ldconfig."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def freed_memory_kept(device: torch.device):
    """While a CPU trains, glibc's malloc keeps freed memory for reuse instead of returning it to the system. A
    step allocates and frees tensors of tens of MB (each chunk's logits, the activations, the lm-head's gradient):
    glibc serves every block over 32 MB by mmap and unmaps it when freed, so every step page-faulted all of it in
    anew, a quarter of an fp32 KD step here (benchmarks/README.md). Served from the heap, the memory of one step
    is the next one's, since steps allocate alike (and so do the evaluations and checkpoints that recur between
    them). Only around the training loop: work that allocates unlike sizes while
    it keeps some (a cache stage collecting its shards) fragments a heap that never unmaps, and grew one past
    24 GiB. Afterwards glibc's settled defaults are back and the heap's free memory is returned."""
    mallopt = _glibc("mallopt") if device.type == "cpu" else None
    if mallopt is None or not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        yield
        return
    try:
        yield
    finally:
        for parameter, value in _GLIBC_SETTLED.items():
            mallopt(parameter, value)
        _glibc("malloc_trim")(0)


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: GPUs from Ampere on, and CPUs with AMX (Intel
    Xeon from Sapphire Rapids on: bf16 products about 4x as fast as fp32 ones) or AVX512-BF16 (AMD EPYC from
    Zen 4 on, Intel Cooper Lake: about 3x, measured on a 2-core Zen 4). Elsewhere bf16 is emulated and slower
    than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(feature) for feature in BF16_CPU_FEATURES)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    sequences: torch.Tensor,
    runtime: Runtime,
    batch_size: int,
    chunk_size: int,
    labels: torch.Tensor | None = None,
) -> float:
    """Held-out perplexity; the processes of a run each take a share of the sequences.
    `labels`: the next token of each position, where not every one counts (a response, not its prompt)."""
    was_training = model.training
    model.eval()
    labels = shifted_labels(sequences) if labels is None else labels
    shard, label_shard = (rows[runtime.rank :: runtime.world_size] for rows in (sequences, labels))
    total, count = 0.0, 0
    weight = model.get_output_embeddings().weight
    # Every process runs as many forwards as the one with the most rows (a sharded model gathers each layer
    # with all processes at once); one left with none scores a sequence whose every label is ignored.
    most_rows = -(-sequences.shape[0] // runtime.world_size)
    for start in range(0, most_rows, batch_size):
        batch, batch_labels = shard[start : start + batch_size], label_shard[start : start + batch_size]
        if batch.shape[0] == 0:
            batch, batch_labels = sequences[:1], torch.full_like(labels[:1], IGNORE_INDEX)
        with runtime.autocast():
            hidden = hidden_states(model, batch.to(runtime.device))
        nll, tokens = chunked_nll(
            hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype),
            weight,
            batch_labels.to(runtime.device).reshape(-1),
            chunk_size,
        )
        total += float(nll)
        count += tokens
    total, count = runtime.all_sum([total, float(count)])
    model.train(was_training)
    mean_nll = total / max(count, 1)
    return math.exp(mean_nll) if mean_nll < 700 else math.inf  # a diverged model, not a crash
