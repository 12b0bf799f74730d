"""The stages where the teacher writes: generate (a response job: the teacher answers every prompt of the
dataset) and augment (an augmented job: the teacher rewrites every training passage).

The answers grow in a local JSON Lines file that is copied to the stage's store as it grows
(`partial/`, every 10 s at most), so a pod that dies loses at most those seconds; its successor starts from
that copy and asks only the prompts it lacks. When every prompt is answered the file is published
with its sha256 in the manifest, and the partial copy goes.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ..spec.errors import SpecError
from ..spec.models import DistillationJob
from ..spec.plan import AUGMENTED, MANIFEST, RESPONSES, Stage, stage_manifest
from ..storage import ArtifactStore, file_sha256, open_store, write_json
from .augmentation import filter_variants, first_round, passages, second_round
from .chat_api import ChatClient, ChatEndpoint
from .data import Document, load_documents
from .generation import Sampling
from .models import load_model, load_tokenizer
from .preflight import CheckedModels
from .responses import ApiTeacher, LocalTeacher, Prompt, generate_responses, read_prompts
from .runtime import Runtime

log = logging.getLogger(__name__)

PARTIAL = "partial/"  # the answers so far, while the stage runs
COPY_EVERY_SECONDS = 10.0  # a killed stage loses at most this much of the teacher's work


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
        model, load_tokenizer(models.teacher), spec.teacher.model, spec.method.selected.generation.batch_size
    )


class StoredAnswers:
    """A responses file that grows in `scratch` and is copied to the store's partial/ as it grows: after the
    first write, then at most every `COPY_EVERY_SECONDS` (an API teacher answers many prompts a second)."""

    def __init__(self, store: ArtifactStore, scratch: Path):
        self.store, self.local = store, scratch / RESPONSES
        self.copied_at = -math.inf
        if store.exists(PARTIAL + RESPONSES):
            store.download_file(PARTIAL + RESPONSES, self.local)

    def _copy(self) -> None:
        if time.monotonic() - self.copied_at >= COPY_EVERY_SECONDS:
            self.store.upload_file(self.local, PARTIAL + RESPONSES)
            self.copied_at = time.monotonic()

    def ask(self, teacher: LocalTeacher | ApiTeacher, prompts: list[Prompt], sampling: Sampling) -> list[dict]:
        return generate_responses(teacher, prompts, sampling, self.local, on_written=self._copy)

    def publish(self, name: str, path: Path) -> dict[str, Any]:
        """Upload `path` as `name`; returns its manifest entry."""
        self.store.upload_file(path, name)
        return {"path": name, "sha256": file_sha256(path), "bytes": path.stat().st_size}

    def finish(self, manifest: dict[str, Any]) -> None:
        write_json(self.store, MANIFEST, manifest)  # last: its presence marks the stage done
        self.store.delete_prefix(PARTIAL)


def _sampling(job: DistillationJob) -> Sampling:
    generation = job.spec.method.selected.generation
    return Sampling(
        max_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        top_p=generation.top_p,
        seed=job.spec.training.seed,
    )


def _token_counts(records: list[dict]) -> dict[str, int]:
    return {
        "cutAtMaxTokens": sum(record["finish_reason"] == "length" for record in records),
        "promptTokens": sum(record["prompt_tokens"] for record in records),
        "completionTokens": sum(record["completion_tokens"] for record in records),
    }


def run_generate_stage(job: DistillationJob, stage: Stage, runtime: Runtime, models: CheckedModels) -> dict[str, Any]:
    """Answer the dataset's prompts on the main process (the others wait) and publish the answers."""
    spec = job.spec
    prompts = read_prompts(spec.dataset)
    if not prompts:
        raise SpecError([("spec.dataset.source", f"{spec.dataset.source} holds no prompts")], job.metadata.name)
    manifest = None
    if runtime.is_main:
        with tempfile.TemporaryDirectory(prefix="potential-meme-responses-") as scratch:
            answers = StoredAnswers(open_store(stage.output_uri), Path(scratch))
            started = time.monotonic()
            records = answers.ask(_teacher(job, models, runtime), prompts, _sampling(job))
            metrics = {"prompts": len(records), **_token_counts(records)}
            metrics["generateSeconds"] = round(time.monotonic() - started, 2)
            files = [answers.publish(RESPONSES, answers.local)]
            manifest = stage_manifest(job, stage, runtime.world_size, metrics=metrics, files=files)
            log.info("%d prompts answered, %d tokens written", len(records), metrics["completionTokens"])
            answers.finish(manifest)
    runtime.barrier()
    return runtime.from_main(manifest)


def training_passages(job: DistillationJob) -> list[Document]:
    """The passages an augment stage rewrites: training documents only, cut, in a fixed order, at most
    maxPassages."""
    method = job.spec.method.augmented
    train, _ = load_documents(job.spec.dataset)
    examples = passages(train, method.passage_characters)
    return examples[: method.max_passages] if method.max_passages else examples


def run_augment_stage(job: DistillationJob, stage: Stage, runtime: Runtime, models: CheckedModels) -> dict[str, Any]:
    """The teacher rewrites the training passages; the variants that pass the filters are published."""
    method = job.spec.method.augmented
    examples = training_passages(job)
    manifest = None
    if runtime.is_main:
        with tempfile.TemporaryDirectory(prefix="potential-meme-augment-") as scratch:
            answers = StoredAnswers(open_store(stage.output_uri), Path(scratch))
            teacher, sampling = _teacher(job, models, runtime), _sampling(job)
            started = time.monotonic()
            language = method.pivot_language
            records = answers.ask(teacher, first_round(examples, method.methods, method.factor, language), sampling)
            written = {record["id"]: record["response"] for record in records}
            records += answers.ask(teacher, second_round(examples, written, method.factor, language), sampling)
            written |= {record["id"]: record["response"] for record in records}
            filtered = filter_variants(
                examples,
                written,
                method.methods,
                method.factor,
                (method.shortest_share, method.longest_share),
                method.near_duplicate_similarity,
            )
            kept = Path(scratch) / AUGMENTED
            kept.write_text(
                "".join(
                    json.dumps({"group": d.group, "text": d.text}, ensure_ascii=False) + "\n" for d in filtered.kept
                )
            )
            metrics = {
                "passages": len(examples),
                "variantsKept": len(filtered.kept),
                "variants": filtered.report(),
                **_token_counts(records),
                "generateSeconds": round(time.monotonic() - started, 2),
            }
            files = [answers.publish(AUGMENTED, kept), answers.publish(RESPONSES, answers.local)]
            manifest = stage_manifest(job, stage, runtime.world_size, metrics=metrics, files=files)
            for name, counts in metrics["variants"].items():
                log.info(
                    "%s: %d written, %d kept, dropped %s", name, counts["written"], counts["kept"], counts["dropped"]
                )
            answers.finish(manifest)
    runtime.barrier()
    return runtime.from_main(manifest)
