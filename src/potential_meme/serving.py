"""`potential-meme serve MODEL`: any model the engine loads, as an OpenAI-compatible chat completions endpoint.

`POST /v1/chat/completions` (messages, max_tokens or max_completion_tokens, temperature, top_p, stop,
seed) and `GET /v1/models`. Requests that arrive while the model is busy are answered together: the
worker takes every waiting request with the same sampling settings into one batch of the generation
engine. Streaming is not offered (`stream: true` is refused with a 400 that says so). When
POTENTIAL_MEME_SERVE_API_KEY is set, requests must carry it as a bearer token.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .engine.generation import Completion, Sampling, chat_prompt, generate

log = logging.getLogger(__name__)

API_KEY_VARIABLE = "POTENTIAL_MEME_SERVE_API_KEY"


class RequestError(ValueError):
    """A request the server refuses with 400, naming the parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class _Pending:
    prompt: str
    sampling: Sampling
    future: Future


def sampling_of(body: dict[str, Any], max_tokens_limit: int) -> Sampling:
    """The request's sampling settings, checked as OpenAI's API checks them."""
    if body.get("stream"):
        raise RequestError("stream", "streaming is not supported by this server; send stream: false")
    if body.get("n", 1) != 1:
        raise RequestError("n", "only n = 1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or max_tokens_limit
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError("max_tokens", f"must be an integer from 1 to {max_tokens_limit}, got {max_tokens!r}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop", "up to 4 non-empty strings")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise RequestError("temperature", f"must be a number from 0 to 2, got {temperature!r}")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise RequestError("top_p", f"must be a number in (0, 1], got {top_p!r}")
    seed = body.get("seed") or 0
    if not isinstance(seed, int):
        raise RequestError("seed", f"must be an integer, got {seed!r}")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stop, seed=seed)


def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{index}].role", "one of system, user, assistant")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{index}].content", "a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatServer:
    """The model, its tokenizer and the batching worker behind the HTTP handler."""

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 8, max_tokens: int = 1024):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.waiting: queue.Queue[_Pending] = queue.Queue()
        self.batches = 0  # generate() calls: fewer than requests when requests were batched

    def start(self) -> ChatServer:
        """Start answering: requests made before wait in the queue."""
        threading.Thread(target=self._work, name="generation", daemon=True).start()
        return self

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        sampling = sampling_of(body, self.max_tokens)
        prompt = chat_prompt(self.tokenizer, messages_of(body))
        pending = _Pending(prompt, sampling, Future())
        self.waiting.put(pending)
        completion: Completion = pending.future.result()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }

    def _work(self) -> None:
        while True:
            first = self.waiting.get()
            batch, deferred = [first], []
            while len(batch) < self.batch_size:
                try:
                    other = self.waiting.get_nowait()
                except queue.Empty:
                    break
                (batch if other.sampling == first.sampling else deferred).append(other)
            for other in deferred:  # other settings: a batch of their own, next
                self.waiting.put(other)
            try:
                completions = generate(
                    self.model,
                    self.tokenizer,
                    [p.prompt for p in batch],
                    first.sampling,
                    batch_size=len(batch),
                    add_special_tokens=False,  # the chat template wrote its own markers
                )
                self.batches += 1
            except Exception as exc:  # answered as a 500 to each request of the batch; the server goes on
                log.exception("generation failed")
                for pending in batch:
                    pending.future.set_exception(exc)
                continue
            for pending, completion in zip(batch, completions, strict=True):
                pending.future.set_result(completion)


def _handler(server: ChatServer, api_key: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, document: dict[str, Any]) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str, param: str | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if hmac.compare_digest(given.encode(), api_key.encode()):
                return True
            self._error(401, "missing or wrong API key", "invalid_request_error")
            return False

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    200, {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "local"}]}
                )
            else:
                self._error(404, f"no route {self.path}", "invalid_request_error")

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "invalid_request_error")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not isinstance(body, dict):
                    raise RequestError("body", "a JSON object")
                self._send(200, server.complete(body))
            except json.JSONDecodeError as exc:
                self._error(400, f"the body is not JSON: {exc}", "invalid_request_error")
            except RequestError as exc:
                self._error(400, f"{exc.param}: {exc}", "invalid_request_error", exc.param)
            except ValueError as exc:  # e.g. a model without a chat template
                self._error(400, str(exc), "invalid_request_error")
            except Exception as exc:
                self._error(500, f"generation failed: {exc}", "server_error")

    return Handler


def serve(reference: str, host: str, port: int, batch_size: int, max_tokens: int, name: str | None = None) -> None:
    from .engine.models import load_model, load_tokenizer, resolve
    from .engine.runtime import default_device

    resolved = resolve(reference)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved).to(default_device()).eval()
    chat = ChatServer(model, tokenizer, name or reference, batch_size=batch_size, max_tokens=max_tokens).start()
    httpd = ThreadingHTTPServer((host, port), _handler(chat, os.environ.get(API_KEY_VARIABLE) or None))
    # The line a test or a script waits for: the address is bound and requests are answered from now on.
    print(f"serving {chat.name} on http://{host}:{httpd.server_port}/v1", flush=True)
    httpd.serve_forever()
