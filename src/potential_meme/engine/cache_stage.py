"""The cache-teacher stage: the teacher runs once over the training corpus and its top-k targets are stored.

Shards of SHARD_ROWS rows are written as they are done (each process takes every world-size-th one), so
a stopped stage resumes at the first missing shard. The manifest records what the cache was made for;
a distill stage reading it checks that against its own teacher, tokenizer, rows and temperature.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..spec.errors import SpecError
from ..spec.memory import tokens_per_chunk
from ..spec.models import DistillationJob
from ..spec.plan import MANIFEST, Stage, stage_manifest
from ..storage import file_sha256, open_store, read_json, write_json
from .models import load_config, load_model, load_tokenizer
from .objective import hidden_states
from .preflight import CheckedModels
from .runtime import Runtime, perplexity
from .sharding import load_sharded, shards_teacher_pass
from .stage_setup import corpus_rows, validation_rows
from .teacher_cache import (
    SHARD_ROWS,
    TopKTargets,
    bytes_per_token,
    cache_identity,
    cache_key,
    encode,
    sampled_targets,
    shard_name,
    top_k_targets,
)

log = logging.getLogger(__name__)


def _record(shard: str) -> str:
    """Where a shard's size and sha256 go once it is uploaded whole: a shard without it is made again."""
    return shard.removesuffix(".safetensors") + ".json"


@torch.no_grad()
def _shard_arrays(
    teacher, rows: torch.Tensor, select: Callable[[torch.Tensor], TopKTargets], vocabulary: int, runtime: Runtime, spec
):
    """The encoded targets `select` takes from the logits of `rows`, batch by batch, the lm-head applied chunk by
    chunk."""
    weight = teacher.get_output_embeddings().weight
    parts: list[dict[str, torch.Tensor]] = []
    chunk = tokens_per_chunk(spec.method.knowledge.chunk_size, weight.shape[0])
    for start in range(0, rows.shape[0], spec.training.batch_size):
        batch = rows[start : start + spec.training.batch_size].to(runtime.device)
        with runtime.autocast():
            hidden = hidden_states(teacher, batch)
        flat = hidden.reshape(-1, hidden.shape[-1])
        for offset in range(0, flat.shape[0], chunk):
            # past the tokenizer's words a teacher's rows are padding no text contains
            logits = (flat[offset : offset + chunk] @ weight.T)[:, :vocabulary]
            parts.append(encode(select(logits.float().cpu()), vocabulary))
    length = rows.shape[1]
    return {
        name: torch.cat([part[name] for part in parts]).reshape(rows.shape[0], length, *parts[0][name].shape[1:])
        for name in parts[0]
    }


def run_cache_stage(job: DistillationJob, stage: Stage, runtime: Runtime, models: CheckedModels) -> dict[str, Any]:
    spec = job.spec
    k, temperature = spec.teacher.cache.top_k, spec.method.knowledge.temperature
    tokenizer = load_tokenizer(models.teacher)
    rows = corpus_rows(job, tokenizer)
    vocabulary = len(tokenizer)
    if k > vocabulary:
        raise SpecError([("spec.teacher.cache.topK", f"{k} is more than the {vocabulary:,} words of the tokenizer")])
    identity = cache_identity(job, tokenizer, rows.train)
    sampled = spec.teacher.cache.targets == "sampled"
    made = {"topK": k, "seqLength": spec.training.max_seq_length} | ({"targets": "sampled"} if sampled else {})
    key = cache_key(identity | made)
    config = load_config(models.teacher)
    sharded = shards_teacher_pass(job, config, runtime)
    if sharded:
        teacher = load_sharded(models.teacher, config, runtime.teacher_dtype, runtime)
    else:
        teacher = load_model(models.teacher, dtype=runtime.teacher_dtype).to(runtime.device)
    teacher.eval().requires_grad_(False)
    if runtime.is_main:
        log.info(
            "teacher cache: the teacher %s", f"sharded over {runtime.world_size} processes" if sharded else "whole"
        )
    store = open_store(stage.output_uri)
    shards = [shard_name(key, index) for index in range(-(-rows.train.shape[0] // SHARD_ROWS))]
    mine = [index for index in range(len(shards)) if index % runtime.world_size == runtime.rank]
    done = [index for index in mine if store.exists(_record(shards[index]))]  # a shard's record comes after it
    if done:
        log.info("teacher cache: %d of this process's %d shards already written: resuming", len(done), len(mine))
    todo = [index for index in mine if index not in done]
    batch = spec.training.batch_size
    forwards = sum(-(-rows.train[index * SHARD_ROWS : (index + 1) * SHARD_ROWS].shape[0] // batch) for index in todo)
    # Each forward of a sharded teacher gathers every layer from all processes at once: all run as many as the
    # busiest, which every process must know before its first forward.
    most = max(runtime.gather(forwards)) if sharded else forwards
    for index in tqdm(todo, desc=f"{job.metadata.name}/{stage.name}", unit="shard", disable=not runtime.is_main):
        chunk = rows.train[index * SHARD_ROWS : (index + 1) * SHARD_ROWS]
        if sampled:  # seeded by the shard: the same draws whichever process makes it, and when it is made again
            draws = torch.Generator().manual_seed(spec.training.seed * 100_003 + index)
            select = functools.partial(sampled_targets, k=k, temperature=temperature, generator=draws)
        else:
            select = functools.partial(top_k_targets, k=k, temperature=temperature)
        arrays = _shard_arrays(teacher, chunk, select, vocabulary, runtime, spec)
        with tempfile.TemporaryDirectory(prefix="potential-meme-cache-") as tmp:
            path = Path(tmp) / shards[index]
            save_file({name: array.contiguous() for name, array in arrays.items()}, str(path))
            store.upload_file(path, shards[index])
            record = {
                "path": shards[index],
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "tokens": arrays["tail"].numel(),
                "tailMass": float(arrays["tail"].float().exp().mean()),
            }
            write_json(store, _record(shards[index]), record)
    with torch.no_grad(), runtime.autocast():
        for _ in range(most - forwards):
            hidden_states(teacher, rows.train[:1].to(runtime.device))
    teacher_metrics = {"teacherPerplexity": perplexity(
        teacher, rows.validation, runtime, spec.training.batch_size, spec.method.knowledge.chunk_size
    )}  # fmt: skip
    elsewhere = {
        name: {"teacherPerplexity": perplexity(teacher, sequences, runtime, spec.training.batch_size, 256)}
        for name, sequences in validation_rows(job, tokenizer).items()
    }
    runtime.barrier()
    manifest = stage_manifest(
        job,
        stage,
        runtime.world_size,
        metrics={**teacher_metrics, **({"validationSets": elsewhere} if elsewhere else {})},
        cache={
            "identity": identity,
            "topK": k,
            "targets": spec.teacher.cache.targets,
            "vocabulary": vocabulary,
            "shardRows": SHARD_ROWS,
            "shards": shards,
            "rows": rows.train.shape[0],
            "tokens": rows.train.numel(),
            "bytesPerToken": bytes_per_token(k, vocabulary),
        },
    )
    if runtime.is_main:
        manifest["files"] = files = [read_json(store, _record(name)) for name in shards]
        tail = sum(entry["tailMass"] * entry["tokens"] for entry in files) / sum(entry["tokens"] for entry in files)
        manifest["cache"]["tailMass"] = round(tail, 4)
        write_json(store, MANIFEST, manifest)
        kept = f"{k} draws a position" if sampled else f"top {k}, {100 * tail:.1f} % of the probability outside"
        log.info(
            "teacher cache: %d rows, %d tokens, %s, %d bytes a token, in %s",
            rows.train.shape[0],
            rows.train.numel(),
            kept,
            bytes_per_token(k, vocabulary),
            stage.output_uri,
        )
        if tail > 0.5:  # the student then learns most of the distribution as one bucket, its shape its own
            log.warning(
                "most of the teacher's probability (%.0f %%) is outside the cached top %d at temperature %g: "
                "set spec.teacher.cache.targets sampled (which keeps the tail's shape in expectation), raise "
                "topK or lower spec.method.knowledge.temperature (the softer the distribution, the more of it "
                "the tail holds)",
                100 * tail,
                k,
                temperature,
            )
    runtime.barrier()
    return manifest
