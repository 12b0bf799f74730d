"""ONNX through torch's dynamo exporter, sequence length dynamic; checked in onnxruntime."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from . import LogitsOnly, at_precision, missing

SUFFIX = ".onnx"


def convert(module: LogitsOnly, example: torch.Tensor, path: Path, precision: str) -> list[Path]:
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter's dependency, imported late by torch
    except ImportError:
        raise missing("onnx", "the 'export' extra (onnx, onnxscript, onnxruntime)") from None
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # a line per deduplicated weight would flood the log
    program = torch.onnx.export(
        at_precision(module, precision),
        (example,),
        dynamo=True,
        dynamic_shapes=module.dynamic_shapes(),
        input_names=["input_ids"],
        output_names=["logits"],
        verbose=False,
    )
    program.save(str(path))
    return [path] + sorted(path.parent.glob(f"{path.name}.data"))  # weights beside the graph when over 2 GB


def runner(path: Path) -> tuple[Callable, str]:
    try:
        import onnxruntime
    except ImportError:
        raise missing("onnx", "onnxruntime (the 'export' extra)") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda ids: session.run(None, {"input_ids": ids.numpy()})[0]), f"onnxruntime {onnxruntime.__version__}"
