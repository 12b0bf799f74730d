"""Checkpoints: verified on resume, never unpickled into code, a bad newest one falls back to the one before."""

import json
import logging
import os
import random

import boto3
import numpy as np
import pytest
import torch
from safetensors.torch import save

from potential_meme.engine import checkpoint
from potential_meme.engine.sharding import load_shards, save_shards
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


def _trained_pair(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def _save_sharded(store, step, model, optimizer, local):
    groups = save_shards(model, optimizer, local / checkpoint.STUDENT_SHARDS)
    shards = checkpoint.upload(store, step, local)
    checkpoint.save(store, step, None, {"step": step, "optimizer": {"param_groups": groups}}, keep=3, shards=shards)


def test_a_sharded_checkpoint_loads_back_and_never_reads_a_file_its_marker_does_not_list(tmp_path):
    store = open_store(str(tmp_path / "store"))
    model, optimizer = _trained_pair(0)
    _save_sharded(store, 2, model, optimizer, tmp_path / "written")
    # What a crashed attempt at the same step by more processes leaves: another shard of the same tensors.
    stray = "checkpoints/step-00000002/student/shard-00003-model-00001-of-00001.safetensors"
    store.write_bytes(stray, save({name: torch.zeros_like(value) for name, value in model.state_dict().items()}))

    restored = checkpoint.load_newest(store)
    assert restored.step == 2 and restored.student_state is None
    assert [path.name for path in restored.shards_folder.iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]
    fresh, fresh_optimizer = _trained_pair(1)
    load_shards(fresh, fresh_optimizer, restored.shards_folder, restored.training_state["optimizer"]["param_groups"])
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    for kept, loaded in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert torch.equal(kept["exp_avg_sq"], loaded["exp_avg_sq"]) and torch.equal(kept["step"], loaded["step"])


def test_a_damaged_shard_falls_back_to_the_checkpoint_before(tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    for step in (2, 4):
        _save_sharded(store, step, *_trained_pair(step), tmp_path / f"written-{step}")
    shard = next((tmp_path / "store/checkpoints/step-00000004/student").iterdir())
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.load_newest(store)
    assert restored.step == 2
    assert f"step-00000004/ is unusable: student/{shard.name} is" in caplog.text
