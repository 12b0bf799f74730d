"""Sharded training (FSDP2): every decoder layer of student and teacher split over all processes.

Only the decoder layers are FSDP units. The engine runs the decoder stack and then reads the lm-head
weights outside any module's forward (the chunked KD loss, perplexity, the teacher's logits), and FSDP2
gathers a unit's parameters only inside that unit's forward. So each layer is gathered for its forward
(and again for its backward) and sharded again after, while the embeddings, final norm, lm-head and
layerwise projections stay whole on every process, their gradients averaged as DDP would. Those are a
few per cent of a large model's parameters (the memory plan counts them whole).

Rank 0 alone reads a teacher and student named by reference (`load_sharded`), or builds a student derived
from the teacher, pruned from it (progressive) or searched for (mobile): the other processes build them on
the meta device and receive their shards (`shard_from_rank0`).

A sharded run's checkpoints are written by torch.distributed.checkpoint, each process its own shards of
the student, of its optimizer state and of the best student so far (`kept_copy`), in safetensors files
whose headers say where each shard belongs (`save_shards`): no process gathers a whole student. They load
into any number of processes and either strategy (`load_shards`). The published student is gathered whole
on rank 0, as it is read whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig

from ..spec.aliases import Architecture
from ..spec.memory import DEVICE_MEMORY_ENV, MemoryPlan, plan_memory, plan_teacher_pass, quantity_bytes
from ..spec.models import DistillationJob
from .models import ResolvedModel, empty_model, load_model
from .objective import decoder
from .runtime import Runtime

log = logging.getLogger(__name__)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shape_of(config: PretrainedConfig) -> Architecture | None:
    """A Llama-family model's shape; None for other architectures (the plan then cannot judge)."""
    try:
        return Architecture.from_config(config.to_dict())
    except (KeyError, ValueError, AttributeError):
        return None


def _cgroup_limit() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def device_capacity(device: torch.device, processes_here: int) -> int | None:
    """Bytes one process may use: POTENTIAL_MEME_DEVICE_MEMORY (a quantity; the operator sets it from
    resources.gpuMemory or memory), else its GPU's memory, else this machine's (or its cgroup's) over its
    processes."""
    declared = os.environ.get(DEVICE_MEMORY_ENV)
    if declared:
        return quantity_bytes(declared)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return min(physical, _cgroup_limit() or physical) // processes_here


def plan_shapes(
    teacher: PretrainedConfig | None, student: PretrainedConfig
) -> tuple[Architecture | None, Architecture] | None:
    """The shapes the memory plan reads: the teacher's None where the stage holds none (a cache or an API's answers
    stand in for it); None altogether where a model is not Llama-family."""
    teacher_shape, student_shape = shape_of(teacher) if teacher is not None else None, shape_of(student)
    if student_shape is None or (teacher is not None and teacher_shape is None):
        return None
    return teacher_shape, student_shape


def choose_strategy(
    job: DistillationJob, shapes: tuple[Architecture | None, Architecture] | None, runtime: Runtime
) -> tuple[str, str, MemoryPlan | None]:
    """(strategy, why, estimate) of this stage, from the models' shapes (`plan_shapes`) and this device's memory."""
    if shapes is None:
        asked = job.spec.training.strategy
        return ("ddp" if asked == "auto" else asked), "the models are not Llama-family: no estimate", None
    bf16 = runtime.autocast_dtype is not None
    plan = plan_memory(job, shapes, runtime.world_size, _capacity_here(runtime), bf16)
    return plan.strategy, plan.reason, plan


def shards_teacher_pass(job: DistillationJob, teacher: PretrainedConfig, runtime: Runtime) -> bool:
    """Whether the cache-teacher stage shards the teacher: from its config and this device's memory."""
    if runtime.world_size == 1:
        return False
    shape = shape_of(teacher)
    if shape is None:
        return job.spec.training.strategy == "fsdp"
    bf16 = runtime.teacher_dtype != torch.float32
    return plan_teacher_pass(job, shape, runtime.world_size, _capacity_here(runtime), bf16)[0]


def _capacity_here(runtime: Runtime) -> int | None:
    return device_capacity(runtime.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def shard_layers(model: nn.Module, runtime: Runtime) -> None:
    """Make each decoder layer of `model` an FSDP unit over all processes (its parameters become DTensors)."""
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
        # Each layer is its own root FSDP module, and a root keeps its parameters gathered after forward
        # (for the backward that follows in training); a layer must give them back after every forward.
        layer.set_reshard_after_forward(True, recurse=False)


def shard_from_rank0(whole: nn.Module | None, empty: Callable[[], nn.Module], runtime: Runtime) -> nn.Module:
    """Rank 0's `whole` model with its decoder layers sharded over all processes. The others build it with `empty`
    (on the meta device: shapes, no memory) and receive their shards from rank 0, so a node holds one whole copy
    while a model loads, not one a process: a 70B teacher in bf16 is 140 GB once, not eight times on 8 GPUs."""
    model = whole if runtime.is_main else empty()
    own = model.state_dict()  # on the meta device, its names alone
    persistent, state = set(own), own if runtime.is_main else {}
    shard_layers(model, runtime)
    if not runtime.is_main:
        model.to_empty(device=runtime.device)
        model.tie_weights()  # to_empty gives tied parameters storage of their own
    model.to(runtime.device)
    load_full_state(model, state)
    del state
    # Buffers outside the state (the rotary frequencies) are computed when a model is built, which on the meta
    # device computes nothing: rank 0's are the right ones.
    for name, buffer in model.named_buffers():
        if name not in persistent:
            dist.broadcast(buffer, src=0)
    return model


def load_sharded(reference: ResolvedModel, config: PretrainedConfig, dtype: torch.dtype, runtime: Runtime) -> nn.Module:
    """The model at `reference` (its `config`), its decoder layers sharded over all processes, its weights read by
    rank 0 alone."""
    if not runtime.is_main:
        log.info("rank %d reads no weights of %s: its shards come from rank 0", runtime.rank, reference.directory)
    whole = load_model(reference, dtype) if runtime.is_main else None
    return shard_from_rank0(whole, lambda: empty_model(config, dtype), runtime).eval()


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The optimizer's groups of `model`'s trained parameters: sharded (DTensor) and whole ones apart, because a
    fused optimizer step takes each group in one call, and one call cannot mix the two."""
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]  # a quantized base is frozen
    sharded = [parameter for parameter in trained if isinstance(parameter, DTensor)]
    whole = [parameter for parameter in trained if not isinstance(parameter, DTensor)]
    return [{"params": group} for group in (whole, sharded) if group]


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


@contextlib.contextmanager
def gradient_sync(model: nn.Module, runtime: Runtime, last: bool) -> Iterator[None]:
    """Gradients are synchronized after the last backward of a step only (gradient accumulation): DDP's
    no_sync, FSDP units' requires_gradient_sync."""
    if runtime.world_size == 1 or last:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def average_whole_gradients(model: nn.Module, runtime: Runtime) -> None:
    """All-reduce the gradients FSDP does not own (of the parameters kept whole), in one flat buffer."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1).float() for grad in grads])
    dist.all_reduce(flat)
    flat /= runtime.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ over sharded and whole gradients: the sharded part's squares summed over processes."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [grad.to_local() for grad in grads if isinstance(grad, DTensor)]
    whole = [grad for grad in grads if not isinstance(grad, DTensor)]
    device = (sharded or whole)[0].device
    sharded_squares = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=device))
    if dist.is_initialized():
        dist.all_reduce(sharded_squares)
    whole_squares = sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    norm = (sharded_squares + whole_squares).sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in sharded:
        grad.mul_(scale.to(grad.dtype))
    for grad in whole:
        grad.mul_(scale.to(grad.dtype))
    return float(norm)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state as plain CPU tensors on rank 0 (empty elsewhere); every process must call it."""
    return get_model_state_dict(model, options=_FULL)


def _loading(model: nn.Module) -> StateDictOptions:
    # sharded: rank 0's copy is sent to the others, which may hold none (an early-stopping best); whole models
    # load on every process from the checkpoint each of them read
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_sharded(model))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A whole state (from `full_state`) into the sharded model, each process keeping its shard."""
    set_model_state_dict(model, state, options=_loading(model))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole, on rank 0: it loads into any strategy and size."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if all(isinstance(key, int) for key in state["state"]):  # an older checkpoint: by position, not by name
        optimizer.load_state_dict(state)
        return
    own_groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    state = {**state, "param_groups": _regrouped(state["param_groups"], own_groups)}
    set_optimizer_state_dict(model, optimizer, state, options=_loading(model))


def _own_shards(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This process's shards of the model's state and of the optimizer's (tensors alone), and the optimizer's
    parameter groups (plain values, parameters by name)."""
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    tensors = {"model": get_model_state_dict(model), "optimizer": optimizer_state["state"]}
    return tensors, optimizer_state["param_groups"]


def save_shards(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    folder: Path,
    best: tuple[nn.Module, dict[str, torch.Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Write this process's shards of the model and its optimizer state into `folder`, a safetensors file with
    each shard's place in its tensor (a tensor every process holds whole is written by one); returns the
    parameter groups, which are the same on every process. `best`: a module and a `kept_copy` of it (the best
    student so far), written beside them. Every process must call it."""
    state, groups = _own_shards(model, optimizer)
    if best is not None:
        module, copy = best
        state["best"] = {
            name: _placed_as(value, copy[name].to(_local(value).device))
            for name, value in get_model_state_dict(module).items()
        }
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    return groups


def _placed_as(model_tensor: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local`, this process's part of a tensor shaped and sharded as `model_tensor`, as DCP needs to place it."""
    if not isinstance(model_tensor, DTensor):
        return local
    return DTensor.from_local(
        local, model_tensor.device_mesh, model_tensor.placements, shape=model_tensor.shape, stride=model_tensor.stride()
    )


def load_shards(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    folder: Path,
    groups: list[dict[str, Any]],
    best_of: nn.Module | None = None,
) -> dict[str, torch.Tensor] | None:
    """Put the shards every process of a run wrote (`save_shards`) back into `model` and `optimizer`, each process
    reading the parts it holds, whatever the number of processes or the strategy that wrote them. `best_of`: the
    module a best copy was written of; returns that copy, as `kept_copy` would have taken it here."""
    state, own_groups = _own_shards(model, optimizer)
    if best_of is not None:
        state["best"] = {name: value.detach().clone() for name, value in get_model_state_dict(best_of).items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(
        model, optimizer, {"state": state["optimizer"], "param_groups": _regrouped(groups, own_groups)}
    )
    if best_of is None:
        return None
    return {name: _local(value).to("cpu", copy=True) for name, value in state["best"].items()}


def _regrouped(saved: list[dict[str, Any]], own: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved groups' settings over this optimizer's groups, parameters by name: fsdp keeps sharded and whole
    parameters in groups apart (`parameter_groups`), one whole model has one group."""
    settings = {name: {k: v for k, v in group.items() if k != "params"} for group in saved for name in group["params"]}
    return [{**settings[group["params"][0]], "params": group["params"]} for group in own]


def kept_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training changes in `module`, to put back with `restore_copy`: where it is sharded, this
    process's shards (no process gathers it), else `trained_state`."""
    state = get_model_state_dict(module) if is_sharded(module) else trained_state(module)
    return {name: _local(value).detach().to("cpu", copy=True) for name, value in state.items()}


def restore_copy(module: nn.Module, copy: dict[str, torch.Tensor]) -> None:
    """Put back a `kept_copy` of `module`, or a whole state (kept before a run was resized, or by a whole run)."""
    own = get_model_state_dict(module) if is_sharded(module) else None
    if own is None or any(copy[name].shape != _local(value).shape for name, value in own.items()):
        load_trained_state(module, copy)
        return
    with torch.no_grad():
        for name, value in own.items():
            _local(value).copy_(copy[name])


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in `module`: its whole state, or only the trainable parameters where some are frozen
    (a quantized student under LoRA adapters, rebuilt as it was from the stage before, so never saved twice).
    Sharded: the whole state on rank 0 as CPU tensors, empty elsewhere; every process must call it."""
    if is_sharded(module):
        return full_state(module)
    if all(parameter.requires_grad for parameter in module.parameters()):
        return module.state_dict()
    return {name: parameter.detach() for name, parameter in module.named_parameters() if parameter.requires_grad}


def load_trained_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `trained_state` back; refuses a state that leaves a trainable parameter out or names unknown ones.
    Sharded: rank 0's state is what every process loads its shard from."""
    if is_sharded(module):
        load_full_state(module, state)
        return
    if all(parameter.requires_grad for parameter in module.parameters()):
        module.load_state_dict(state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    if trainable.intersection(missing) or unexpected:
        raise RuntimeError(
            f"the saved state does not fit the model: missing {sorted(trainable.intersection(missing))[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor`: its shard, or the whole of a tensor it holds whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _local_bytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def held_bytes(modules: list[nn.Module | None], optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of the modules' parameters and gradients and of the optimizer's state (its
    shards only, where sharded): what the strategy divides, measured rather than estimated."""
    parameters = {id(p): p for module in modules if module is not None for p in module.parameters()}.values()
    total = sum(_local_bytes(p) + (_local_bytes(p.grad) if p.grad is not None else 0) for p in parameters)
    for state in optimizer.state.values():
        total += sum(_local_bytes(value) for value in state.values() if torch.is_tensor(value) and value.dim())
    return total


def peak_memory_bytes(device: torch.device) -> int:
    """The most this process has held: allocated GPU memory, or on the CPU its peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
