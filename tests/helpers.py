"""Helpers the tests share (conftest.py holds the fixtures)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from zygote import Forked, read_until_closed, zygote

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_llama(
    root: Path, tokenizer, hidden_size: int, layers: int, seed: int, vocab_rows: int | None = None
) -> None:
    """A randomly initialized Llama sized for tests, saved with `tokenizer` as a Hugging Face folder.
    `vocab_rows`: output rows past the tokenizer's size (padding, as many real models have)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_command(
    argv: list[str], env: dict[str, str], cwd: str | Path, stdout: int, stderr: int, script: Path | None = None
) -> Forked:
    """`potential-meme ARGV` as a process of its own, forked from the session's zygote (tests/zygote.py)."""
    return zygote(cli_env()).start(argv, env, cwd, stdout, stderr, script)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`potential-meme ARGS` as a user runs it: a process of its own, its output captured."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = start_command(list(args), cli_env(), os.getcwd(), out.fileno(), err.fileno())
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        out.seek(0)
        err.seek(0)
        text = [stream.read().decode(errors="replace") for stream in (out, err)]
    return subprocess.CompletedProcess(process.args, process.returncode, *text)


def start_cli(*args: str) -> Forked:
    """`potential-meme ARGS` started in the background, output (both streams) on its `stdout` pipe."""
    read, write = os.pipe()
    try:
        process = start_command(list(args), cli_env(), os.getcwd(), write, write)
    finally:
        os.close(write)
    process.stdout = open(read, encoding="utf-8", errors="replace")
    return process


class Ranks:
    """`potential-meme ARGV` (or `python SCRIPT ARGV`) as the N workers torchrun would start on one node,
    each forked with the environment torchrun gives them; their output, both streams, on `stdout`.
    torchrun itself is tested where it is the subject (test_ddp, the pod launcher)."""

    def __init__(self, processes: int, argv: list[str], script: Path | None = None):
        read, write = os.pipe()
        group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes)}
        group |= {"LOCAL_WORLD_SIZE": str(processes), "GROUP_RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"}
        try:
            self.members = [
                start_command(
                    argv,
                    cli_env() | group | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                    os.getcwd(),
                    write,
                    write,
                    script,
                )
                for rank in range(processes)
            ]
        finally:
            os.close(write)
        self.stdout = open(read, encoding="utf-8", errors="replace")

    @property
    def returncode(self) -> int | None:
        codes = [member.returncode for member in self.members]
        return None if None in codes else next((code for code in codes if code), 0)

    def poll(self) -> int | None:
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        output = read_until_closed(self.stdout, timeout, self.members[0].args)
        for member in self.members:
            member.wait(timeout)
        return output, None

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def wait(self, timeout: float | None = None) -> int:
        for member in self.members:
            member.wait(timeout)
        return self.returncode


class FlakyProxy:
    """In front of a real endpoint: 429 for the first requests, then 500, then passes everything on."""

    def __init__(self, upstream: str, too_many: int, failing: int):
        self.upstream, self.plan, self.seen, self.forwarded = upstream, ["429"] * too_many + ["500"] * failing, [], []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    fault = proxy.plan.pop(0) if proxy.plan else None
                proxy.seen.append(fault or "ok")
                if fault is not None:
                    data = json.dumps({"error": {"message": f"injected {fault}", "type": "server_error"}}).encode()
                    self.send_response(int(fault))
                    self.send_header("Retry-After", "0")
                else:
                    proxy.forwarded.append(json.loads(body))
                    request = urllib.request.Request(
                        proxy.upstream + self.path.removeprefix("/v1"),
                        data=body,
                        headers={"Content-Type": "application/json"},
                    )
                    with urllib.request.urlopen(request, timeout=120) as response:
                        data = response.read()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()


def serve(model_dir, *options) -> tuple[Forked, str]:
    """`potential-meme serve MODEL` on a free port: (its process, its base URL)."""
    server = start_cli("serve", str(model_dir), "--port", "0", *options)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if line.startswith("serving "):
            return server, line.split(" on ", 1)[1].strip()
        if not line and server.poll() is not None:
            break
    server.kill()
    raise AssertionError(f"serve did not start: {line!r}")


def config_of(shape, config_class=None, **more):
    """The transformers config (LlamaConfig unless given) of a Llama-family `shape` (spec.aliases.Architecture)."""
    from transformers import LlamaConfig

    return (config_class or LlamaConfig)(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tied_embeddings,
        **more,
    )
