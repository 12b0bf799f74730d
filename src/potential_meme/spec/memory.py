"""How many bytes a training stage holds on each device, estimated from the models' shapes before any pod starts.

Per device: the student's fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), the
frozen teacher in the compute precision, the activations the backward pass keeps for one batch, and
the chunked KD loss's working set. Shapes come from the model alias table or a local config.json, so
the operator and `potential-meme render` can tell that a job cannot fit before it holds a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .aliases import Architecture, lookup
from .models import MAX_NODES, DistillationJob, EvaluationJob, KnowledgeMethod, ResourcesSpec, TrainingSpec
from .plan import StageKind, plan_stages

FP32, BF16 = 4, 2
STUDENT_BYTES_PER_PARAMETER = FP32 * 4  # weights, gradients and AdamW's two moments, all fp32
HEADROOM = 0.85  # of a device's memory: the rest is the CUDA context, allocator fragmentation and the data loader
DEVICE_MEMORY_ENV = "POTENTIAL_MEME_DEVICE_MEMORY"  # what a training process may use, as the operator judged it
KD_CHUNK_ARRAYS = 4  # chunk logits of student and teacher, their gradient and the softmax in the chunked loss
CHUNK_LOGITS = 2**24  # numbers in one chunk's logits at most: 256 tokens at 65,536 words, 64 MiB in fp32


def tokens_per_chunk(chunk_size: int, vocabulary: int) -> int:
    """The tokens a chunk of the lm-head projection takes: method.chunkSize, or fewer where their logits would pass
    CHUNK_LOGITS numbers, so that a chunk weighs the same whatever the vocabulary (152,064 words: 110 tokens)."""
    return max(1, min(chunk_size, CHUNK_LOGITS // vocabulary))


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


def _held(shape: Architecture, bytes_per_parameter: int, gathered_bytes: int, shards: int) -> float:
    """Bytes of a model's parameters (and their training state) on one process. Sharded: each decoder layer's
    share of `shards`, the rest (embeddings, norm, lm-head) whole, and two layers gathered at once (the one
    computing and the next, prefetched) at `gathered_bytes` a parameter."""
    if shards == 1:
        return shape.parameters * bytes_per_parameter
    layers = shape.num_layers * shape.layer_parameters
    return (
        layers / shards + shape.parameters - layers
    ) * bytes_per_parameter + 2 * shape.layer_parameters * gathered_bytes


def teacher_forward_bytes(teacher: Architecture, tokens: int, bf16: bool) -> int:
    """What a teacher's forward without autograd holds besides its weights: its last hidden states, and one
    layer's working set that comes and goes."""
    activation_bytes = BF16 if bf16 else FP32
    states = tokens * teacher.hidden_size
    return (states + activation_elements_per_token(teacher.derived(1, None), False) * tokens) * activation_bytes


def device_memory(
    teacher: Architecture | None,
    student: Architecture,
    training: TrainingSpec,
    method: KnowledgeMethod,
    bf16: bool,
    shards: int = 1,
) -> DeviceMemory:
    """What one process holds: with `shards` 1 (ddp) a whole student with its optimizer and a whole teacher;
    with more (fsdp) their decoder layers split over that many processes. `teacher` None: the stage holds none
    (a teacher cache, or an API's answers, stands in for it)."""
    tokens = training.batch_size * training.max_seq_length
    stored = activation_elements_per_token(student, training.gradient_checkpointing) * tokens * (BF16 if bf16 else FP32)
    vocabulary = max(student.vocab_size, teacher.vocab_size if teacher else 0)
    loss = KD_CHUNK_ARRAYS * min(tokens_per_chunk(method.chunk_size, vocabulary), tokens) * vocabulary * FP32
    teacher_bytes = BF16 if bf16 else FP32
    return DeviceMemory(
        # a gathered student layer has its fp32 weights and, in backward, its unsharded gradients
        student=round(_held(student, STUDENT_BYTES_PER_PARAMETER, 2 * FP32, shards)),
        teacher=round(_held(teacher, teacher_bytes, teacher_bytes, shards)) if teacher else 0,
        activations=stored + (teacher_forward_bytes(teacher, tokens, bf16) if teacher else 0) + loss,
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
    strategy: str  # ddp or fsdp
    processes: int
    per_device: DeviceMemory
    capacity: int | None  # bytes of one device (a GPU, or a pod's memory on CPU); None: not known
    reason: str  # why this strategy

    @property
    def fits(self) -> bool | None:
        return _fits(self.per_device.total, self.capacity)

    def describe(self) -> str:
        need = self.per_device
        parts = (
            f"{self.strategy} over {self.processes} process(es), {binary_size(need.total)} per device: student with "
            f"optimizer state {binary_size(need.student)}, "
            f"{f'teacher {binary_size(need.teacher)}' if need.teacher else 'no teacher'}, activations "
            f"{binary_size(need.activations)}"
        )
        return _judged(parts, self.per_device.total, self.capacity)


def _fits(need: int, capacity: int | None) -> bool | None:
    """Whether `need` bytes fit a device of `capacity` with headroom; None when its memory is not known."""
    return None if capacity is None else need <= HEADROOM * capacity


def _judged(description: str, need: int, capacity: int | None) -> str:
    """`description` of an estimate of `need` bytes, with whether it fits a device of `capacity`."""
    if capacity is None:
        return description + " (device memory not declared: set resources.gpuMemory, or resources.memory on CPU)"
    verdict = "fits" if _fits(need, capacity) else "does not fit"
    return f"{description}; {verdict} in {binary_size(HEADROOM * capacity)} usable of {binary_size(capacity)}"


def _processes(resources: ResourcesSpec, nodes: int | None) -> int:
    """Training processes of a stage on `nodes` nodes of `resources` (its own nodes when None): one a GPU, or a pod."""
    return (nodes or resources.nodes) * max(resources.gpus_per_node, 1)


def _refusal(job: DistillationJob, need: str, remedies: list[str]) -> str:
    """A refusal naming the field that declares a device's memory, what the job needs and how to make it fit."""
    declared = "resources.gpuMemory" if job.spec.resources.gpus_per_node else "resources.memory"
    return f"spec.{declared}: {need}; {', '.join(remedies)}"


def _nodes_that_fit(job: DistillationJob, fits_on: Callable[[int], bool | None]) -> int | None:
    """The fewest nodes, more than the job asks for, on which `fits_on(nodes)`; None when no count up to MAX_NODES."""
    return next((n for n in range(job.spec.resources.nodes + 1, MAX_NODES + 1) if fits_on(n)), None)


def job_shapes(job: DistillationJob) -> tuple[Architecture | None, Architecture] | None:
    """The shapes of the teacher the training stage holds (None when a cache or an API's answers stand in for
    it) and of its student, when they are known before loading (None for a hub id missing from the alias table,
    a GGUF file, an s3:// folder, a progressive chain)."""
    spec = job.spec
    if spec.student is None:
        return None
    teacher = architecture_of(spec.teacher.model) if spec.teacher.endpoint is None else None
    derived = spec.student.from_teacher
    if derived is not None:
        student = teacher.derived(derived.num_layers, derived.mlp_width) if teacher else None
    else:
        student = architecture_of(spec.student.model) if spec.student.model else None
    if student is None or (teacher is None and spec.teacher.endpoint is None):
        return None
    return (None if spec.teacher.cache is not None else teacher), student


def plan_memory(
    job: DistillationJob,
    shapes: tuple[Architecture | None, Architecture],
    processes: int,
    capacity: int | None,
    bf16: bool,
) -> MemoryPlan:
    """The strategy the job runs with on `processes` devices of `capacity` bytes, and what each then holds.
    auto takes ddp when it fits with headroom (or the capacity is unknown), else fsdp."""
    teacher, student = shapes
    training, method = job.spec.training, job.spec.method.selected

    def planned(strategy: str, reason: str) -> MemoryPlan:
        shards = processes if strategy == "fsdp" else 1
        need = device_memory(teacher, student, training, method, bf16, shards)
        return MemoryPlan(strategy, processes, need, capacity, reason)

    if training.strategy != "auto":
        return planned(training.strategy, "training.strategy says so")
    if job.spec.method.quantized is not None or method.on_policy is not None:
        return planned("ddp", "auto: quantized and on-policy students train as whole copies")
    whole = planned("ddp", "")
    if processes == 1 or whole.fits is not False:
        why = "one process" if processes == 1 else "it fits" if whole.fits else "the device memory is not known"
        held = "student and teacher" if teacher is not None else "the student"
        return planned("ddp", f"auto: whole copies of {held}, as {why}")
    return planned(
        "fsdp", f"auto: whole copies would need {binary_size(whole.per_device.total)} per device, over the headroom"
    )


def memory_plan(job: DistillationJob, nodes: int | None = None) -> MemoryPlan | None:
    """The plan of the job's first training stage on the resources it asks for (or on `nodes` nodes of them);
    None when a model's shape is not known before it loads."""
    shapes = job_shapes(job)
    if shapes is None:
        return None
    resources = job.spec.resources
    return plan_memory(job, shapes, _processes(resources, nodes), device_capacity(resources), _bf16(job))


def _bf16(job: DistillationJob) -> bool:
    precision = job.spec.training.precision
    return precision == "bf16" or (precision == "auto" and job.spec.resources.gpus_per_node > 0)


def teacher_pass_bytes(teacher: Architecture, training: TrainingSpec, chunk_size: int, bf16: bool, shards: int) -> int:
    """What a forward-only pass of the teacher over its own batches (the cache-teacher stage's) holds on each
    device: its weights in the compute precision (with `shards` over 1, its layers' share and two layers
    gathered), one batch's forward, and the lm-head's logits over one chunk with their top-k sort."""
    tokens = training.batch_size * training.max_seq_length
    weight_bytes = BF16 if bf16 else FP32
    logits = min(tokens_per_chunk(chunk_size, teacher.vocab_size), tokens) * teacher.vocab_size * FP32 * 2
    weights = _held(teacher, weight_bytes, weight_bytes, shards)
    return round(weights) + teacher_forward_bytes(teacher, tokens, bf16) + logits


def plan_teacher_pass(
    job: DistillationJob, teacher: Architecture, processes: int, capacity: int | None, bf16: bool
) -> tuple[bool, int]:
    """(whether the cache-teacher stage shards the teacher, bytes per device). training.strategy decides as for
    training: auto shards when a whole teacher does not fit the device with headroom."""
    training, chunk_size = job.spec.training, job.spec.method.selected.chunk_size
    whole = teacher_pass_bytes(teacher, training, chunk_size, bf16, 1)
    asked = training.strategy
    too_big = capacity is not None and whole > HEADROOM * capacity
    if processes == 1 or asked == "ddp" or (asked == "auto" and not too_big):
        return False, whole
    return True, teacher_pass_bytes(teacher, training, chunk_size, bf16, processes)


@dataclass(frozen=True)
class TeacherPassPlan:
    """What the cache-teacher stage holds on each device."""

    sharded: bool
    processes: int
    per_device: int
    capacity: int | None

    @property
    def fits(self) -> bool | None:
        return _fits(self.per_device, self.capacity)

    def describe(self) -> str:
        how = (
            f"the teacher sharded over {self.processes} process(es)"
            if self.sharded
            else "a whole teacher on each device"
        )
        return _judged(f"{binary_size(self.per_device)} per device with {how}", self.per_device, self.capacity)


def cache_stage_plan(job: DistillationJob, nodes: int | None = None) -> TeacherPassPlan | None:
    """The cache-teacher stage's plan on the resources the job asks for (or on `nodes` nodes of them); None when
    the job makes no cache or the teacher's shape is not known before it loads."""
    spec, resources = job.spec, job.spec.resources
    makes_cache = plan_stages(job)[0].kind is StageKind.CACHE_TEACHER
    teacher = architecture_of(spec.teacher.model) if makes_cache else None
    if teacher is None:
        return None
    processes, capacity = _processes(resources, nodes), device_capacity(resources)
    sharded, need = plan_teacher_pass(job, teacher, processes, capacity, _bf16(job))
    return TeacherPassPlan(sharded, processes, need, capacity)


def _cache_refusal(job: DistillationJob) -> str | None:
    """Why the job's cache-teacher stage cannot run on its resources, or None."""
    plan = cache_stage_plan(job)
    if plan is None or plan.fits is not False:
        return None
    remedies = ["use devices with more memory"]
    if not plan.sharded:
        remedies.append("set training.strategy fsdp (or auto) and more GPUs or nodes")
    elif (enough := _nodes_that_fit(job, lambda nodes: cache_stage_plan(job, nodes).fits)) is not None:  # type: ignore[union-attr]
        remedies.append(f"run on {enough} nodes (resources.nodes)")
    return _refusal(job, f"the cache-teacher stage needs {plan.describe()}", remedies)


def fit_refusal(job: DistillationJob | EvaluationJob) -> str | None:
    """Why the job cannot run on the resources it asks for, or None (it fits, or its size is not known yet)."""
    if isinstance(job, DistillationJob) and (cache_refusal := _cache_refusal(job)) is not None:
        return cache_refusal
    plan = memory_plan(job) if isinstance(job, DistillationJob) else None
    if plan is None or plan.fits is not False:
        return None
    remedies = ["use devices with more memory"]
    if plan.strategy == "fsdp":
        if (enough := _nodes_that_fit(job, lambda nodes: memory_plan(job, nodes).fits)) is not None:  # type: ignore[union-attr]
            remedies.append(f"run on {enough} nodes (resources.nodes)")
    elif job.spec.training.strategy == "ddp":
        remedies.append("set training.strategy fsdp (or auto) and more nodes or GPUs")
    if not job.spec.training.gradient_checkpointing:
        remedies.append("set training.gradientCheckpointing")
    remedies.append("lower training.batchSize or maxSeqLength, or choose a smaller teacher or student")
    return _refusal(job, f"the first training stage needs {plan.describe()}", remedies)
