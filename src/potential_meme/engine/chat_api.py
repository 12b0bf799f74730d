"""A model behind an OpenAI-compatible chat completions endpoint ("gpt-4", or any model with a base URL):
the MT-Bench judge, and API teachers.

The official `openai` client does the HTTP: it retries 429, 5xx, timeouts and dropped connections with
exponential backoff and jitter (honouring Retry-After). Here: a concurrency limit, a cache of answers
on disk (a rerun asks nothing it asked before), and the key, read from an environment variable (a
Kubernetes Secret becomes one), kept out of every log, status and file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .generation import Completion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatEndpoint:
    model: str
    base_url: str | None = None  # None: OpenAI's own API
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key; its value is never stored
    concurrency: int = 4
    max_retries: int = 8
    timeout_seconds: float = 600.0


@dataclass(frozen=True)
class ChatRequest:
    user: str
    system: str | None = None
    temperature: float = 0.0
    max_tokens: int = 1024

    def key(self, model: str) -> str:
        fields = [model, self.system, self.user, self.temperature, self.max_tokens]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class ChatClient:
    def __init__(self, endpoint: ChatEndpoint, cache_file: Path | None = None):
        from openai import OpenAI

        key = os.environ.get(endpoint.api_key_env)
        if not key and endpoint.base_url is None:
            raise ValueError(f"the OpenAI API needs a key: set {endpoint.api_key_env} (from a Secret in a cluster)")
        self.endpoint = endpoint
        self.client = OpenAI(
            base_url=endpoint.base_url,
            api_key=key or "unused",  # a local endpoint may take none; the client insists on some value
            max_retries=endpoint.max_retries,
            timeout=endpoint.timeout_seconds,
        )
        self.cache_file = cache_file
        self.cached: dict[str, str] = {}
        self.asked = 0  # requests sent (not answered from the cache)
        self._lock = threading.Lock()
        if cache_file is not None and cache_file.exists():
            for line in cache_file.read_text(encoding="utf-8").splitlines():
                if line.strip():  # a line cut short by a crash is skipped, and asked again
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.cached[entry["key"]] = entry["answer"]

    def complete(self, request: ChatRequest) -> Completion:
        """One answer from the endpoint, with why it ended and its token counts (no cache)."""
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + [
            {"role": "user", "content": request.user}
        ]
        response = self.client.chat.completions.create(
            model=self.endpoint.model,
            messages=messages,
            temperature=request.temperature,
            max_tokens=request.max_tokens,
        )
        choice, usage = response.choices[0], response.usage
        with self._lock:
            self.asked += 1
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    def complete_each(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[int, Completion]]:
        """(index, answer) of every request as each arrives, at most `concurrency` in flight."""
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency) as pool:
            futures = {pool.submit(self.complete, request): index for index, request in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:  # a failed request or a caller that stops early: nothing more is sent
                for future in futures:
                    future.cancel()

    def ask(self, request: ChatRequest) -> str:
        key = request.key(self.endpoint.model)
        if key in self.cached:
            return self.cached[key]
        answer = self.complete(request).text
        with self._lock:
            self.cached[key] = answer
            if self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_file.open("a", encoding="utf-8") as cache:
                    cache.write(json.dumps({"key": key, "answer": answer}) + "\n")
        return answer

    def ask_all(self, requests: Sequence[ChatRequest], progress: str | None = None) -> list[str]:
        """Answers in the requests' order, at most `concurrency` requests in flight."""
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency) as pool:
            answers = pool.map(self.ask, requests)
            return list(tqdm(answers, total=len(requests), desc=progress, disable=progress is None))
