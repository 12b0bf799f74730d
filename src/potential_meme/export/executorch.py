"""ExecuTorch `.pte` (torch.export, lowered to the XNNPACK delegate); checked with ExecuTorch's runtime."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from . import context_length, missing

SUFFIX = ".pte"


def convert(module: torch.nn.Module, example: torch.Tensor, path: Path) -> list[Path]:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise missing("executorch", "the 'export' extra (executorch)") from None
    sequence = torch.export.Dim("sequence", min=2, max=context_length(module.model) - 1)
    exported = torch.export.export(module, (example,), dynamic_shapes={"input_ids": {1: sequence}})
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    return [path]


def runner(path: Path) -> tuple[Callable, str]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return (lambda ids: method.execute([ids])[0].numpy()), f"executorch {version('executorch')} (XNNPACK)"
