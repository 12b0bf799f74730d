"""Helpers the tests share (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

from zygote import Forked, zygote

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


def start_command(argv: list[str], env: dict[str, str], cwd: str | Path, stdout: int, stderr: int) -> Forked:
    """`potential-meme ARGV` as a process of its own, forked from the session's zygote (tests/zygote.py)."""
    return zygote(cli_env()).start(argv, env, cwd, stdout, stderr)


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
