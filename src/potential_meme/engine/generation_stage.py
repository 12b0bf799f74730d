"""The generate stage of a response job: the teacher answers every prompt of the dataset.

The answers grow in a local JSON Lines file that is copied to the stage's store after every batch
(`partial/`), so a pod that dies loses at most the batch it was writing; its successor starts from
that copy and asks only the prompts it lacks. When every prompt is answered the file is published
with its sha256 in the manifest, and the partial copy goes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ..spec.errors import SpecError
from ..spec.models import DistillationJob
from ..spec.plan import MANIFEST, RESPONSES, Stage, stage_manifest
from ..storage import file_sha256, open_store, write_json
from .chat_api import ChatClient, ChatEndpoint
from .generation import Sampling
from .models import load_model, load_tokenizer
from .preflight import CheckedModels
from .responses import ApiTeacher, LocalTeacher, generate_responses, read_prompts
from .runtime import Runtime

log = logging.getLogger(__name__)

PARTIAL = "partial/"  # the answers so far, while the stage runs


def _teacher(job: DistillationJob, models: CheckedModels, runtime: Runtime) -> LocalTeacher | ApiTeacher:
    spec = job.spec
    endpoint = spec.teacher.endpoint
    if endpoint is not None:
        api = ChatEndpoint(
            model=spec.teacher.model,
            base_url=endpoint.base_url,
            api_key_env=endpoint.api_key_env,
            concurrency=endpoint.concurrency,
            max_retries=endpoint.max_retries,
        )
        try:
            return ApiTeacher(ChatClient(api))
        except ValueError as exc:  # OpenAI's own API without a key
            raise SpecError([("spec.teacher.endpoint.apiKeyEnv", str(exc))], job.metadata.name) from None
    model = load_model(models.teacher).to(runtime.device).eval()
    return LocalTeacher(
        model, load_tokenizer(models.teacher), spec.teacher.model, spec.method.response.generation.batch_size
    )


def run_generate_stage(job: DistillationJob, stage: Stage, runtime: Runtime, models: CheckedModels) -> dict[str, Any]:
    """Answer the dataset's prompts on the main process (the others wait) and publish the answers."""
    spec = job.spec
    generation = spec.method.response.generation
    prompts = read_prompts(spec.dataset)
    if not prompts:
        raise SpecError([("spec.dataset.source", f"{spec.dataset.source} holds no prompts")], job.metadata.name)
    manifest = None
    if runtime.is_main:
        store = open_store(stage.output_uri)
        with tempfile.TemporaryDirectory(prefix="potential-meme-responses-") as scratch:
            local = Path(scratch) / RESPONSES
            if store.exists(PARTIAL + RESPONSES):
                store.download_file(PARTIAL + RESPONSES, local)
            teacher = _teacher(job, models, runtime)
            sampling = Sampling(
                max_tokens=generation.max_new_tokens,
                temperature=generation.temperature,
                top_p=generation.top_p,
                seed=spec.training.seed,
            )
            started = time.monotonic()
            records = generate_responses(
                teacher, prompts, sampling, local, on_written=lambda: store.upload_file(local, PARTIAL + RESPONSES)
            )
            seconds = time.monotonic() - started
            written = sum(record["completion_tokens"] for record in records)
            store.upload_file(local, RESPONSES)
            manifest = stage_manifest(
                job,
                stage,
                runtime.world_size,
                metrics={
                    "prompts": len(records),
                    "cutAtMaxTokens": sum(record["finish_reason"] == "length" for record in records),
                    "promptTokens": sum(record["prompt_tokens"] for record in records),
                    "completionTokens": written,
                    "generateSeconds": round(seconds, 2),
                },
                files=[{"path": RESPONSES, "sha256": file_sha256(local), "bytes": local.stat().st_size}],
            )
        log.info("%d prompts answered, %d tokens written", len(records), written)
        write_json(store, MANIFEST, manifest)  # last: its presence marks the stage done
        store.delete_prefix(PARTIAL)
    runtime.barrier()
    return runtime.from_main(manifest)
