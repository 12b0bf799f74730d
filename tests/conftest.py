"""Shared fixtures: a tiny Llama teacher with its own BPE tokenizer, a small corpus, job files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import free_port, save_tiny_llama

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_configure(config):
    """One cache folder for the session (the built-in corpus is rendered once), never the user's."""
    config.cache_folder = tempfile.mkdtemp(prefix="potential-meme-cache-")
    os.environ["POTENTIAL_MEME_CACHE"] = config.cache_folder


def pytest_unconfigure(config):
    shutil.rmtree(config.cache_folder, ignore_errors=True)


CORPUS_MODULES = ["json", "csv", "argparse", "pathlib", "logging", "textwrap", "heapq", "bisect", "shlex", "fractions"]


def _corpus_texts() -> dict[str, str]:
    import importlib
    import pydoc

    return {name: pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext) for name in CORPUS_MODULES}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """One .jsonl file a module: the split unit is the file."""
    root = tmp_path_factory.mktemp("corpus")
    for name, text in _corpus_texts().items():
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        with open(root / f"{name}.jsonl", "w") as handle:
            for paragraph in paragraphs:
                handle.write(json.dumps({"text": paragraph}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer Llama (hidden 64) with a 512-word byte-level BPE trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-teacher")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_corpus_texts().values(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    save_tiny_llama(root, tokenizer, hidden_size=64, layers=4, seed=0)
    return root


@pytest.fixture(scope="session")
def chat_model_dir(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a chat template (ChatML, as SmolLM2's)."""
    from potential_meme.engine.models import load_tokenizer

    root = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    tokenizer.chat_template = CHATML
    save_tiny_llama(root, tokenizer, hidden_size=64, layers=2, seed=2)
    return root


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 server (moto's server mode) on 127.0.0.1 with a bucket `models`; AWS_* point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    # moto keeps its buckets per process, not per server: start every test from an empty S3.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
    yield endpoint
    server.stop()


@pytest.fixture
def job_file(tmp_path, tiny_teacher_dir, corpus_dir):
    """Write a tiny DistillationJob; keyword overrides are merged into `spec` (`method` replaces it)."""

    def write(name: str = "tiny", **spec_overrides) -> Path:
        spec = {
            "teacher": {"model": str(tiny_teacher_dir)},
            "student": {"fromTeacher": {"numLayers": 2}},
            "dataset": {"source": str(corpus_dir), "validationFraction": 0.3, "maxValidationSequences": 8},
            "method": {"knowledge": {"temperature": 2.0, "alpha": 0.5, "chunkSize": 64}},
            "training": {"batchSize": 4, "maxSteps": 6, "maxSeqLength": 64, "learningRate": 1e-3, "logEverySteps": 1},
            "checkpoint": {"everySteps": 2},
            "output": {"uri": str(tmp_path / "runs")},
        }
        for key, value in spec_overrides.items():
            merge = isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "method"  # one method
            spec[key] = {**spec[key], **value} if merge else value
        document = {
            "apiVersion": "distill.potential-meme.io/v1alpha1",
            "kind": "DistillationJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    return write
