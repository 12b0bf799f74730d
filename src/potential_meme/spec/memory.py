"""How many bytes a training stage holds on each device, estimated from the models' shapes before any pod starts.

Per device: the student's fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), the
frozen teacher in the compute precision, the activations the backward pass keeps for one batch, and
the chunked KD loss's working set. Shapes come from the model alias table or a local config.json, so
the operator and `potential-meme render` can tell that a job cannot fit before it holds a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .aliases import Architecture, lookup
from .models import DistillationJob, EvaluationJob, KnowledgeMethod, ResourcesSpec, TrainingSpec

FP32, BF16 = 4, 2
STUDENT_BYTES_PER_PARAMETER = FP32 * 4  # weights, gradients and AdamW's two moments, all fp32
HEADROOM = 0.85  # of a device's memory: the rest is the CUDA context, allocator fragmentation and the data loader
KD_CHUNK_ARRAYS = 4  # chunk logits of student and teacher, their gradient and the softmax in the chunked loss


def architecture_of(reference: str) -> Architecture | None:
    """A model's shape without loading it: from the alias table or a local folder's config.json; None if unknown."""
    alias = lookup(reference)
    if alias is not None:
        return alias.architecture
    config = Path(reference.removeprefix("file://")).expanduser() / "config.json"
    if config.is_file():
        try:
            return Architecture.from_config(json.loads(config.read_text()))
        except (KeyError, ValueError):
            return None  # not a Llama-family config: its size is found when the stage loads it
    return None


def activation_elements_per_token(shape: Architecture, gradient_checkpointing: bool) -> int:
    """Elements the backward pass keeps per token: per decoder layer about eight hidden-sized tensors (residual
    inputs, normed inputs, q before and after rotary, attention output), three key/value-sized ones and the gated
    MLP's four intermediates, as counted from what autograd saves in transformers' Llama with SDPA attention;
    with gradient checkpointing only each layer's input, plus one layer's set while it is recomputed."""
    hidden, kv, mlp = shape.hidden_size, shape.kv_size, shape.intermediate_size
    per_layer = 8 * hidden + 3 * kv + 4 * mlp
    if gradient_checkpointing:
        return shape.num_layers * hidden + per_layer
    return shape.num_layers * per_layer


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one training process holds, by what holds them."""

    student: int  # weights, gradients and optimizer state
    teacher: int
    activations: int

    @property
    def total(self) -> int:
        return self.student + self.teacher + self.activations


def device_memory(
    teacher: Architecture, student: Architecture, training: TrainingSpec, method: KnowledgeMethod, bf16: bool
) -> DeviceMemory:
    """What one data-parallel process holds: a full student with its optimizer and a full teacher."""
    tokens = training.batch_size * training.max_seq_length
    activation_bytes = BF16 if bf16 else FP32
    stored = activation_elements_per_token(student, training.gradient_checkpointing) * tokens * activation_bytes
    # the teacher runs without autograd: its last hidden states stay, one layer's working set comes and goes
    teacher_states = tokens * teacher.hidden_size * activation_bytes
    teacher_working = activation_elements_per_token(teacher.derived(1, None), False) * tokens * activation_bytes
    loss = KD_CHUNK_ARRAYS * min(method.chunk_size, tokens) * max(student.vocab_size, teacher.vocab_size) * FP32
    return DeviceMemory(
        student=student.parameters * STUDENT_BYTES_PER_PARAMETER,
        teacher=teacher.parameters * (BF16 if bf16 else FP32),
        activations=stored + teacher_states + teacher_working + loss,
    )


_QUANTITY_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
_QUANTITY_UNITS["Ti"] = 2**40


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity ("80Gi", "512M") in bytes."""
    number = quantity.rstrip("kmKMGTi")
    return int(float(number) * _QUANTITY_UNITS[quantity[len(number) :]])


def device_capacity(resources: ResourcesSpec) -> int | None:
    """Bytes of one training process's device: a GPU's memory, or on CPU the pod's (one process a pod)."""
    declared = resources.gpu_memory if resources.gpus_per_node else resources.memory
    return None if declared is None else quantity_bytes(declared)


def binary_size(count: float) -> str:
    return f"{count / 2**30:,.1f} GiB" if count >= 2**30 else f"{count / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    per_device: DeviceMemory
    capacity: int | None  # bytes of one device (a GPU, or a pod's memory on CPU); None: not declared

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.per_device.total <= HEADROOM * self.capacity

    def describe(self) -> str:
        need = self.per_device
        parts = (
            f"{binary_size(need.total)} per device: student with optimizer state {binary_size(need.student)}, "
            f"teacher {binary_size(need.teacher)}, activations {binary_size(need.activations)}"
        )
        if self.capacity is None:
            return parts + " (device memory not declared: set resources.gpuMemory, or resources.memory on CPU)"
        usable = binary_size(HEADROOM * self.capacity)
        verdict = "fits" if self.fits else "does not fit"
        return f"{parts}; {verdict} in {usable} usable of {binary_size(self.capacity)}"


def memory_plan(job: DistillationJob) -> MemoryPlan | None:
    """The per-device estimate of the job's first training stage; None when a model's shape is not known
    before it loads (a hub id missing from the alias table, a GGUF file, an s3:// folder)."""
    teacher = architecture_of(job.spec.teacher.model) if job.spec.teacher.endpoint is None else None
    if teacher is None:
        return None
    derived = job.spec.student.from_teacher if job.spec.student else None
    if derived is not None:
        student = teacher.derived(derived.num_layers, derived.mlp_width)
    elif job.spec.student is not None and job.spec.student.model is not None:
        student = architecture_of(job.spec.student.model)
    else:
        student = None
    if student is None:
        return None
    bf16 = job.spec.training.precision == "bf16" or (
        job.spec.training.precision == "auto" and job.spec.resources.gpus_per_node > 0
    )
    per_device = device_memory(teacher, student, job.spec.training, job.spec.method.selected, bf16)
    return MemoryPlan(per_device, device_capacity(job.spec.resources))


def fit_refusal(job: DistillationJob | EvaluationJob) -> str | None:
    """Why the job cannot run on the resources it asks for, or None (it fits, or its size is not known yet)."""
    plan = memory_plan(job) if isinstance(job, DistillationJob) else None
    if plan is None or plan.fits is not False:
        return None
    declared = "resources.gpuMemory" if job.spec.resources.gpus_per_node else "resources.memory"
    remedies = ["use devices with more memory"]
    if not job.spec.training.gradient_checkpointing:
        remedies.append("set training.gradientCheckpointing")
    remedies.append("lower training.batchSize or maxSeqLength, or choose a smaller teacher or student")
    return f"spec.{declared}: the first training stage needs {plan.describe()}; {', '.join(remedies)}"
