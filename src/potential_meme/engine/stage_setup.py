"""Setting up a distill stage: data, teacher and student, objective, optimizer and learning-rate schedule."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ..spec.aliases import Architecture
from ..spec.errors import SpecError, StageError
from ..spec.models import DerivedStudent, DistillationJob
from ..spec.plan import AUGMENTED, STUDENT_DIR, Stage, StageKind, plan_stages, responses_uri, teacher_cache_uri
from ..storage import open_store
from .data import Document, load_documents, load_validation_sets, pack, split_documents
from .finish import finished_manifest
from .loop import Batches, Teacher
from .mobile import narrowed, search
from .models import ResolvedModel, empty_model, keep_layers, load_config, load_model, load_tokenizer, resolve
from .objective import DistillationObjective, HiddenStateTap, decoder
from .preflight import CheckedModels
from .pruning import channel_importance, choose_layers, prune_to, pruned_size
from .quantize import quantized_student
from .responses import load_responses, pack_exchanges
from .runtime import Runtime, perplexity
from .schedule import lr_lambda
from .sharding import (
    choose_strategy,
    is_sharded,
    load_sharded,
    parameter_groups,
    plan_shapes,
    shape_of,
    shard_from_rank0,
    shard_layers,
)
from .teacher_cache import cache_identity, open_cache

log = logging.getLogger(__name__)


def previous_stage(job: DistillationJob, stage: Stage) -> Stage | None:
    """The stage whose output this one reads (a progressive stage's model, the teacher's answers); StageError
    while it is unfinished."""
    if not stage.inputs:
        return None
    previous = next(planned for planned in plan_stages(job) if planned.name == stage.inputs[0])
    if finished_manifest(job, previous) is None:
        raise StageError(
            f"stage {stage.name} reads the output of stage {previous.name}, which has not finished: "
            f"run `potential-meme train --stage {previous.name}` first"
        )
    return previous


@dataclass
class TrainingRows:
    """Packed rows to train on and to hold out, with their labels where not every next token is learned."""

    train: torch.Tensor
    validation: torch.Tensor
    train_labels: torch.Tensor | None = None
    validation_labels: torch.Tensor | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def corpus_rows(job: DistillationJob, tokenizer: Any, previous: Stage | None = None) -> TrainingRows:
    """The corpus, split; an augmented job trains on its augment stage's kept variants too."""
    spec = job.spec
    train_docs, validation_docs = load_documents(spec.dataset)
    facts = {}
    if spec.method.augmented is not None:
        lines = open_store(previous.output_uri).read_bytes(AUGMENTED).decode("utf-8").splitlines()
        variants = [Document(**json.loads(line)) for line in lines if line.strip()]
        facts = {"trainDocuments": len(train_docs), "augmentedDocuments": len(variants)}
        train_docs = train_docs + variants
    length = spec.training.max_seq_length
    return TrainingRows(
        pack(train_docs, tokenizer, length),
        pack(validation_docs, tokenizer, length, max_rows=spec.dataset.max_validation_sequences),
        facts=facts,
    )


def validation_rows(job: DistillationJob, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The packed rows of each further validation set (dataset.validation), by name."""
    spec = job.spec
    documents = load_validation_sets(spec.dataset)
    return {
        entry.name: pack(
            documents[entry.name],
            tokenizer,
            spec.training.max_seq_length,
            f"spec.dataset.validation.{index}.source",
            max_rows=entry.max_sequences or spec.dataset.max_validation_sequences,
        )
        for index, entry in enumerate(spec.dataset.validation)
    }


def _response_rows(job: DistillationJob, tokenizer: Any) -> TrainingRows:
    """The teacher's answers, split by prompt: the held-out prompts' answers measure the student."""
    spec = job.spec
    uri = responses_uri(job)
    field_path = "spec.method.response.responses"
    try:
        records = load_responses(uri)
    except FileNotFoundError as exc:
        raise SpecError([(field_path, f"{exc}; give a responses.jsonl the generate stage wrote")], "method") from None
    train, held_out = split_documents(
        [Document(group=r["id"], text="") for r in records], spec.dataset.validation_fraction
    )
    by_id = {r["id"]: r for r in records}
    length = spec.training.max_seq_length
    try:
        train_rows, train_labels = pack_exchanges([by_id[d.group] for d in train], tokenizer, length)
        validation_rows, validation_labels = pack_exchanges([by_id[d.group] for d in held_out], tokenizer, length)
    except ValueError as exc:
        raise SpecError(
            [("spec.training.maxSeqLength", f"{uri}: {exc}; add prompts or lower maxSeqLength")], "training"
        ) from None
    kept = spec.dataset.max_validation_sequences
    return TrainingRows(
        train_rows,
        validation_rows[:kept],
        train_labels,
        validation_labels[:kept],
        facts={"trainExchanges": len(train), "heldOutExchanges": len(held_out)},
    )


def _load_models(
    job: DistillationJob,
    stage: Stage,
    previous: Stage | None,
    models: CheckedModels,
    train_rows: torch.Tensor,
    runtime: Runtime,
    facts_before: dict[str, Any] | None,
):
    """(teacher, student, stage facts) for a stage; progressive stages prune their student.
    `facts_before`: what a checkpoint being resumed recorded, whose student already has its layers chosen."""
    dtype = runtime.teacher_dtype
    facts: dict[str, Any] = {}
    if stage.kind is StageKind.PROGRESSIVE:
        # Each stage learns from the model the stage before produced; the first from the teacher.
        source = resolve(previous.output_uri + STUDENT_DIR) if previous else models.teacher
        source_config = load_config(source)
        calibration = train_rows[: job.spec.method.progressive.calibration_sequences]

        def pruned(teacher: nn.Module, _: Runtime) -> tuple[nn.Module, dict[str, Any]]:
            with _size_refused(job, stage):
                student, report = prune_to(teacher, stage.target_parameters, calibration)
            return student, report.as_metrics()

        if _shards(job, _pruned_shapes(job, stage, source_config), runtime):
            teacher, student, facts = _built_on_rank_zero(pruned, source, source_config, runtime)
        else:
            teacher = load_model(source)  # fp32 until the student is pruned from it: its weights are not rounded
            student, facts = pruned(teacher, runtime)
            teacher = _teacher_in(teacher, source, dtype)
    elif stage.kind is StageKind.QUANTIZE:
        teacher = load_model(models.teacher, dtype=dtype)
        student, facts = quantized_student(job, stage, runtime.device)  # quantized on the device, in its precision
    elif (mobile := job.spec.method.mobile) is not None:
        searched = None  # the teacher as rank 0 read it to build and measure the candidates
        if facts_before and "architecture" in facts_before:  # resumed: the architecture is chosen
            facts = facts_before
        else:
            chosen = None
            if runtime.is_main:  # one measurement decides for every rank
                searched = load_model(models.teacher).to(runtime.device)  # fp32 until the student is built from it
                chosen = search(searched, load_tokenizer(models.teacher), mobile, job.metadata.name)
            facts = runtime.from_main(chosen)
        architecture = DerivedStudent(
            num_layers=facts["architecture"]["layers"],
            mlp_width=facts["architecture"]["mlpWidth"],
            calibration_sequences=mobile.calibration_sequences,
        )
        teacher, student, kept = _derived_models(
            job, architecture, models.teacher, train_rows, runtime, facts_before, searched
        )
        facts = {**facts, **kept}
    elif job.spec.teacher.cache is not None and job.spec.student.model is not None:
        teacher, student = _named_models(job, None, models.student, runtime)  # the cache stands in for the teacher
    elif (derived := job.spec.student.from_teacher) is not None:
        teacher, student, facts = _derived_models(job, derived, models.teacher, train_rows, runtime, facts_before)
    else:
        teacher, student = _named_models(job, models.teacher, models.student, runtime)
    if teacher is not None:
        teacher.to(runtime.device).eval().requires_grad_(False)
    if stage.kind is not StageKind.QUANTIZE and not is_sharded(student):
        student = student.float().to(runtime.device)
    return teacher, student, facts


def _shards(job: DistillationJob, shapes: tuple[Architecture | None, Architecture] | None, runtime: Runtime) -> bool:
    """Whether the stage shards its models: decided from their shapes, before any weight is read, so that rank 0
    alone reads them."""
    return runtime.world_size > 1 and choose_strategy(job, shapes, runtime)[0] == "fsdp"


def _named_models(
    job: DistillationJob, teacher: ResolvedModel | None, student: ResolvedModel, runtime: Runtime
) -> tuple[nn.Module | None, nn.Module]:
    """Teacher (None: an API's or a cache's) and student as their references name them."""
    teacher_config, student_config = load_config(teacher) if teacher is not None else None, load_config(student)
    if _shards(job, plan_shapes(teacher_config, student_config), runtime):
        sharded_teacher = (
            None if teacher is None else load_sharded(teacher, teacher_config, runtime.teacher_dtype, runtime)
        )
        return sharded_teacher, load_sharded(student, student_config, torch.float32, runtime)
    return (load_model(teacher, runtime.teacher_dtype) if teacher is not None else None), load_model(student)


@contextlib.contextmanager
def _size_refused(job: DistillationJob, stage: Stage) -> Iterator[None]:
    """A progressive stage's size that pruning cannot reach, as an error naming its field."""
    try:
        yield
    except ValueError as exc:
        last = stage.index == len(job.spec.method.progressive.sizes) - 1
        field = "finalSize" if last else f"intermediateSizes.{stage.index}"
        raise SpecError([(f"spec.method.progressive.{field}", str(exc))], job.metadata.name) from None


def _pruned_shapes(
    job: DistillationJob, stage: Stage, source_config: PretrainedConfig
) -> tuple[Architecture, Architecture] | None:
    """(source, pruned student) shapes of a progressive stage, from the source's config (None: not a shape the
    plan knows)."""
    shape = shape_of(source_config)
    if shape is None:
        return None
    with _size_refused(job, stage):
        layers, channels = pruned_size(
            shape.parameters,
            shape.layer_parameters,
            shape.num_layers,
            shape.hidden_size,
            shape.intermediate_size,
            stage.target_parameters,
        )
    return shape, shape.derived(layers, channels)


def _derived_models(
    job: DistillationJob,
    derived: DerivedStudent,
    source: ResolvedModel,
    train_rows: torch.Tensor,
    runtime: Runtime,
    facts_before: dict[str, Any] | None,
    loaded: nn.Module | None = None,
) -> tuple[nn.Module | None, nn.Module, dict[str, Any]]:
    """Teacher (None under a cache: it only gives the student its layers) and the student `derived` describes,
    with its facts: built by rank 0 alone when the stage shards, else on every process. `loaded`: the teacher in
    fp32 where this process has read it already."""
    config = load_config(source)
    shape = shape_of(config)
    taught = job.spec.teacher.cache is None
    shapes = (
        None if shape is None else (shape if taught else None, shape.derived(derived.num_layers, derived.mlp_width))
    )

    def build(teacher: nn.Module, builder: Runtime) -> tuple[nn.Module, dict[str, Any]]:
        return _derived_student(teacher, derived, train_rows, builder, facts_before)

    if _shards(job, shapes, runtime):
        return _built_on_rank_zero(build, source, config, runtime, keep_teacher=taught, loaded=loaded)
    teacher = loaded if loaded is not None else load_model(source)  # fp32 until the student is built from it
    student, facts = build(teacher, runtime)
    return (_teacher_in(teacher, source, runtime.teacher_dtype) if taught else None), student, facts


def _built_on_rank_zero(
    build: Callable[[nn.Module, Runtime], tuple[nn.Module, dict[str, Any]]],
    source: ResolvedModel,
    source_config: PretrainedConfig,
    runtime: Runtime,
    keep_teacher: bool = True,
    loaded: nn.Module | None = None,
) -> tuple[nn.Module | None, nn.Module, dict[str, Any]]:
    """Sharded teacher (read from `source` unless `loaded`; None unless `keep_teacher`) and the student `build`
    makes of it, with its facts, both built by rank 0 alone: the other processes read no weights and receive
    their shards."""
    if runtime.is_main:
        teacher = loaded if loaded is not None else load_model(source)  # fp32 until the student is built from it
        student, facts = build(teacher, dataclasses.replace(runtime, world_size=1))  # no other process measures
        teacher = _teacher_in(teacher, source, runtime.teacher_dtype) if keep_teacher else None
    else:
        log.info(
            "rank %d reads no weights of %s: its shards of %s come from rank 0",
            runtime.rank,
            source.directory,
            "teacher and student" if keep_teacher else "the student",
        )
        teacher = student = facts = None
    student_config, facts = runtime.from_main((student.config if student is not None else None, facts))
    student = shard_from_rank0(student, lambda: empty_model(student_config, torch.float32), runtime)
    if keep_teacher:
        teacher = shard_from_rank0(teacher, lambda: empty_model(source_config, runtime.teacher_dtype), runtime)
    return teacher, student, facts


def _teacher_in(teacher: nn.Module, source: ResolvedModel, dtype: torch.dtype) -> nn.Module:
    """`teacher` (loaded in fp32 to build a student from) in `dtype`: loaded again rather than cast, because
    loading keeps in fp32 what must stay so (the rotary frequencies), which casting would round."""
    return teacher if dtype == torch.float32 else load_model(source, dtype=dtype)


def _derived_student(
    teacher: nn.Module,
    derived: DerivedStudent,
    train_rows: torch.Tensor,
    runtime: Runtime,
    facts_before: dict[str, Any] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The student `derived` describes, built from the teacher; and its layer choice."""
    calibration = train_rows[: derived.calibration_sequences].to(runtime.device)
    if facts_before and "keptLayers" in facts_before:  # resumed: measuring again would choose the same layers
        facts = facts_before
    else:
        teacher.to(runtime.device)
        choice = (
            choose_layers(teacher, derived.num_layers, derived.layer_selection, calibration)
            if runtime.is_main
            else None
        )
        selection = runtime.from_main(choice)  # the other ranks wait rather than measure: all keep the same layers
        facts = {"layerSelection": derived.layer_selection, **selection.as_metrics()}
    # Embeddings, final norm and lm-head are copied too: the student speaks the teacher's tokenizer from step one.
    student = keep_layers(teacher, facts["keptLayers"])
    if derived.mlp_width is not None:
        student.to(runtime.device)
        student = narrowed(student, derived.mlp_width, channel_importance(student, calibration))
        facts = {**facts, "mlpWidth": student.config.intermediate_size}
    return student, facts


@dataclass
class StageSetup:
    """Everything the step loop works with."""

    tokenizer: Any
    validation_rows: torch.Tensor  # the held-out split of the training corpus
    validation_labels: torch.Tensor | None  # where not every next token counts (response training)
    validation_sets: dict[str, torch.Tensor]  # further validation text, by name
    teacher_model: nn.Module | None  # None: a teacher behind an API wrote the text, and that is all of it
    teacher: Teacher
    teacher_weight: torch.Tensor | None  # the teacher's lm-head, when the loss needs its logits
    student: nn.Module
    objective: DistillationObjective
    model: nn.Module  # the objective, wrapped in DDP when several processes keep whole copies
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches
    total_steps: int
    facts: dict[str, Any]  # what the stage adds to its metrics (a progressive stage's pruning)
    runtime: Runtime
    batch_size: int
    chunk_size: int

    def perplexity(self, model: nn.Module | None) -> float | None:
        """Held-out perplexity of `model` on the stage's validation rows (None for a teacher behind an API)."""
        if model is None:
            return None
        return perplexity(
            model, self.validation_rows, self.runtime, self.batch_size, self.chunk_size, self.validation_labels
        )

    def perplexities_elsewhere(self, model: nn.Module | None) -> dict[str, float | None]:
        """Perplexity of `model` on each further validation set, by name."""
        return {
            name: None if model is None else perplexity(model, rows, self.runtime, self.batch_size, self.chunk_size)
            for name, rows in self.validation_sets.items()
        }


def set_up(
    job: DistillationJob,
    stage: Stage,
    runtime: Runtime,
    accumulation: int,
    models: CheckedModels,
    facts_before: dict[str, Any] | None = None,
) -> StageSetup:
    """Load data and models and build the objective, optimizer and schedule of a distill stage.
    `accumulation`: micro-batches per process and step (a resumed run keeps its checkpoint's global batch)."""
    spec = job.spec
    method, training = spec.method.selected, spec.training
    torch.manual_seed(training.seed)
    previous = previous_stage(job, stage)  # before any work: its input must be ready
    tokenizer = load_tokenizer(models.teacher or models.student)
    # Before the models: data errors come fast.
    rows = _response_rows(job, tokenizer) if spec.method.response is not None else corpus_rows(job, tokenizer, previous)
    validation_sets = validation_rows(job, tokenizer)
    cache = None
    if (cache_uri := teacher_cache_uri(job)) is not None:  # checked before any weights load
        cache = open_cache(cache_uri, cache_identity(job, tokenizer, rows.train))
    teacher_model, student, facts = _load_models(job, stage, previous, models, rows.train, runtime, facts_before)
    if cache is not None:
        teacher_model = None  # loaded at most to derive the student from; the cache stands in for it
    vocabulary = models.vocabulary
    if vocabulary is not None and vocabulary.teacher_rows != vocabulary.student_rows:
        log.info(
            "teacher and student share a tokenizer of %d tokens but have %d and %d output rows (padding): "
            "the loss aligns the teacher's logits to the student's rows",
            vocabulary.tokens,
            vocabulary.teacher_rows,
            vocabulary.student_rows,
        )
    if training.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    layerwise = spec.method.layerwise
    teacher = Teacher(
        teacher_model, HiddenStateTap(teacher_model, layerwise.teacher_layers) if layerwise else None, cache
    )
    batches = Batches(
        rows.train, training.batch_size, accumulation, runtime.world_size, training.seed, rows.train_labels
    )
    total_steps = training.max_steps or training.epochs * batches.steps_per_epoch
    learning_rate = training.learning_rate
    if stage.kind is StageKind.QUANTIZE:  # the adapters' own steps and rate; none without QAT
        quantized = spec.method.quantized
        total_steps = (quantized.lora.steps or total_steps) if quantized.quantization_aware_training else 0
        learning_rate = quantized.lora.learning_rate
    warmup_steps = int(training.warmup_ratio * total_steps)

    teacher_width = (teacher_model or student).config.hidden_size
    objective = DistillationObjective(student, method, teacher_width, training.compile).to(runtime.device)
    model: nn.Module = objective
    shapes = plan_shapes(teacher_model.config if teacher_model is not None else None, student.config)
    strategy, why, plan = choose_strategy(job, shapes, runtime)
    if runtime.is_main:
        log.info("strategy %s: %s%s", strategy, why, f"; estimated {plan.describe()}" if plan else "")
    facts |= {"strategy": strategy, "strategyReason": why}
    if plan is not None:
        facts["memoryEstimateBytesPerDevice"] = plan.per_device.total
    if runtime.world_size > 1 and strategy == "fsdp":
        for sharded in (student, teacher_model):
            if sharded is not None and not is_sharded(sharded):  # each is sharded as it loads, should one not be
                shard_layers(sharded, runtime)
    elif runtime.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if training.compile and stage.kind is not StageKind.QUANTIZE:  # bitsandbytes layers are not compiled
        for compiled in (student, teacher_model):
            if compiled is not None:
                for layer in decoder(compiled).layers:
                    layer.compile()  # layer by layer: one small graph each, and FSDP units stay layers
    optimizer = torch.optim.AdamW(
        parameter_groups(objective),
        lr=learning_rate,
        weight_decay=training.weight_decay,
        fused=True,  # one kernel over all tensors: on the CPU here 4x faster than the per-tensor loop
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training.lr_scheduler, warmup_steps, total_steps)
    )
    return StageSetup(
        tokenizer=tokenizer,
        validation_rows=rows.validation,
        validation_labels=rows.validation_labels,
        validation_sets=validation_sets,
        teacher_model=teacher_model,
        teacher=teacher,
        teacher_weight=(
            teacher_model.get_output_embeddings().weight
            if teacher_model is not None and (method.alpha < 1 or layerwise or method.on_policy)
            else None
        ),
        student=student,
        objective=objective,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=batches,
        total_steps=total_steps,
        facts={**rows.facts, **facts},
        runtime=runtime,
        batch_size=training.batch_size,
        chunk_size=method.chunk_size,
    )
