import json
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from potential_meme.engine import data
from potential_meme.engine.data import Document, epoch_order, load_documents, pack, shifted_labels, split_documents
from potential_meme.engine.losses import IGNORE_INDEX
from potential_meme.engine.models import load_tokenizer
from potential_meme.spec.models import DatasetSpec

from helpers import REPO


def test_stdlib_corpus_is_split_by_module_and_leaves_out_pydoc_data(stdlib_split):
    train, validation = stdlib_split
    train_groups, validation_groups = {d.group for d in train}, {d.group for d in validation}
    assert not train_groups & validation_groups
    assert len(train_groups) > 100 and 5 < len(validation_groups) < len(train_groups) / 4
    # sha256 of the module name decides, so the split is the same on every machine and run.
    assert "json" in validation_groups and "os" in train_groups
    every = [d.group for d in train + validation]
    assert not any(g in ("pydoc_data", "antigravity", "this", "test", "idlelib") for g in every)
    assert sum(len(d.text) for d in train) > 3_000_000
    assert any("JSON" in d.text for d in train + validation if d.group == "json")


@pytest.fixture(scope="module")
def stdlib_rendering():
    """Rendered here (not read from the session's cache), in a process that has imported torch and
    transformers, with a credential in its environment and another working folder: none of that may
    reach the pages. Returns the split and the cache folder the pages were kept in."""
    cache = Path(tempfile.mkdtemp(prefix="corpus-cache-"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POTENTIAL_MEME_CACHE", str(cache))
        patch.setenv("HF_TOKEN", "hf_credential_that_must_not_be_learned")
        patch.chdir(tempfile.mkdtemp(prefix="elsewhere-"))
        yield load_documents(DatasetSpec(source="builtin:python-stdlib")), cache


@pytest.fixture(scope="module")
def stdlib_split(stdlib_rendering):
    return stdlib_rendering[0]


def test_the_stdlib_corpus_holds_nothing_of_the_process_that_rendered_it(stdlib_split):
    """The environment (credentials) would be learned by the student; addresses, paths and what the
    process imported would make every run's corpus, and so its figures, different."""
    text = "\n".join(d.text for d in stdlib_split[0] + stdlib_split[1])
    assert "hf_credential_that_must_not_be_learned" not in text and "HF_TOKEN" not in text
    # os's page, as an empty environment shows it (Python sets LC_CTYPE itself where the locale is C).
    assert re.search(r"environ = environ\(\{(?:'LC_CTYPE': '[\w.-]+')?\}\)", text)
    assert not re.search(r" at 0x[0-9a-fA-F]+|handle [0-9a-f]{8,}", text)
    assert "elsewhere-" not in text and sys.prefix not in text and str(REPO) not in text
    assert "transformers" not in text and "torch" not in text  # other libraries' patches of logging
    assert "sys" not in {d.group for d in stdlib_split[0] + stdlib_split[1]}


def test_the_rendered_corpus_is_kept_and_a_cut_copy_is_not_used(stdlib_rendering, tmp_path, monkeypatch):
    (train, validation), cache = stdlib_rendering
    monkeypatch.setenv("POTENTIAL_MEME_CACHE", str(cache))

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again although the pages were kept")

    monkeypatch.setattr(data.subprocess, "run", no_rendering)
    assert load_documents(DatasetSpec(source="builtin:python-stdlib")) == (train, validation)

    kept = tmp_path / "stdlib-corpus-0.jsonl"
    pages = "".join(json.dumps({"group": d.group, "text": d.text}) + "\n" for d in train[:3])
    kept.write_text(pages)
    assert data._read_cached(kept) == pages.splitlines()
    for damaged in (pages[:-20], pages.replace('"group"', '"grope"'), ""):  # a crash while writing, another format
        kept.write_text(damaged)
        assert data._read_cached(kept) is None


def test_txt_md_jsonl_json_csv_and_parquet_files_all_load(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text file\n\nits second paragraph")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"jsonl row {i}"}) for i in range(3)) + "\n\n")
    pd.DataFrame({"body": ["parquet row 1", None, "parquet row 2"]}).to_parquet(tmp_path / "c.parquet")
    bom = "\ufeff"  # as Windows editors save UTF-8
    (tmp_path / "d.json").write_text(bom + json.dumps([{"body": "json array row", "id": 1}, {"id": 2}]), "utf-8")
    (tmp_path / "e.md").write_text("# a markdown page")
    (tmp_path / "f.csv").write_text('id,body\n1,"csv row, quoted"\n2,\n3,"a csv row\nover two lines"\n', "utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    train, validation = load_documents(DatasetSpec(source=str(tmp_path), text_field="body", validation_fraction=0.5))
    texts = sorted(d.text for d in train + validation)
    assert texts == [
        "# a markdown page",
        "a csv row\nover two lines",
        "alpha text file\n\nits second paragraph",
        "csv row, quoted",
        "json array row",
        "jsonl row 0",
        "jsonl row 1",
        "jsonl row 2",
        "parquet row 1",
        "parquet row 2",
    ]
    assert {d.group for d in train}.isdisjoint({d.group for d in validation})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"text": "fine"}\n{"text": "cut sh', "spec.dataset.source: b.jsonl line 2 is not JSON"),
        ('["a", "b"]', "spec.dataset.source: b.jsonl: every row must be a JSON object with a 'text' key"),
        ('{"text": "caf\xe9"}'.encode("latin-1"), "spec.dataset.source: b.jsonl is not UTF-8 (byte 13)"),
    ],
)
def test_a_broken_json_file_is_named_with_its_line(tmp_path, content, problem):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    written = (tmp_path / "b.jsonl").write_bytes if isinstance(content, bytes) else (tmp_path / "b.jsonl").write_text
    written(content)
    with pytest.raises(ValueError, match=re.escape(problem)):
        load_documents(DatasetSpec(source=str(tmp_path)))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_missing_text_field_is_named(tmp_path, suffix):
    for name, text in (("a", "x"), ("b", "y")):
        content = json.dumps({"content": text}) + "\n" if suffix == ".jsonl" else f"content\n{text}\n"
        (tmp_path / f"{name}{suffix}").write_text(content)
    with pytest.raises(ValueError, match=f"spec.dataset.textField: a{suffix} has no column 'text'; columns: content"):
        load_documents(DatasetSpec(source=str(tmp_path)))


def test_packing_joins_documents_with_eos_and_cuts_fixed_rows(tiny_teacher_dir, corpus_dir):
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    train, _ = load_documents(DatasetSpec(source=str(corpus_dir), validation_fraction=0.3))
    rows = pack(train, tokenizer, 32)
    assert rows.shape[1] == 32 and rows.shape[0] > 100
    assert (rows == tokenizer.eos_token_id).sum() >= len(train) - 1 - 32  # one EOS per document (tail dropped)
    labels = shifted_labels(rows[:2])
    assert (labels[:, :-1] == rows[:2, 1:]).all() and (labels[:, -1] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="maxSeqLength"):
        pack(train[:1], tokenizer, 10**7)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(50, 3, 7).tolist() == epoch_order(50, 3, 7).tolist()
    assert epoch_order(50, 3, 7).tolist() != epoch_order(50, 4, 7).tolist()
    assert sorted(epoch_order(50, 0, 7).tolist()) == list(range(50))


def test_small_sources_still_get_one_validation_group():
    documents = [Document(group=f"file{i}.jsonl", text=f"text {i}") for i in range(3)]
    train, validation = split_documents(documents, 0.01)
    assert len(validation) == 1 and len(train) == 2
    assert split_documents(documents, 0.01) == (train, validation)
    assert split_documents(documents[:1], 0.5)[1] == []  # one group cannot be split: load_documents says so


def test_builtin_questions_are_prompts_about_modules_split_by_module():
    from potential_meme.engine.responses import read_prompts
    from potential_meme.spec.models import TextSource

    prompts = read_prompts(TextSource(source="builtin:python-questions"))
    assert len(prompts) == len({p.id for p in prompts}) >= 300 and "What is the Python module json for?" in [
        p.text for p in prompts
    ]
    train, held_out = load_documents(DatasetSpec(source="builtin:python-questions", validation_fraction=0.1))
    assert held_out and {d.group for d in train}.isdisjoint({d.group for d in held_out})  # unseen modules
    assert all(sum(d.group == group for d in held_out) == 3 for group in {d.group for d in held_out})
