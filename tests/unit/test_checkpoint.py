"""Checkpoints: verified on resume, never unpickled into code, a bad newest one falls back to the one before."""

import json
import logging
import os
import random

import boto3
import numpy as np
import pytest
import torch

from potential_meme.engine import checkpoint
from potential_meme.storage import LocalStore, file_sha256, open_store, sync_down


def _save(store, step, keep=3):
    student = {"weight": torch.full((4, 4), float(step))}
    training = {"step": step, "rng": checkpoint.rng_state(), "best": float("inf"), "history": [1.5, None]}
    checkpoint.save(store, step, student, training, keep=keep)


class Payload:
    """What an attacker with write access to the store plants: unpickling it runs a command."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return os.system, (f"touch {self.witness}",)


def _replace_file(store, step, name, data: bytes, fix_marker: bool):
    folder = f"checkpoints/step-{step:08d}/"
    store.write_bytes(folder + name, data)
    if fix_marker:  # the attacker rewrites the digests too: only the loader stands in the way
        marker = json.loads(store.read_bytes(folder + "COMPLETE"))
        path = store.root / folder / name
        marker["files"][name] = {"bytes": len(data), "sha256": file_sha256(path)}
        store.write_bytes(folder + "COMPLETE", json.dumps(marker).encode())


def test_a_checkpoint_round_trips_every_generator_as_plain_data(tmp_path):
    store = open_store(str(tmp_path))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _save(store, 4)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restored = checkpoint.load_newest(store)
    assert restored.step == 4 and torch.equal(restored.student_state["weight"], torch.full((4, 4), 4.0))
    assert restored.training_state["history"] == [1.5, None] and restored.training_state["best"] == float("inf")
    checkpoint.restore_rng(restored.training_state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_planted_pickle_is_refused_not_run_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    _save(store, 2)
    _save(store, 4)
    witness = tmp_path / "the-payload-ran"
    planted = tmp_path / "planted.pt"
    torch.save({"step": 4, "rng": Payload(witness)}, planted)
    _replace_file(store, 4, "training_state.pt", planted.read_bytes(), fix_marker=True)
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.load_newest(store)
    assert not witness.exists()
    assert restored.step == 2
    assert "step-00000004/ is unusable: training_state.pt is not tensors and plain values, refused" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "altered", "marker-without-digests", "file-missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage):
    store = open_store(str(tmp_path))
    _save(store, 2)
    _save(store, 4)
    folder = tmp_path / "checkpoints" / "step-00000004"
    if damage == "truncated":
        data = (folder / "student.pt").read_bytes()
        (folder / "student.pt").write_bytes(data[: len(data) // 2])
    elif damage == "altered":
        _replace_file(store, 4, "student.pt", (tmp_path / "checkpoints/step-00000002/student.pt").read_bytes(), False)
    elif damage == "marker-without-digests":
        (folder / "COMPLETE").write_text(json.dumps({"step": 4}))
    else:
        (folder / "training_state.pt").unlink()
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.load_newest(store)
    assert restored.step == 2 and torch.equal(restored.student_state["weight"], torch.full((4, 4), 2.0))
    assert "step-00000004/ is unusable" in caplog.text


def test_no_usable_checkpoint_starts_over_with_a_warning(tmp_path, caplog):
    store = open_store(str(tmp_path))
    _save(store, 2)
    (tmp_path / "checkpoints/step-00000002/student.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.load_newest(store) is None
    assert "no usable checkpoint" in caplog.text


def test_pruning_keeps_the_newest_and_clears_what_a_crash_left(tmp_path):
    store = open_store(str(tmp_path))
    _save(store, 2, keep=2)
    (tmp_path / "checkpoints/step-00000003").mkdir()
    (tmp_path / "checkpoints/step-00000003/student.pt").write_bytes(b"half written")  # no marker: a crash
    for step in (4, 6, 8):
        _save(store, step, keep=2)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    assert not list(tmp_path.rglob("*.partial"))


def test_writes_are_atomic_under_names_no_two_writers_share(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.write_bytes("a/key", b"old")
    made = []
    real_replace = os.replace

    def replace(source, target):
        made.append(os.path.basename(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    store.write_bytes("a/key", b"new")
    store.write_bytes("a/key", b"newer")
    assert len(set(made)) == 2 and all(name.endswith(".partial") for name in made)
    assert store.read_bytes("a/key") == b"newer" and store.list("a") == ["a/key"]


def test_keys_that_lead_outside_the_scratch_folder_are_refused(s3_endpoint, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket="models", Key="runs/student/config.json", Body=b"{}")
    client.put_object(Bucket="models", Key="runs/student/../../../../escaped", Body=b"x")
    with pytest.raises(ValueError, match=r"runs/student/\.\./\.\./\.\./\.\./escaped: a key that leads outside"):
        sync_down(open_store("s3://models/runs"), "student", tmp_path / "scratch" / "in")
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path / "scratch" / "in" / "config.json").exists()
