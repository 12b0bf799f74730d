"""Choosing a mobile student by measurement: architectures derived from the teacher (fewer decoder layers, narrower
MLPs) are built, their weight bytes counted and their decode latency and energy per token measured on this
machine; the one within both targets that the job's `optimizeFor` prefers is distilled.

Weight bytes are the built model's unique tensors at each export precision (fp32: 4 bytes a parameter, fp16: 2;
the export stage reports each file's own size). Latency is the median per-token decode step at batch 1 with the KV
cache, through the generation engine in PyTorch fp32 on this CPU (PyTorch's CPU fp16 kernels say nothing of a
phone's): the machine the job runs on stands in for the device, and one measurement serves both precisions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic.alias_generators import to_camel
from transformers import PreTrainedModel

from ..spec.errors import SpecError
from ..spec.models import MobileMethod
from .models import evenly_spaced_layers, keep_layers
from .pruning import keep_channels

log = logging.getLogger(__name__)

DEPTH_SHARES = (0.75, 0.5, 1 / 3, 0.25, 1 / 6, 0.1)  # of the teacher's decoder layers
WIDTH_SHARES = (1.0, 0.5, 0.25)  # of its MLP channels
NEAR_THE_LARGEST = 0.9  # candidates within 10 % of the largest fitting one are the choice's contenders
DECODE_TOKENS, DECODE_RUNS = 16, 3
RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
FIELD = "spec.method.mobile"


BYTES_PER_PARAMETER = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class Candidate:
    layers: int
    mlp_width: int
    precision: str
    parameters: int
    weight_bytes: int
    latency_ms: float  # median per-token decode step
    energy_per_token: float  # in `EnergyMeter.unit`
    fits: bool

    def as_metrics(self) -> dict[str, Any]:
        return {to_camel(key): value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class EnergyMeter:
    unit: str
    read: Callable[[], float]


def energy_meter() -> EnergyMeter:
    """The package's RAPL energy counter where this machine lets us read it, else the process's CPU time (all
    threads): on a phone, energy follows the CPU time a token takes."""
    try:
        RAPL_ENERGY.read_text()
        return EnergyMeter("joules (RAPL package energy)", lambda: int(RAPL_ENERGY.read_text()) / 1e6)
    except (OSError, ValueError):
        return EnergyMeter("CPU-seconds (all threads; no readable RAPL energy counter here)", time.process_time)


def unique_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors, a tied lm-head counted once (as the formats store it)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def narrowed(model: PreTrainedModel, width: int, importance: list[torch.Tensor] | None = None) -> PreTrainedModel:
    """`model` with `width` MLP channels a layer: the most active ones, or (no `importance`: shapes alone matter,
    as when timing a candidate) the first ones."""
    if width >= model.config.intermediate_size:
        return model
    if importance is None:
        importance = [torch.arange(model.config.intermediate_size, 0, -1, dtype=torch.float32)] * len(
            model.base_model.layers
        )
    return keep_channels(model, width, importance)


def _measure(model: PreTrainedModel, tokenizer: Any, meter: EnergyMeter) -> tuple[float, float]:
    from ..evaluation.latency import decode_timings

    started = meter.read()
    _, per_token = decode_timings(model, tokenizer, DECODE_TOKENS, DECODE_RUNS)
    spent = meter.read() - started  # the warm-up run included: it decodes as many tokens
    median = sorted(per_token)[len(per_token) // 2]
    return 1000 * median, spent / (DECODE_TOKENS * (DECODE_RUNS + 1))


def candidates(teacher: PreTrainedModel, tokenizer: Any, method: MobileMethod) -> tuple[list[Candidate], str]:
    """Every derived architecture, built and measured; and the energy unit."""
    total, width = teacher.config.num_hidden_layers, teacher.config.intermediate_size
    depths = sorted({max(1, round(total * share)) for share in DEPTH_SHARES} - {total}, reverse=True)
    widths = sorted({max(1, round(width * share)) for share in WIDTH_SHARES}, reverse=True)
    meter, measured = energy_meter(), []
    for layers in depths:
        deeper = keep_layers(teacher, evenly_spaced_layers(total, layers)).eval()
        for channels in widths:
            model = narrowed(deeper, channels)
            latency, energy = _measure(model, tokenizer, meter)
            fp32_bytes = unique_weight_bytes(model)
            for precision in method.precisions:
                size = fp32_bytes * BYTES_PER_PARAMETER[precision] // BYTES_PER_PARAMETER["fp32"]
                measured.append(
                    Candidate(
                        layers=layers,
                        mlp_width=channels,
                        precision=precision,
                        parameters=sum(p.numel() for p in model.parameters()),
                        weight_bytes=size,
                        latency_ms=round(latency, 3),
                        energy_per_token=energy,
                        fits=size <= method.target_size_mb * 1e6 and latency <= method.target_latency_ms,
                    )
                )
                log.info(
                    "candidate %d layers x %d MLP channels, %s: %.1f MB, %.2f ms a token, %.4g %s a token%s",
                    layers,
                    channels,
                    precision,
                    size / 1e6,
                    latency,
                    energy,
                    meter.unit.split(" ")[0],
                    "" if measured[-1].fits else " (outside the targets)",
                )
    return measured, meter.unit


def choose(measured: list[Candidate], method: MobileMethod, job_name: str) -> Candidate:
    """The most parameters within both targets; among those near the most, what `optimizeFor` prefers."""
    fitting = [candidate for candidate in measured if candidate.fits]
    if not fitting:
        smallest = min(measured, key=lambda c: c.weight_bytes)
        fastest = min(measured, key=lambda c: c.latency_ms)
        raise SpecError(
            [
                (
                    FIELD,
                    f"no student derived from the teacher fits {method.target_size_mb:g} MB and "
                    f"{method.target_latency_ms:g} ms a token on this machine: the smallest reaches "
                    f"{smallest.weight_bytes / 1e6:.1f} MB ({smallest.layers} layers x {smallest.mlp_width} MLP "
                    f"channels, {smallest.precision}) and the fastest {fastest.latency_ms:.2f} ms "
                    f"({fastest.layers} layers x {fastest.mlp_width}); raise targetSizeMb or targetLatencyMs",
                )
            ],
            job_name,
        )
    largest = max(candidate.parameters for candidate in fitting)
    contenders = [candidate for candidate in fitting if candidate.parameters >= NEAR_THE_LARGEST * largest]
    preference: dict[str, Callable[[Candidate], float]] = {
        "accuracy": lambda c: -c.parameters,
        "latency": lambda c: c.latency_ms,
        "size": lambda c: c.weight_bytes,
        "battery_efficiency": lambda c: c.energy_per_token,
    }
    # ties (one architecture at two precisions measures alike) go to the more precise one, except for size
    more_precise = {precision: rank for rank, precision in enumerate(BYTES_PER_PARAMETER)}
    return min(contenders, key=lambda c: (preference[method.optimize_for](c), more_precise[c.precision]))


def search(teacher: PreTrainedModel, tokenizer: Any, method: MobileMethod, job_name: str) -> dict[str, Any]:
    """The chosen architecture with every measurement that chose it (the stage's facts)."""
    measured, unit = candidates(teacher, tokenizer, method)
    chosen = choose(measured, method, job_name)
    log.info(
        "mobile student: %d layers x %d MLP channels, %s (%.1f MB, %.2f ms a token), chosen for %s among %d of %d "
        "candidates within %g MB and %g ms",
        chosen.layers,
        chosen.mlp_width,
        chosen.precision,
        chosen.weight_bytes / 1e6,
        chosen.latency_ms,
        method.optimize_for,
        sum(c.fits for c in measured),
        len(measured),
        method.target_size_mb,
        method.target_latency_ms,
    )
    return {
        "architecture": chosen.as_metrics(),
        "optimizeFor": method.optimize_for,
        "energyUnit": unit,
        "candidates": [candidate.as_metrics() for candidate in measured],
    }
