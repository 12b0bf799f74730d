"""A teacher's next-token distributions kept as top-k log-probabilities, so KD can run without the teacher.

Per token the cache keeps the k most likely token ids, their log-probabilities at the job's temperature,
and the log of the probability left to all other tokens (the tail bucket). KD from the cache compares
student and teacher over those k + 1 outcomes: the student's top-k entries are its log-probabilities at
the same ids, its tail is the log-sum-exp of all its other tokens. With k equal to the vocabulary the
tail is empty and the loss is exactly the online one.

Stored, a token costs 4 + k x (1 + id bytes) bytes: the top log-probability and the tail in fp16, each
top-k log-probability as 1/16-nat steps below the top (8 bits, 16 nats deep: entries below that are
1e-7 of the top one), and ids in 2 bytes for vocabularies up to 65,536, else 3. k = 32 over SmolLM2's
49,152 words is 100 bytes a token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..spec.errors import StageError
from ..spec.models import DistillationJob
from ..spec.plan import MANIFEST
from ..storage import download_to_scratch, file_sha256, open_store, read_json_if_exists

STEPS_PER_NAT = 16  # resolution of the stored log-probabilities: +-1/32 nat, 3 % of a probability


@dataclass(frozen=True)
class TopKTargets:
    """A teacher's targets for N tokens: ids [N, k] and log-probabilities [N, k + 1] (top-k, then the tail)."""

    ids: torch.Tensor
    log_probs: torch.Tensor

    def __getitem__(self, rows: slice) -> TopKTargets:
        return TopKTargets(self.ids[rows], self.log_probs[rows])


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTargets:
    """The exact top-k targets of full logits [N, V] at `temperature` (k may be the whole vocabulary)."""
    log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top, ids = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, ids, -torch.inf).logsumexp(-1, keepdim=True)  # -inf when k is the vocabulary
    return TopKTargets(ids, torch.cat([top, rest], dim=-1))


def sampled_targets(
    teacher_logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator
) -> TopKTargets:
    """k draws a position from the teacher's distribution at `temperature`: the ids drawn, each at its share of
    the draws, and nothing in the tail. The shares estimate the distribution without bias, so forward KL's
    gradient from them (student minus shares) is the full distribution's in expectation, where top-k targets
    leave the tail's shape out for good. Slots that repeated draws leave free hold the likeliest ids not
    drawn, at the cache's floor (16 nats below the top entry)."""
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
    ids = (counts * 2 + probs).topk(k, dim=-1).indices  # drawn ids first (a count outweighs any probability)
    shares = (counts.gather(-1, ids) / k).log()
    return TopKTargets(ids, torch.cat([shares, torch.full_like(shares[:, :1], -torch.inf)], dim=-1))


def student_buckets(student_log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities [N, V] over the same k + 1 outcomes as the teacher's cached targets."""
    top = student_log_probs.gather(-1, ids)
    rest = student_log_probs.scatter(-1, ids, -torch.inf).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def id_bytes(vocabulary: int) -> int:
    if vocabulary > 2**24:
        raise ValueError(f"a vocabulary of {vocabulary:,} words is beyond the cache's 3-byte ids")
    return 2 if vocabulary <= 2**16 else 3


def bytes_per_token(k: int, vocabulary: int) -> int:
    return 4 + k * (1 + id_bytes(vocabulary))


def encode(targets: TopKTargets, vocabulary: int) -> dict[str, torch.Tensor]:
    """The compressed arrays of `targets` (uint8 and fp16 only, for safetensors)."""
    top = targets.log_probs[:, :1]
    steps = ((top - targets.log_probs[:, :-1]) * STEPS_PER_NAT).round().clamp(0, 255).to(torch.uint8)
    ids = targets.ids.to(torch.int64)
    width = id_bytes(vocabulary)
    packed = torch.stack([(ids >> (8 * byte)) & 0xFF for byte in range(width)], dim=-1).to(torch.uint8)
    return {
        "ids": packed.reshape(ids.shape[0], -1),
        "steps": steps,
        "top": top.squeeze(-1).to(torch.float16),
        "tail": targets.log_probs[:, -1].clamp_min(-65504).to(torch.float16),  # fp16's floor stands for -inf
    }


def decode(arrays: dict[str, torch.Tensor], vocabulary: int) -> TopKTargets:
    """Targets from `encode`'s arrays, renormalized over the k + 1 outcomes (rounding moved their sum off 1)."""
    width = id_bytes(vocabulary)
    packed = arrays["ids"].to(torch.int64).reshape(arrays["ids"].shape[0], -1, width)
    ids = sum(packed[..., byte] << (8 * byte) for byte in range(width))
    top = arrays["top"].float().unsqueeze(-1)
    tail = arrays["tail"].float().unsqueeze(-1)
    tail = torch.where(tail <= -65504, -torch.inf, tail)
    log_probs = torch.cat([top - arrays["steps"].float() / STEPS_PER_NAT, tail], dim=-1)
    return TopKTargets(ids, log_probs.log_softmax(-1))


# ---------------------------------------------------------------- the cache in the artifact store

SHARD_ROWS = 256  # training rows per shard file
_ARRAYS = ("ids", "steps", "top", "tail")  # what `encode` writes


def tokenizer_hash(tokenizer: Any) -> str:
    """What decides which id a token gets: the vocabulary and the special tokens."""
    described = {"vocabulary": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def rows_hash(rows: torch.Tensor) -> str:
    """The packed training rows, token for token: the same corpus, split and packing, or not."""
    digest = hashlib.sha256(str(tuple(rows.shape)).encode())
    digest.update(rows.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def shard_name(key: str, index: int) -> str:
    """Shard files carry the cache's identity: a rerun of another spec in the same folder never reuses them."""
    return f"shard-{key[:12]}-{index:05d}.safetensors"


def cache_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_identity(job: DistillationJob, tokenizer: Any, train_rows: torch.Tensor) -> dict[str, Any]:
    """What a cache's targets depend on; a distill stage reading a cache must match all of it."""
    return {
        "teacher": job.spec.teacher.model,
        "tokenizerHash": tokenizer_hash(tokenizer),
        "corpusHash": rows_hash(train_rows),
        "temperature": job.spec.method.knowledge.temperature,
    }


class CachedTeacher:
    """A cache's targets for any training rows, read from its shard files (memory-mapped, row by row)."""

    def __init__(self, manifest: dict[str, Any], folder: Path):
        cache = manifest["cache"]
        self.vocabulary, self.shard_rows = cache["vocabulary"], cache["shardRows"]
        self._shards = [safe_open(str(folder / name), framework="pt") for name in cache["shards"]]
        self.teacher_metrics = manifest["metrics"]
        # per-position shape of each array (all shards alike): read once, not on every row of every step
        self._widths = {name: tuple(self._shards[0].get_slice(name).get_shape()[2:]) for name in _ARRAYS}

    def targets(self, rows: torch.Tensor) -> TopKTargets:
        """Targets of every position of `rows` (training row indices), flattened as the loss reads them."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in _ARRAYS}
        for row in rows.tolist():
            shard, offset = divmod(row, self.shard_rows)
            for name, arrays in parts.items():
                arrays.append(self._shards[shard].get_slice(name)[offset : offset + 1].reshape(-1, *self._widths[name]))
        return decode({name: torch.cat(arrays) for name, arrays in parts.items()}, self.vocabulary)


def open_cache(uri: str, identity: dict[str, Any], field: str = "spec.teacher.cache") -> CachedTeacher:
    """The cache at `uri`, checked: made for this `identity` (teacher, tokenizer, corpus rows, temperature,
    sequence length) and whole (every shard its manifest lists, byte for byte). Refused otherwise."""
    store = open_store(uri)
    manifest = read_json_if_exists(store, MANIFEST)
    if manifest is None or "cache" not in manifest:
        raise StageError(f"{uri}: no finished teacher cache there ({field}); run the job that makes it first")
    recorded = manifest["cache"]["identity"]
    differing = sorted(key for key in identity.keys() | recorded.keys() if identity.get(key) != recorded.get(key))
    if differing:
        raise StageError(
            f"{uri}: this teacher cache was made for another {', '.join(differing)} than this job's "
            f"(cached: {', '.join(f'{k}={str(recorded.get(k))[:16]}' for k in differing)}); make a cache for this "
            f"job (teacher.cache.topK) or name the one made for it ({field})"
        )
    local = download_to_scratch(uri, "cache") if uri.startswith("s3://") else Path(store.root)
    for entry in manifest["files"]:
        path = local / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise StageError(f"{uri}{entry['path']} is missing or differs from its manifest: make the cache again")
    return CachedTeacher(manifest, local)
