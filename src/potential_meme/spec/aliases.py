"""Short model names ("llama3-70b") and the shapes the memory plan needs, in one table a user can extend.

The built-in table maps each short name to a model reference (a Hugging Face id) and the decoder's
shape, from which the plan counts parameters, gradients, optimizer state and activations before any
weights are downloaded. An installation or a user adds or overrides entries with YAML files named in
POTENTIAL_MEME_MODEL_ALIASES (several joined by the path separator), each mapping names to entries:

    my-teacher:
      model: s3://models/my-teacher/
      architecture: {hiddenSize: 4096, numLayers: 32, intermediateSize: 14336, numHeads: 32,
                     numKvHeads: 8, vocabSize: 128256}

A reference with no '/', ':' or file suffix and no such local folder is a short name: one missing from
the table is refused with the list of known names, instead of failing later as a hub download.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from .base import Model
from .errors import SpecError

ALIASES_ENV = "POTENTIAL_MEME_MODEL_ALIASES"


class Architecture(Model):
    """A Llama-family decoder's shape (Llama 2 and 3, Mistral, Qwen2, SmolLM2): enough to count its
    parameters and size its activations."""

    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tied_embeddings: bool = False
    attention_bias: bool = Field(default=False, description="Biases on q, k and v (Qwen2).")

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    @property
    def layer_parameters(self) -> int:
        hidden, kv = self.hidden_size, self.kv_size
        attention = 2 * hidden * hidden + 2 * hidden * kv + (hidden + 2 * kv if self.attention_bias else 0)
        return attention + 3 * hidden * self.intermediate_size + 2 * hidden  # + gate/up/down and two norms

    @property
    def parameters(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return embeddings + self.num_layers * self.layer_parameters + self.hidden_size

    def derived(self, num_layers: int, intermediate_size: int | None) -> Architecture:
        """The shape of a student that keeps `num_layers` of these layers (and at most `intermediate_size` MLP
        channels: narrowing never widens)."""
        kept = min(intermediate_size or self.intermediate_size, self.intermediate_size)
        return self.model_copy(update={"num_layers": num_layers, "intermediate_size": kept})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """From a Hugging Face config.json of a Llama-family model."""
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            intermediate_size=config["intermediate_size"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )


class ModelAlias(Model):
    model: str = Field(min_length=1, description="The reference the short name stands for (a Hugging Face id, ...).")
    architecture: Architecture
    note: str | None = Field(default=None, description="Said in the log whenever the name is used.")


def _llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, **more: Any) -> dict:
    return {
        "hiddenSize": hidden,
        "numLayers": layers,
        "intermediateSize": intermediate,
        "numHeads": heads,
        "numKvHeads": kv_heads,
        "vocabSize": vocab,
        **more,
    }


_LLAMA3_8B = _llama(4096, 32, 14336, 32, 8, 128256)
_LLAMA3_70B = _llama(8192, 80, 28672, 64, 8, 128256)
BUILTIN: dict[str, dict[str, Any]] = {
    "llama3-8b": {"model": "meta-llama/Meta-Llama-3-8B", "architecture": _LLAMA3_8B},
    "llama3-7b": {
        "model": "meta-llama/Meta-Llama-3-8B",
        "architecture": _LLAMA3_8B,
        "note": "Llama 3 was released at 8B and 70B, not 7B: llama3-7b (the design document's name) is the 8B model",
    },
    "llama3-70b": {"model": "meta-llama/Meta-Llama-3-70B", "architecture": _LLAMA3_70B},
    "llama3.1-8b": {"model": "meta-llama/Llama-3.1-8B", "architecture": _LLAMA3_8B},
    "llama3.1-70b": {"model": "meta-llama/Llama-3.1-70B", "architecture": _LLAMA3_70B},
    "llama3.1-405b": {"model": "meta-llama/Llama-3.1-405B", "architecture": _llama(16384, 126, 53248, 128, 8, 128256)},
    "llama3.2-1b": {
        "model": "meta-llama/Llama-3.2-1B",
        "architecture": _llama(2048, 16, 8192, 32, 8, 128256, tiedEmbeddings=True),
    },
    "llama3.2-3b": {
        "model": "meta-llama/Llama-3.2-3B",
        "architecture": _llama(3072, 28, 8192, 24, 8, 128256, tiedEmbeddings=True),
    },
    "llama2-7b": {"model": "meta-llama/Llama-2-7b-hf", "architecture": _llama(4096, 32, 11008, 32, 32, 32000)},
    "llama2-13b": {"model": "meta-llama/Llama-2-13b-hf", "architecture": _llama(5120, 40, 13824, 40, 40, 32000)},
    "llama2-70b": {"model": "meta-llama/Llama-2-70b-hf", "architecture": _llama(8192, 80, 28672, 64, 8, 32000)},
    "mistral-7b": {"model": "mistralai/Mistral-7B-v0.1", "architecture": _llama(4096, 32, 14336, 32, 8, 32000)},
    "qwen2.5-0.5b": {
        "model": "Qwen/Qwen2.5-0.5B",
        "architecture": _llama(896, 24, 4864, 14, 2, 151936, tiedEmbeddings=True, attentionBias=True),
    },
    "qwen2.5-7b": {
        "model": "Qwen/Qwen2.5-7B",
        "architecture": _llama(3584, 28, 18944, 28, 4, 152064, attentionBias=True),
    },
    "qwen2.5-72b": {
        "model": "Qwen/Qwen2.5-72B",
        "architecture": _llama(8192, 80, 29568, 64, 8, 152064, attentionBias=True),
    },
    "smollm2-135m": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "architecture": _llama(576, 30, 1536, 9, 3, 49152, tiedEmbeddings=True),
    },
    "smollm2-360m": {
        "model": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "architecture": _llama(960, 32, 2560, 15, 5, 49152, tiedEmbeddings=True),
    },
    "smollm2-1.7b": {
        "model": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "architecture": _llama(2048, 24, 8192, 32, 32, 49152, tiedEmbeddings=True),
    },
}


def _read_table(path: str) -> dict[str, Any]:
    try:
        table = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SpecError([(ALIASES_ENV, f"cannot read {path}: {exc.strerror}; fix or unset the variable")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([(ALIASES_ENV, f"{path} is not YAML: {exc}")]) from None
    if not isinstance(table, dict):
        raise SpecError([(ALIASES_ENV, f"{path} must map short names to entries (model, architecture)")])
    return table


@functools.cache
def _table(files: str) -> dict[str, ModelAlias]:
    entries = dict(BUILTIN)
    for path in filter(None, files.split(os.pathsep)):
        entries |= _read_table(path)
    table = {}
    for name, entry in entries.items():
        try:
            table[str(name)] = ModelAlias.model_validate(entry)
        except ValidationError as exc:
            raise SpecError.from_validation(ModelAlias, exc, f"model alias {name!r} ({ALIASES_ENV})") from None
    return table


def alias_table() -> dict[str, ModelAlias]:
    """The built-in entries, then each file POTENTIAL_MEME_MODEL_ALIASES names (later ones win)."""
    return _table(os.environ.get(ALIASES_ENV, ""))


def is_short_name(reference: str) -> bool:
    if any(mark in reference for mark in ("/", ":", "\\")) or reference.startswith((".", "~")):
        return False
    return not Path(reference).suffix == ".gguf" and not Path(reference).exists()


def lookup(reference: str) -> ModelAlias | None:
    """The table's entry for a short name; None for any other reference. An unknown short name is refused."""
    if not is_short_name(reference):
        return None
    table = alias_table()
    if reference.lower() not in table:
        known = ", ".join(sorted(table))
        raise ValueError(
            f"{reference!r} is not a known short model name; use one of {known}, a Hugging Face id "
            f"(org/name), a local folder or file, or add it to a file named in {ALIASES_ENV}"
        )
    return table[reference.lower()]
