"""ExecuTorch `.pte` (torch.export, lowered to the XNNPACK delegate); checked with ExecuTorch's runtime."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from . import LogitsOnly, at_precision, missing

SUFFIX = ".pte"


def convert(module: LogitsOnly, example: torch.Tensor, path: Path, precision: str) -> list[Path]:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise missing("executorch", "the 'export' extra (executorch)") from None
    exported = torch.export.export(at_precision(module, precision), (example,), dynamic_shapes=module.dynamic_shapes())
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    return [path]


def runner(path: Path) -> tuple[Callable, str]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return (lambda ids: method.execute([ids])[0].numpy()), f"executorch {version('executorch')} (XNNPACK)"
