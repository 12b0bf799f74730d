"""TFLite through Google's PyTorch converter (litert-torch), checked in the LiteRT interpreter (ai-edge-litert).

Both pin versions below what potential-meme needs (pydantic 2.11, typing_extensions 4.12), so they usually live in
an environment of their own: `POTENTIAL_MEME_TFLITE_PYTHON` names its Python, and conversion and the checks run
there (`litert_worker.py`); without it, this Python is used when it has them. The graph has a fixed length
(litert-torch 0.10 cannot lower a dynamic one): `LENGTH` tokens, capped at the context, and a prompt of fewer is
right-padded, which a causal model's logits for the prompt's own positions never see.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import LogitsOnly, context_length, missing
from .litert_worker import receive, send

SUFFIX = ".tflite"
LENGTH = 256
PYTHON = "POTENTIAL_MEME_TFLITE_PYTHON"
WORKER = Path(__file__).with_name("litert_worker.py")


def _python() -> str:
    chosen = os.environ.get(PYTHON)
    if chosen:  # a relative path names a file from here, while the worker runs in a scratch folder
        return os.path.abspath(chosen) if os.sep in chosen else chosen
    if importlib.util.find_spec("litert_torch") and importlib.util.find_spec("ai_edge_litert"):
        return sys.executable
    raise missing(
        "tflite",
        "litert-torch and ai-edge-litert; they pin pydantic 2.11 and typing_extensions 4.12, below this package's "
        f"needs, so install them in an environment of their own (pip install torch==2.13.0 litert-torch==0.10.0 "
        f"ai-edge-litert==2.3.0) and set {PYTHON} to its python",
    )


def _worker(*arguments: str) -> list[str]:
    # -c, not the file's path: the export folder on sys.path would shadow the onnx package with onnx.py
    return [_python(), "-c", WORKER.read_text(), *arguments]


def convert(module: LogitsOnly, example: torch.Tensor, path: Path, precision: str) -> list[Path]:
    length = min(LENGTH, context_length(module.model) - 1)
    with tempfile.TemporaryDirectory(prefix="potential-meme-tflite-") as tmp:
        module.model.save_pretrained(tmp)
        done = subprocess.run(
            _worker("convert", tmp, str(path.resolve()), str(length), precision),
            capture_output=True,
            text=True,
            cwd=tmp,
        )
    if done.returncode != 0:
        raise RuntimeError(f"litert-torch could not convert the student: {done.stderr.strip()[-2000:]}")
    return [path]


def runner(path: Path) -> tuple[Callable, str]:
    server = subprocess.Popen(
        _worker("serve", str(path.resolve())), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )

    def run(ids: torch.Tensor):
        send(server.stdin, ids.numpy().astype(np.int32))
        return receive(server.stdout)

    weakref.finalize(run, _stop, server)  # the interpreter's process ends with the last use of `run`
    where = "this environment" if _python() == sys.executable else f"{PYTHON}'s environment"
    return run, f"LiteRT interpreter (ai-edge-litert, in {where}; latency includes the pipe to it)"


def _stop(server: subprocess.Popen) -> None:
    server.stdin.close()  # end of input: the worker returns
    server.wait(timeout=60)
