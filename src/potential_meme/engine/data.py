"""Training text: read documents, split train/validation, tokenize and pack fixed-length sequences."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..spec.errors import SpecError
from ..spec.models import DatasetSpec, TextSource
from ..storage import cache_folder, open_store

log = logging.getLogger(__name__)

BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_REFERENCE = "builtin:python-reference"
BUILTIN_QUESTIONS = "builtin:python-questions"
QUESTION_FORMS = (
    "What is the Python module {} for?",
    "Show a short example that uses the Python module {}.",
    "When would I choose the Python module {}, and what are its pitfalls?",
)
TEXT_SUFFIXES = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def _problem(field: str, message: str) -> SpecError:
    return SpecError([(f"spec.dataset.{field}", message)], "dataset")


@dataclass(frozen=True)
class Document:
    group: str  # documents of one group land on the same side of the split
    text: str


def _position(group: str) -> float:
    """Where a group falls in [0, 1): a hash, so the split is the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "big") / 2**64


def split_documents(documents: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) by group; a small source still gets one validation group."""
    groups = sorted({d.group for d in documents}, key=_position)
    held_out = {g for g in groups if _position(g) < fraction}
    if not held_out and len(groups) > 1:
        held_out = {groups[0]}
    return [d for d in documents if d.group not in held_out], [d for d in documents if d.group in held_out]


def stdlib_documents() -> list[Document]:
    """The standard library's pydoc pages, grouped by top-level module (see `stdlib_corpus`).

    Built at run time from the interpreter's own modules, so the demo needs no download; rendering
    takes about 20 s, so the pages are kept in the cache folder for the next run and the next stage.
    """
    script = Path(__file__).with_name("stdlib_corpus.py")
    key = hashlib.sha256(f"{sys.version}\n{script.read_text()}".encode()).hexdigest()[:16]
    cached = cache_folder() / f"stdlib-corpus-{key}.jsonl"
    lines = _read_cached(cached)
    if lines is None:
        log.info("rendering the standard library's documentation (about 20 s; kept in %s)", cached.parent)
        with tempfile.TemporaryDirectory() as scratch:
            rendered = subprocess.run(
                [sys.executable, "-I", "-S", str(script), scratch],
                env={},
                cwd=scratch,
                capture_output=True,
                text=True,
                check=True,
            )
        lines = rendered.stdout.splitlines()
        _write_cache(cached, rendered.stdout)
    return [Document(**json.loads(line)) for line in lines]


def reference_documents() -> list[Document]:
    """The Python Language Reference's topics as this interpreter ships them (`pydoc_data`, which the
    stdlib corpus leaves out): long-form prose with code, written for readers rather than beside the code
    it documents, so it tells how a student trained on docstrings does on text of another kind."""
    from pydoc_data.topics import topics

    return [Document(group=name, text=text) for name, text in sorted(topics.items())]


def question_documents() -> list[Document]:
    """Prompts for response matching, offline: questions about each public module of the standard library,
    grouped by module (a held-out split asks about modules the student never heard of)."""
    modules = sorted(name for name in sys.stdlib_module_names if not name.startswith("_") and "test" not in name)
    return [Document(group=module, text=form.format(module)) for module in modules for form in QUESTION_FORMS]


def _read_cached(path: Path) -> list[str] | None:
    """The cached lines, or None when absent or not whole (every line a page, the last complete)."""
    try:
        text = path.read_text(encoding="ascii")
        lines = text.splitlines()
        if not text.endswith("\n") or not all(json.loads(line).keys() == {"group", "text"} for line in lines):
            raise ValueError("incomplete")
    except (OSError, ValueError, AttributeError):
        return None
    return lines


def _write_cache(path: Path, text: str) -> None:
    try:
        open_store(str(path.parent)).write_bytes(path.name, text.encode("ascii"))  # atomic: never half a file
    except OSError as exc:  # a read-only home: the next run renders again
        log.warning("could not keep the rendered corpus in %s (%s)", path.parent, exc)


def _file_documents(root: Path, spec: TextSource, line_per_text: bool) -> list[Document]:
    paths = _local_files(root)
    documents = []
    for path in paths:
        name = str(path.relative_to(root)) if root.is_dir() else path.name  # stable across machines
        texts = _file_texts(path, spec.text_field, line_per_text)
        # Files are the split unit when there are several; otherwise rows are.
        for row, text in enumerate(texts):
            if isinstance(text, str) and text.strip():
                documents.append(Document(group=name if len(paths) > 1 else f"{name}:{row}", text=text))
    return documents


def _file_texts(path: Path, column: str, line_per_text: bool = False) -> list:
    """A text file is one document (or one a line: `line_per_text`); JSON Lines, a JSON array of records,
    CSV and Parquet give one a row.

    Read directly rather than through `datasets`, whose import and Arrow cache cost seconds per
    trainer start and need a writable home directory.
    """
    if TEXT_SUFFIXES[path.suffix] == "text":
        text = path.read_text(encoding="utf-8", errors="replace")
        return text.splitlines() if line_per_text else [text]
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            _require_column(path, column, list(reader.fieldnames or []))
            return [row[column] for row in reader]
    if path.suffix == ".parquet":
        import pyarrow.parquet

        _require_column(path, column, pyarrow.parquet.read_schema(path).names)
        return pyarrow.parquet.read_table(path, columns=[column]).column(column).to_pylist()
    records = _json_records(path)
    if not all(isinstance(record, dict) for record in records):
        raise _problem("source", f"{path.name}: every row must be a JSON object with a {column!r} key")
    _require_column(path, column, sorted({key for record in records for key in record}))
    return [record.get(column) for record in records]


def _require_column(path: Path, column: str, columns: list[str]) -> None:
    if column not in columns:
        raise _problem("textField", f"{path.name} has no column {column!r}; columns: {', '.join(columns)}")


def _json_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8-sig")  # JSON is UTF-8; editors on Windows add a BOM
    except UnicodeDecodeError as exc:
        raise _problem("source", f"{path.name} is not UTF-8 (byte {exc.start}): re-encode it as UTF-8") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSON Lines
    if isinstance(whole, list):
        records = whole
    elif isinstance(whole, dict):
        records = [whole]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise _problem("source", f"{path.name} line {number} is not JSON ({exc.msg})") from None
    return records


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix not in TEXT_SUFFIXES:
            raise _problem("source", f"{root} is not one of {', '.join(sorted(TEXT_SUFFIXES))}")
        return [root]
    files = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix in TEXT_SUFFIXES)
    if not files:
        raise _problem("source", f"no {', '.join(sorted(TEXT_SUFFIXES))} files under {root}")
    return files


def read_documents(spec: TextSource, line_per_text: bool = False) -> list[Document]:
    """Every document of a source; `line_per_text`: each line of a text file is one (prompts, not prose)."""
    source = spec.source
    if source == BUILTIN_STDLIB:
        return stdlib_documents()
    if source == BUILTIN_REFERENCE:
        return reference_documents()
    if source == BUILTIN_QUESTIONS:
        return question_documents()
    if source.startswith(("s3://", "file://")):
        from ..storage import download_to_scratch

        local = open_store(source).root if source.startswith("file://") else download_to_scratch(source, "data")
        return _file_documents(local, spec, line_per_text)
    if Path(source).expanduser().exists():
        return _file_documents(Path(source).expanduser(), spec, line_per_text)
    if source.startswith("builtin:"):
        accepted = ", ".join((BUILTIN_STDLIB, BUILTIN_REFERENCE, BUILTIN_QUESTIONS))
        raise _problem("source", f"unknown builtin {source!r}; accepted: {accepted}")
    if source.startswith((".", "/", "~")):
        raise _problem("source", f"{source} does not exist")
    import datasets

    table = datasets.load_dataset(source, split="train")
    return [Document(group=str(i), text=t) for i, t in enumerate(table[spec.text_field]) if t]


def load_documents(spec: DatasetSpec) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents for a dataset spec."""
    documents = read_documents(spec)
    train, validation = split_documents(documents, spec.validation_fraction)
    if not train or not validation:
        raise _problem(
            "source",
            f"{len(documents)} documents give an empty "
            f"{'training' if not train else 'validation'} split; add data or change validationFraction",
        )
    return train, validation


def load_validation_sets(spec: DatasetSpec) -> dict[str, list[Document]]:
    """The documents of each further validation set, by name; errors name the set's own fields."""
    sets = {}
    for index, entry in enumerate(spec.validation):
        try:
            sets[entry.name] = read_documents(entry)
        except SpecError as exc:
            prefix = f"spec.dataset.validation.{index}."
            raise SpecError(
                [(path.replace("spec.dataset.", prefix, 1), message) for path, message in exc.problems], "dataset"
            ) from None
        if not sets[entry.name]:
            raise SpecError([(f"spec.dataset.validation.{index}.source", f"{entry.source} holds no text")], "dataset")
    return sets


def pack(
    documents: list[Document],
    tokenizer,
    sequence_length: int,
    length_field: str = "spec.training.maxSeqLength",
    max_rows: int | None = None,
) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into [N, sequence_length] rows (the tail is dropped);
    at most `max_rows` rows, tokenizing no more documents than they need."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document.text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if max_rows is not None and len(stream) >= max_rows * sequence_length:
            break
    rows = len(stream) // sequence_length if max_rows is None else min(max_rows, len(stream) // sequence_length)
    if rows == 0:
        raise SpecError(
            [
                (
                    length_field,
                    f"{len(stream)} tokens make no sequence of {sequence_length}; add data or lower maxSeqLength",
                )
            ]
        )
    return torch.tensor(stream[: rows * sequence_length], dtype=torch.long).view(rows, sequence_length)


def shifted_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels aligned with every position; the last position has none."""
    from .losses import IGNORE_INDEX

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def epoch_order(rows: int, epoch: int, seed: int) -> torch.Tensor:
    """The row order of an epoch: a permutation that depends only on (seed, epoch), so resume replays it."""
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
