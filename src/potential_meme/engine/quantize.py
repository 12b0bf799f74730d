"""The quantize stage's models: the distilled student with bitsandbytes linear layers (NF4 or int8), LoRA adapters
over it for quantization-aware training, and the merged result as it loads back from disk.

The stage itself runs through the distill loop (`trainer.run_distill_stage`): post-training quantization is that
loop with no steps, QAT the same loop training only the adapters against the full-precision teacher.
"""

from __future__ import annotations

import logging
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..metrics import trainer as gauges
from ..spec.errors import SpecError
from ..spec.models import DistillationJob, QuantizedMethod
from ..spec.plan import ADAPTERS_DIR, STUDENT_DIR, Stage
from ..storage import ArtifactStore, publish_folder
from .finish import finished_manifest
from .models import ResolvedModel, parameter_count, resolve

log = logging.getLogger(__name__)

MINIMUM_BITSANDBYTES = (0, 47)  # the first release whose NF4 and int8 layers run on the CPU as well as CUDA
QUANT_TYPES = {4: "nf4", 8: "int8"}
FIELD = "spec.method.quantized"


def check_bitsandbytes(job_name: str, device: torch.device) -> None:
    """Refuse, before anything loads, a machine where bitsandbytes is missing, too old or cannot quantize."""
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        installed = None
    if installed is None or tuple(int(part) for part in installed.split(".")[:2]) < MINIMUM_BITSANDBYTES:
        found = f"bitsandbytes {installed} is installed" if installed else "bitsandbytes is not installed"
        raise SpecError(
            [
                (
                    FIELD,
                    f"{found}; the quantize stage needs bitsandbytes >= 0.47 and peft "
                    "(pip install 'potential-meme[quantize]')",
                )
            ],
            job_name,
        )
    import bitsandbytes as bnb

    try:  # a 4-bit layer forward on this device: what an unsupported platform fails at
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.ones(1, 64, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure here means this platform cannot run the stage
        raise SpecError(
            [
                (
                    FIELD,
                    f"bitsandbytes {installed} cannot quantize on {device.type} here ({type(exc).__name__}: {exc}); "
                    "run the job on a CPU (x86-64 or arm64) or CUDA machine",
                )
            ],
            job_name,
        ) from None


def quantization_config(bits: int) -> Any:
    from transformers import BitsAndBytesConfig

    if bits == 4:
        # float32 compute: bfloat16 compute runs ~60x slower on CPUs, and fp32 keeps the rounding the only error.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(directory: str | Path, bits: int, device: torch.device) -> nn.Module:
    """A Hugging Face folder of full-precision weights, its linear layers quantized as it loads (the lm-head and
    embeddings stay full precision, as bitsandbytes leaves them)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(directory), quantization_config=quantization_config(bits), device_map=str(device), dtype=torch.float32
    )


def saved_bytes(model: nn.Module) -> int:
    """Bytes of the model's files as `save_pretrained` writes them."""
    with tempfile.TemporaryDirectory(prefix="potential-meme-size-") as tmp:
        model.save_pretrained(tmp)
        return sum(path.stat().st_size for path in Path(tmp).rglob("*") if path.is_file())


def distilled_student(job: DistillationJob, stage: Stage) -> tuple[ResolvedModel, dict[str, Any]]:
    """The distill stage's full-precision student and that stage's metrics."""
    from .stage_setup import previous_stage

    previous = previous_stage(job, stage)
    return resolve(previous.output_uri + STUDENT_DIR), finished_manifest(job, previous)["metrics"]


def quantized_student(job: DistillationJob, stage: Stage, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The distilled student quantized, with zero-initialised LoRA adapters when the job trains them (so it starts
    as the post-training-quantized student), and the facts the stage reports about both precisions."""
    from transformers import AutoModelForCausalLM

    method: QuantizedMethod = job.spec.method.quantized
    source, distilled = distilled_student(job, stage)
    full = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32)
    full_precision = {
        "parameters": parameter_count(full),
        "perplexity": distilled["studentPerplexityAfter"],
        "diskBytes": saved_bytes(full),
        "memoryBytes": full.get_memory_footprint(),
    }
    if "validationSets" in distilled:
        full_precision["validationSets"] = {
            name: measured["studentPerplexityAfter"] for name, measured in distilled["validationSets"].items()
        }
    del full
    student = load_quantized(source.directory, method.bits, device)
    post_training = {"diskBytes": saved_bytes(student), "memoryBytes": student.get_memory_footprint()}
    facts = {
        "bits": method.bits,
        "quantType": QUANT_TYPES[method.bits],
        "quantizationAwareTraining": method.quantization_aware_training,
        "fullPrecision": full_precision,
        "postTraining": post_training,
    }
    log.info(
        "quantized the distilled student to %d bits (%s): %.1f MB on disk, %.1f MB in memory (full precision %.1f "
        "and %.1f MB)",
        method.bits,
        QUANT_TYPES[method.bits],
        post_training["diskBytes"] / 1e6,
        post_training["memoryBytes"] / 1e6,
        full_precision["diskBytes"] / 1e6,
        full_precision["memoryBytes"] / 1e6,
    )
    if not method.quantization_aware_training:
        return student, facts
    from peft import LoraConfig, get_peft_model

    for module in student.modules():
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first no-grad forward in eval mode (a
        # perplexity), and gradients through repacked weights come out wrong (bitsandbytes 0.50.2): training keeps
        # the layout gradients are right for.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    lora = method.lora
    adapted = get_peft_model(
        student,
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules="all-linear"),
    )
    facts["adapterParameters"] = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return adapted, facts


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload")


def publish_adapters(model: nn.Module, store: ArtifactStore) -> list[dict[str, Any]]:
    """Upload the LoRA adapters (peft's folder) beside the student; returns each file's path, size and sha256."""
    with tempfile.TemporaryDirectory(prefix="potential-meme-adapters-") as tmp:
        model.save_pretrained(tmp)
        return publish_folder(store, Path(tmp), ADAPTERS_DIR)


def as_loaded(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` saved and loaded back: merging adapters rounds the sum to the quantized grid again, and what
    `from_pretrained` reads is what users get, so that is the model measured."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="potential-meme-merged-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, device_map=str(device), dtype=torch.float32)


def add_quantization_report(metrics: dict[str, Any], student: nn.Module, labels: dict[str, str]) -> None:
    """Complete the quantize stage's side-by-side students: the post-training-quantized one is the student before
    adapter training (the adapters start at zero), the quantization-aware one the merged student after it."""
    # 4-bit weights pack two to a byte, and adapters are merged: count the model's own parameters
    metrics["studentParameters"] = metrics["fullPrecision"]["parameters"]
    elsewhere = metrics.get("validationSets", {})
    post_training = metrics["postTraining"]
    post_training["perplexity"] = metrics["studentPerplexityBefore"]
    if elsewhere:
        post_training["validationSets"] = {name: m["studentPerplexityBefore"] for name, m in elsewhere.items()}
    shown = f"full precision {metrics['fullPrecision']['perplexity']:.2f}, {metrics['bits']}-bit post-training "
    shown += f"{post_training['perplexity']:.2f}"
    if metrics["quantizationAwareTraining"]:
        metrics["quantizationAware"] = {
            "perplexity": metrics["studentPerplexityAfter"],
            "adaptersPerplexity": metrics["adaptersPerplexity"],  # before merging: what training reached
            "diskBytes": saved_bytes(student),
            "memoryBytes": student.get_memory_footprint(),
        }
        if elsewhere:
            metrics["quantizationAware"]["validationSets"] = {
                name: m["studentPerplexityAfter"] for name, m in elsewhere.items()
            }
        shown += f", quantization-aware {metrics['studentPerplexityAfter']:.2f} (adapters before merging "
        shown += f"{metrics['adaptersPerplexity']:.2f})"
    log.info("held-out perplexity: %s", shown)
    for variant in ("fullPrecision", "postTraining", "quantizationAware"):
        if variant in metrics:
            gauges.STUDENT_BYTES.labels(**labels, variant=variant).set(metrics[variant]["diskBytes"])
