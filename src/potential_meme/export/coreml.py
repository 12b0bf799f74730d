"""Core ML `.mlpackage` (an ML program, fp32), converted from a trace; Core ML predicts on macOS alone, so on other
machines the package's declared inputs and outputs are what is checked.

coremltools converts neither the `torch.export` program nor the causal mask transformers builds inside the
forward, so the package takes the mask as an input: `causal_mask`, float32 [1, 1, n, n], 0 on and below the
diagonal and -inf above, beside `input_ids`, int32 [1, n].
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import LogitsOnly, context_length, missing

SUFFIX = ".mlpackage"


class WithCausalMask(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=causal_mask, use_cache=False).logits


def causal_mask(length: int) -> torch.Tensor:
    return torch.triu(torch.full((length, length), float("-inf")), diagonal=1)[None, None]


def _coremltools():
    try:
        import coremltools
    except ImportError:
        raise missing("coreml", "the 'export' extra (coremltools)") from None
    if tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4):
        raise missing(
            "coreml",
            f"numpy below 2.4 (coremltools {coremltools.__version__} cannot convert with numpy "
            f"{np.__version__}; the constraints file pins one)",
        )
    return coremltools


def convert(module: LogitsOnly, example: torch.Tensor, path: Path, precision: str) -> list[Path]:
    ct = _coremltools()
    length = example.shape[1]
    traced = torch.jit.trace(WithCausalMask(module.model).eval(), (example, causal_mask(length)))
    sequence = ct.RangeDim(lower_bound=2, upper_bound=context_length(module.model) - 1, default=length)
    package = ct.convert(
        traced,
        inputs=[
            ct.TensorType(name="input_ids", shape=(1, sequence), dtype=np.int32),
            ct.TensorType(name="causal_mask", shape=(1, 1, sequence, sequence), dtype=np.float32),
        ],
        outputs=[ct.TensorType(name="logits")],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )
    package.save(str(path))
    return sorted(file for file in path.rglob("*") if file.is_file())


def runner(path: Path) -> tuple[Callable | None, str]:
    ct = _coremltools()
    if platform.system() != "Darwin":
        return None, f"not run: Core ML predicts on macOS only (coremltools {ct.__version__}); interface checked"
    package = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)

    def run(ids: torch.Tensor):
        inputs = {"input_ids": ids.numpy().astype(np.int32), "causal_mask": causal_mask(ids.shape[1]).numpy()}
        return package.predict(inputs)["logits"]

    return run, f"Core ML (coremltools {ct.__version__})"


def declared(path: Path) -> dict:
    """The package's inputs and outputs as Core ML reads them (names, types, the sequence axis' range)."""
    ct = _coremltools()
    description = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description
    interface = {}
    for entry in [*description.input, *description.output]:
        array = entry.type.multiArrayType
        ranges = [[r.lowerBound, r.upperBound] for r in array.shapeRange.sizeRanges]
        interface[entry.name] = {"dataType": array.ArrayDataType.Name(array.dataType), "shapeRanges": ranges}
    return interface
