"""Structured pruning to a parameter budget: whole decoder layers first, then MLP channels.

Depth: a layer whose output hidden state is nearly its input (cosine similarity close to 1 on
calibration batches) changes the model's computation least, so it goes first (the "block
influence" of Men et al., 2024, ShortGPT). Scores are measured again after every removal, because
removing one layer changes what the others see.

Width: when dropping one more layer would go below the budget, each layer keeps the MLP channels
with the largest mean |act(gate(x)) * up(x)| on the calibration batches, the same number in every
layer (Hugging Face configs have one intermediate size), just enough to fit the budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .models import check_layers_to_keep, evenly_spaced_layers, keep_layers, load_exactly, parameter_count

log = logging.getLogger(__name__)


@dataclass
class LayerSelection:
    """Which decoder layers a smaller model keeps, and the influence each dropped layer had when it went."""

    kept: list[int]
    dropped: list[tuple[int, float]] = field(default_factory=list)

    def as_metrics(self) -> dict:
        return {
            "keptLayers": self.kept,
            "droppedLayers": [{"layer": layer, "influence": round(influence, 6)} for layer, influence in self.dropped],
        }


@dataclass
class PruningReport:
    parameters_before: int
    parameters_after: int = 0
    layers_before: int = 0
    layers: LayerSelection | None = None
    intermediate_size_before: int = 0
    intermediate_size_after: int = 0

    def as_metrics(self) -> dict:
        return {
            "parametersBefore": self.parameters_before,
            "parametersAfter": self.parameters_after,
            "layersBefore": self.layers_before,
            **(self.layers.as_metrics() if self.layers else {}),
            "intermediateSizeBefore": self.intermediate_size_before,
            "intermediateSizeAfter": self.intermediate_size_after,
        }


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.base_model.layers


@torch.no_grad()
def _calibration_pass(model: PreTrainedModel, calibration: torch.Tensor, handles: list, batch_size: int) -> int:
    """Forward the calibration batches while `handles` (hooks) record; returns the token count."""
    try:
        model.eval()
        count = 0
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size]
            model.base_model(input_ids=batch, use_cache=False)
            count += batch.numel()
        return count
    finally:
        for handle in handles:
            handle.remove()


def layer_influence(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int = 4) -> list[float]:
    """1 - mean cosine(input, output) of every decoder layer's hidden state over the calibration tokens."""
    layers = decoder_layers(model)
    totals = [0.0] * len(layers)

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            totals[index] += float((1 - F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)).sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = _calibration_pass(model, calibration, handles, batch_size)
    return [total / count for total in totals]


@contextlib.contextmanager
def _only_layers(model: PreTrainedModel, kept: list[int]) -> Iterator[None]:
    """`model` runs with only the decoder layers `kept` while inside: the same modules, no copy."""
    base, config = model.base_model, model.config
    layers, count, types = base.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
    base.layers = torch.nn.ModuleList([layers[index] for index in kept])
    config.num_hidden_layers = len(kept)
    if types is not None:
        config.layer_types = [types[index] for index in kept]  # some models pick each layer's attention by it
    try:
        yield
    finally:
        base.layers, config.num_hidden_layers = layers, count
        if types is not None:
            config.layer_types = types


def least_influential_drops(model: PreTrainedModel, keep: int, calibration: torch.Tensor) -> LayerSelection:
    """Which `keep` decoder layers remain when the least influential layer is dropped, measured again after
    each drop (on the model's own modules, seen without the dropped ones: nothing is copied)."""
    check_layers_to_keep(len(decoder_layers(model)), keep)
    selection = LayerSelection(kept=list(range(len(decoder_layers(model)))))
    while len(selection.kept) > keep:
        with _only_layers(model, selection.kept):
            influence = layer_influence(model, calibration)
        drop = min(range(len(influence)), key=influence.__getitem__)
        log.info("dropping layer %d (influence %.4f)", selection.kept[drop], influence[drop])
        selection.dropped.append((selection.kept[drop], influence[drop]))
        selection.kept = [layer for position, layer in enumerate(selection.kept) if position != drop]
    return selection


def drop_least_influential_layers(
    model: PreTrainedModel, keep: int, calibration: torch.Tensor
) -> tuple[PreTrainedModel, LayerSelection]:
    """`model` with only its `keep` most influential decoder layers (a new model; `model` is left as it was)."""
    selection = least_influential_drops(model, keep, calibration)
    return keep_layers(model, selection.kept), selection


def choose_layers(
    teacher: PreTrainedModel, num_layers: int, selection: str, calibration: torch.Tensor
) -> LayerSelection:
    """Which `num_layers` decoder layers a student derived from `teacher` keeps: the most influential
    on `calibration` (selection "importance") or evenly spaced, first and last kept ("even")."""
    total = teacher.config.num_hidden_layers
    if selection == "even":
        chosen = LayerSelection(evenly_spaced_layers(total, num_layers))
    else:
        chosen = least_influential_drops(teacher, num_layers, calibration)
    log.info("student keeps teacher layers %s (%d of %d, by %s)", chosen.kept, num_layers, total, selection)
    return chosen


def channel_importance(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Mean |activation| of every MLP channel (the input of down_proj), per layer."""
    layers = decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]

    def hook(index):
        def record(module, args):
            sums[index] += args[0].detach().abs().float().sum(dim=(0, 1)).cpu()

        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    count = _calibration_pass(model, calibration, handles, batch_size)
    return [total / count for total in sums]


def keep_channels(model: PreTrainedModel, keep: int, importance: list[torch.Tensor]) -> PreTrainedModel:
    """Every layer keeps its `keep` most important MLP channels (gate/up rows, down columns)."""
    config = AutoConfig.for_model(**model.config.to_dict())
    config.intermediate_size = keep
    narrower = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = dict(model.state_dict())
    for index, scores in enumerate(importance):
        channels = torch.topk(scores, keep).indices.sort().values
        prefix = f"{model.base_model_prefix}.layers.{index}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][channels].clone()
            if f"{prefix}{name}.bias" in state:
                state[f"{prefix}{name}.bias"] = state[f"{prefix}{name}.bias"][channels].clone()
        state[f"{prefix}down_proj.weight"] = state[f"{prefix}down_proj.weight"][:, channels].clone()
    load_exactly(narrower, state)
    return narrower


def pruned_size(
    parameters: int, layer_parameters: int, layers: int, hidden_size: int, intermediate_size: int, target: int
) -> tuple[int, int]:
    """(decoder layers, MLP channels a layer) that `prune_to` keeps of a model of these counts: as many layers as
    stay within `target` parameters, then as many channels. Known from the config alone, so the strategy of a
    pruned stage is chosen before any weight is read."""
    if target >= parameters:
        raise ValueError(f"size {target:,} is not below the model's {parameters:,} parameters")
    fixed = parameters - layer_parameters * layers  # embeddings, final norm, untied lm-head
    smallest = fixed + layer_parameters - (intermediate_size - 1) * 3 * hidden_size
    if target < smallest:
        raise ValueError(
            f"size {target:,} is below the smallest prunable model ({smallest:,}: embeddings and one layer)"
        )
    depth = layers
    while depth > 1 and fixed + layer_parameters * (depth - 1) >= target:
        depth -= 1
    excess = fixed + layer_parameters * depth - target
    return depth, intermediate_size - max(0, math.ceil(excess / (3 * hidden_size * depth)))


def prune_to(model: PreTrainedModel, target: int, calibration: torch.Tensor) -> tuple[PreTrainedModel, PruningReport]:
    """A copy of `model` with at most `target` parameters (depth first, then MLP width)."""
    report = PruningReport(
        parameters_before=parameter_count(model),
        layers_before=model.config.num_hidden_layers,
        intermediate_size_before=model.config.intermediate_size,
    )
    layers = decoder_layers(model)
    depth, channels = pruned_size(
        report.parameters_before,
        sum(p.numel() for p in layers[0].parameters()),
        len(layers),
        model.config.hidden_size,
        model.config.intermediate_size,
        target,
    )
    model, report.layers = drop_least_influential_layers(model, depth, calibration)
    if channels < model.config.intermediate_size:
        log.info("keeping %d of %d MLP channels per layer", channels, model.config.intermediate_size)
        model = keep_channels(model, channels, channel_importance(model, calibration))
    report.parameters_after = parameter_count(model)
    report.intermediate_size_after = model.config.intermediate_size
    return model, report
