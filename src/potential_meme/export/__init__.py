"""A trained student as files a phone or an edge box runs: one module per format, each checked by running it.

Every format converts the same thing, the student's forward from token ids (batch 1, any length up to
its context) to next-token logits, and every export is run in that format's own runtime on sequences
of several lengths and compared with PyTorch's logits before it is returned. A format whose runtime
cannot run on this machine (Core ML predicts on macOS alone) has its file's declared inputs and outputs
checked instead, and says so. A format whose converter is not installed for this Python and torch raises
`ExportUnavailable` naming what to install.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..spec import SpecError
from ..spec.models import EXPORT_FORMATS

FORMATS = EXPORT_FORMATS
CHECK_LENGTHS = (5, 17, 64)  # tokens; each check sequence is cut to the model's context
LATENCY_TOKENS = 32
LATENCY_RUNS = 5
# Largest |exported - PyTorch fp32| logit allowed, as a share of the largest logit, by the precision the file
# stores: fp32 exports agree to ~1e-6, so beyond 1e-4 the graph is wrong; fp16 rounding grows through the layers
# (~1e-3 here), so only beyond 2e-2 is it more than rounding.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class ExportUnavailable(RuntimeError):
    """The converter or runtime of a format is not installed here."""


class ExportMismatch(RuntimeError):
    """An exported model, run in its runtime, does not compute the student's logits."""


@dataclass
class Exported:
    """One format's file(s) and the check that ran them."""

    format: str
    directory: Path  # where the files are; they are named relative to it
    files: list[Path]
    runtime: str  # what ran the check, with its version; or why nothing could run it here
    max_logit_difference: float | None  # largest |exported - PyTorch| over every check sequence; None: not run
    latency_ms: float | None  # median time of one forward over LATENCY_TOKENS tokens in that runtime
    check_lengths: list[int] = field(default_factory=list)
    declared: dict = field(default_factory=dict)  # a format checked without running: its declared interface
    precision: str = "fp32"  # of the weights the file stores

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "files": [str(path.relative_to(self.directory)) for path in self.files],
            "bytes": self.bytes,
            "runtime": self.runtime,
            "maxLogitDifference": self.max_logit_difference,
            "latencyMs": self.latency_ms,
            "checkLengths": self.check_lengths,
            "precision": self.precision,
            **({"declared": self.declared} if self.declared else {}),
        }


class LogitsOnly(torch.nn.Module):
    """The student's forward as the formats see it: token ids in, logits out, no cache, no dict."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def dynamic_shapes(self) -> dict:
        """The sequence axis free, up to the model's context: one export serves every prompt length."""
        return {"input_ids": {1: torch.export.Dim("sequence", min=2, max=context_length(self.model) - 1)}}


def at_precision(module: LogitsOnly, precision: str) -> LogitsOnly:
    """The module to convert for files of `precision`: itself for fp32, an fp16 copy for fp16."""
    return module if precision == "fp32" else LogitsOnly(copy.deepcopy(module.model).half()).eval()


def context_length(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def export_model(
    model: torch.nn.Module, formats: Sequence[str], output_dir: str | Path, seed: int = 0, precision: str = "fp32"
) -> dict[str, Exported]:
    """Each of `formats` written to `output_dir` (as `student.<suffix>`) with weights in `precision` (fp32 or
    fp16), and checked against PyTorch's fp32 logits."""
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise SpecError([("formats", f"{unknown or 'none'}: choose from {', '.join(FORMATS)}")], "export")
    if precision not in TOLERANCE:
        raise SpecError([("precision", f"{precision!r}: choose from {', '.join(TOLERANCE)}")], "export")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).dtype != torch.float32:  # the reference is fp32; the caller's model stays as it is
        model = copy.deepcopy(model).float()
    was_training = model.training
    module = LogitsOnly(model).eval()
    vocabulary = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    lengths = sorted({min(length, context_length(model) - 1) for length in CHECK_LENGTHS})
    checks = [torch.randint(0, vocabulary, (1, length), generator=generator) for length in lengths]
    latency_input = torch.randint(0, vocabulary, (1, min(LATENCY_TOKENS, lengths[-1])), generator=generator)
    results = {}
    try:
        for name in formats:
            converter = importlib.import_module(f".{name}", __name__)
            path = output / f"student{converter.SUFFIX}"
            with torch.no_grad():
                files = converter.convert(module, checks[0], path, precision)
            run, runtime = converter.runner(path)
            if run is None:  # this machine cannot run the format: its declared interface is what is checked
                declared = converter.declared(path)
                results[name] = Exported(name, output, files, runtime, None, None, [], declared, precision)
                continue
            results[name] = Exported(
                format=name,
                directory=output,
                files=files,
                runtime=runtime,
                max_logit_difference=_difference(module, run, checks, name, TOLERANCE[precision]),
                latency_ms=_median_ms(run, latency_input),
                check_lengths=lengths,
                precision=precision,
            )
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def _difference(
    module: torch.nn.Module, run: Callable, checks: list[torch.Tensor], name: str, tolerance: float = TOLERANCE["fp32"]
) -> float:
    worst = 0.0
    for ids in checks:
        expected = module(ids).numpy()
        got = np.asarray(run(ids), dtype=np.float32).reshape(expected.shape)
        difference = float(np.abs(got - expected).max())
        if difference > tolerance * max(1.0, float(np.abs(expected).max())):
            raise ExportMismatch(
                f"{name}: the exported model's logits differ from PyTorch's by up to {difference:.3g} on "
                f"{ids.shape[1]} tokens (largest logit {float(np.abs(expected).max()):.3g}); the export is wrong"
            )
        worst = max(worst, difference)
    return worst


def _median_ms(run: Callable, ids: torch.Tensor) -> float:
    run(ids)  # warm-up: first runs allocate and plan
    timings = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        run(ids)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def missing(format_name: str, install: str) -> ExportUnavailable:
    return ExportUnavailable(f"{format_name} export needs {install}, which is not installed here")
