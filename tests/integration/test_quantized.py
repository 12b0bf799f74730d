"""Quantized distillation end to end: full-precision KD (stage distill), then bitsandbytes quantization of the
student (stage quantize) with or without LoRA adapters trained by KD over it, on the CPU."""

import json
import re
import signal

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from test_library import metric_samples
from transformers import AutoModelForCausalLM

from potential_meme.distillation import QuantizedDistiller
from potential_meme.engine import checkpoint
from potential_meme.engine.data import load_documents, pack
from potential_meme.engine.models import load_tokenizer
from potential_meme.engine.quantize import check_bitsandbytes, load_quantized
from potential_meme.engine.runtime import Runtime, perplexity
from potential_meme.spec import SpecError, load_job
from potential_meme.storage import open_store

from helpers import cli, free_port, start_cli


def _held_out_perplexity(model, job_path) -> float:
    """The held-out perplexity as the engine measures it, of a model loaded here from the published folder."""
    spec = load_job(job_path).spec
    tokenizer = load_tokenizer(str(spec.teacher.model))
    _, held_out = load_documents(spec.dataset)
    rows = pack(held_out, tokenizer, spec.training.max_seq_length, max_rows=spec.dataset.max_validation_sequences)
    return perplexity(model, rows, Runtime.single(torch.device("cpu")), spec.training.batch_size, 64)


def test_a_4_bit_qat_job_reports_every_precision_and_publishes_a_model_that_loads_back(job_file, tmp_path):
    quantized = {"bits": 4, "chunkSize": 64, "lora": {"rank": 8, "steps": 8, "learningRate": 3e-3}}
    job = job_file("qat", method={"quantized": quantized}, training={"maxSteps": 4})
    result = cli("run", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    quantize = tmp_path / "runs" / "qat" / "quantize"
    manifest = json.loads((quantize / "manifest.json").read_text())
    metrics = manifest["metrics"]
    distilled = json.loads((tmp_path / "runs" / "qat" / "distill" / "manifest.json").read_text())["metrics"]

    full, post, aware = metrics["fullPrecision"], metrics["postTraining"], metrics["quantizationAware"]
    assert full["perplexity"] == distilled["studentPerplexityAfter"]
    assert metrics["studentParameters"] == full["parameters"] == distilled["studentParameters"]
    assert metrics["steps"] == 8 and metrics["quantType"] == "nf4"
    # 4-bit linear layers; the embeddings and lm-head stay fp32, so a tiny model shrinks by less than 8x
    assert post["diskBytes"] < 0.8 * full["diskBytes"] and post["memoryBytes"] < 0.8 * full["memoryBytes"]
    assert aware["diskBytes"] == pytest.approx(post["diskBytes"], rel=0.01)
    assert post["perplexity"] != full["perplexity"]  # rounding changed the model
    assert aware["adaptersPerplexity"] < post["perplexity"]  # the adapters learned

    student = AutoModelForCausalLM.from_pretrained(quantize / "student", device_map="cpu", dtype=torch.float32)
    assert isinstance(student.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert _held_out_perplexity(student, job) == pytest.approx(aware["perplexity"], rel=1e-4)

    base = load_quantized(tmp_path / "runs" / "qat" / "distill" / "student", 4, torch.device("cpu"))
    adapted = PeftModel.from_pretrained(base, quantize / "adapters")
    assert _held_out_perplexity(adapted, job) == pytest.approx(aware["adaptersPerplexity"], rel=1e-4)
    listed = {entry["path"] for entry in manifest["files"]}
    assert {"adapters/adapter_model.safetensors", "student/model.safetensors"} <= listed

    rerun = cli("run", str(job))  # both stages are done: nothing runs again
    assert rerun.returncode == 0 and rerun.stderr.count("skipped") == 2, rerun.stderr[-2000:]


def test_adapter_training_stopped_by_sigterm_resumes_from_a_checkpoint_of_the_adapters_alone(job_file, tmp_path):
    quantized = {"bits": 4, "chunkSize": 64, "lora": {"rank": 4, "steps": 12}}
    straight = job_file("straight", method={"quantized": quantized}, training={"maxSteps": 2})
    assert cli("run", str(straight)).returncode == 0
    job = job_file(
        "stopped", method={"quantized": quantized}, training={"maxSteps": 2}, checkpoint={"everySteps": 1000}
    )
    process = start_cli("run", str(job))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if (match := re.search(r"step (\d+)/12", line)) and int(match.group(1)) >= 3:  # the quantize stage's steps
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    store = open_store(str(tmp_path / "runs" / "stopped" / "quantize"))
    (saved,) = checkpoint.complete_steps(store)
    restored = checkpoint.load_newest(store)
    # only what training changes: the adapters, not the quantized weights rebuilt from the distill stage
    assert restored.student_state and all("lora_" in name for name in restored.student_state)

    rerun = start_cli("run", str(job))
    rerun_output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, rerun_output
    assert f"resuming stopped/quantize from checkpoint at step {saved}" in rerun_output
    manifests = [
        json.loads((tmp_path / "runs" / name / "quantize" / "manifest.json").read_text())
        for name in ("stopped", "straight")
    ]
    assert manifests[0]["resumedFromStep"] == saved
    assert manifests[0]["metrics"]["finalLoss"] == manifests[1]["metrics"]["finalLoss"]
    assert manifests[0]["metrics"]["adaptersPerplexity"] == manifests[1]["metrics"]["adaptersPerplexity"]


def test_post_training_8_bit_quantization_through_the_library(tiny_teacher_dir, corpus_dir, tmp_path):
    distiller = QuantizedDistiller(
        str(tiny_teacher_dir), 2, quantization_bits=8, output_uri=str(tmp_path / "runs"), job_name="ptq"
    )
    port = free_port()
    result = distiller.distill_and_quantize(
        str(corpus_dir),
        quantization_aware_training=False,
        batch_size=4,
        max_steps=3,
        max_seq_length=64,
        metrics_port=port,
    )
    assert result["steps"] == 0 and "quantizationAware" not in result
    assert result["postTraining"]["perplexity"] == result["studentPerplexityAfter"]
    assert result["postTraining"]["memoryBytes"] < result["fullPrecision"]["memoryBytes"]
    samples = metric_samples(port)
    for variant in ("fullPrecision", "postTraining"):
        labels = (("job", "ptq"), ("stage", "quantize"), ("variant", variant))
        assert samples[("potential_meme_trainer_student_bytes", labels)] == result[variant]["diskBytes"]
    saved = distiller.save_student(tmp_path / "copy")
    student = AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    assert isinstance(student.model.layers[1].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert not (tmp_path / "runs" / "ptq" / "quantize" / "adapters").exists()


def test_unsupported_bit_widths_are_refused_before_anything_loads(tiny_teacher_dir):
    with pytest.raises(SpecError, match=r"bits: 3 bits is not supported: choose 4 \(NF4\) or 8 \(int8\)"):
        QuantizedDistiller(str(tiny_teacher_dir), 2, quantization_bits=3)


def test_a_machine_without_bitsandbytes_gets_the_extra_to_install(monkeypatch):
    import potential_meme.engine.quantize as quantize

    def not_installed(name):
        raise quantize.PackageNotFoundError(name)

    monkeypatch.setattr(quantize, "version", not_installed)
    with pytest.raises(
        SpecError, match=r"spec.method.quantized: bitsandbytes is not installed.*potential-meme\[quantize\]"
    ):
        check_bitsandbytes("job", torch.device("cpu"))
    monkeypatch.setattr(quantize, "version", lambda name: "0.42.0")
    with pytest.raises(
        SpecError, match="bitsandbytes 0.42.0 is installed; the quantize stage needs bitsandbytes >= 0.47"
    ):
        check_bitsandbytes("job", torch.device("cpu"))
