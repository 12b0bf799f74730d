import json
import re

import pandas as pd
import pytest

from potential_meme.engine.data import Document, epoch_order, load_documents, pack, shifted_labels, split_documents
from potential_meme.engine.losses import IGNORE_INDEX
from potential_meme.engine.models import load_tokenizer
from potential_meme.spec.models import DatasetSpec


@pytest.fixture(scope="module")
def stdlib_split():
    return load_documents(DatasetSpec(source="builtin:python-stdlib"))


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


def test_the_stdlib_corpus_holds_nothing_of_the_process_that_rendered_it(stdlib_split):
    """Addresses and this process's argv would make every run's corpus, and so its figures, different."""
    documents = stdlib_split[0] + stdlib_split[1]
    assert not any(re.search(r" at 0x[0-9a-fA-F]+|handle [0-9a-f]{8,}", d.text) for d in documents)
    assert "sys" not in {d.group for d in documents}


def test_txt_md_jsonl_json_and_parquet_files_all_load(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text file\n\nits second paragraph")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"jsonl row {i}"}) for i in range(3)) + "\n\n")
    pd.DataFrame({"body": ["parquet row 1", None, "parquet row 2"]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "json array row", "id": 1}, {"id": 2}]))
    (tmp_path / "e.md").write_text("# a markdown page")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    train, validation = load_documents(DatasetSpec(source=str(tmp_path), text_field="body", validation_fraction=0.5))
    texts = sorted(d.text for d in train + validation)
    assert texts == [
        "# a markdown page",
        "alpha text file\n\nits second paragraph",
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
    ],
)
def test_a_broken_json_file_is_named_with_its_line(tmp_path, content, problem):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(ValueError, match=re.escape(problem)):
        load_documents(DatasetSpec(source=str(tmp_path)))


def test_missing_text_field_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "y"}) + "\n")
    with pytest.raises(ValueError, match="spec.dataset.textField: a.jsonl has no column 'text'; columns: content"):
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
