"""The cache-teacher stage and KD from its cache: the tiny teacher's targets over the corpus, kept once."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from potential_meme.engine.trainer import run_job
from potential_meme.spec import SpecError, load_job
from potential_meme.spec.errors import StageError

from helpers import cli

VOCABULARY = 512  # the tiny teacher's tokenizer


def _stage(tmp_path, job: str, stage: str):
    return tmp_path / "runs" / job / stage


def test_kd_from_a_full_vocabulary_cache_trains_what_kd_from_the_teacher_trains(job_file, tmp_path):
    """With every word kept, the cache is the teacher's distribution up to storage rounding: the student
    trained from it ends where the student trained online does, its teacher's numbers from the cache."""
    training = {"maxSteps": 4, "maxGradNorm": None}
    online = run_job(load_job(job_file("online", training=training)))[-1]
    cached_job = job_file("cached", training=training, teacher={"cache": {"topK": VOCABULARY}})
    cache, distill = run_job(load_job(cached_job))
    assert cache["stage"] == "cache-teacher" and distill["stage"] == "distill"
    assert cache["cache"]["bytesPerToken"] == 4 + VOCABULARY * 3
    assert cache["cache"]["tailMass"] == 0  # every word kept: nothing left for the tail
    assert cache["metrics"]["teacherPerplexity"] == pytest.approx(online["metrics"]["teacherPerplexity"], rel=1e-5)
    assert distill["metrics"]["teacherPerplexity"] == cache["metrics"]["teacherPerplexity"]
    assert distill["metrics"]["studentPerplexityAfter"] == pytest.approx(
        online["metrics"]["studentPerplexityAfter"], rel=0.01
    )
    assert abs(distill["metrics"]["finalLoss"] - online["metrics"]["finalLoss"]) < 0.01 * online["metrics"]["finalLoss"]
    assert_close_weights(tmp_path / "runs/online/distill", tmp_path / "runs/cached/distill")


def assert_close_weights(first, second):
    a, b = (load_file(stage / "student" / "model.safetensors") for stage in (first, second))
    for name, value in a.items():
        assert (value - b[name]).abs().max() < 5e-3, name  # rounding of the stored log-probabilities, 4 steps


def test_a_sampled_cache_keeps_each_drawn_token_at_its_share_and_trains_a_student(job_file, tmp_path):
    """teacher.cache.targets sampled: k draws a position, stored as counts over k with nothing in the tail, the
    same bytes when made again; KD from it trains the student as KD from the top k does."""
    job = job_file("sampled", training={"maxSteps": 4}, teacher={"cache": {"topK": 16, "targets": "sampled"}})
    cache, distill = run_job(load_job(job))
    assert cache["cache"]["targets"] == "sampled" and cache["cache"]["tailMass"] == 0
    folder = _stage(tmp_path, "sampled", "cache-teacher")
    arrays = load_file(folder / cache["files"][0]["path"])
    steps = arrays["steps"].float() / 16  # nats below the most drawn token
    drawn = steps < 15.9  # the rest sit at the floor
    counts = torch.where(drawn, (-steps).exp(), torch.zeros_like(steps)).sum(-1)  # shares over the top one's
    assert torch.allclose(counts * arrays["top"].float().exp(), torch.ones_like(counts), atol=0.05)
    assert distill["metrics"]["studentPerplexityAfter"] < distill["metrics"]["studentPerplexityBefore"]

    top = job_file("top", training={"maxSteps": 4}, teacher={"cache": {"topK": 16}})
    assert run_job(load_job(top))[0]["files"][0]["path"] != cache["files"][0]["path"]  # another cache, not mixed
    (folder / "manifest.json").unlink()
    for record in folder.glob("*.json"):
        record.unlink()
    (tmp_path / "runs" / "sampled" / "distill" / "manifest.json").unlink()
    again = run_job(load_job(job))[0]
    assert again["files"] == cache["files"]  # seeded by shard: the same draws


def test_a_top_k_cache_is_read_by_another_student_and_refused_for_another_corpus(job_file, tmp_path, corpus_dir):
    maker = job_file("maker", training={"maxSteps": 2}, teacher={"cache": {"topK": 16}})
    cache, _ = run_job(load_job(maker))
    folder = _stage(tmp_path, "maker", "cache-teacher")
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert [entry["path"] for entry in cache["files"]] == [shard.name for shard in shards]
    arrays = load_file(shards[0])
    assert arrays["ids"].dtype == torch.uint8 and arrays["steps"].shape[-1] == 16
    assert cache["cache"]["bytesPerToken"] == 4 + 16 * 3 == 52
    tails = torch.cat([load_file(shard)["tail"].float().exp().flatten() for shard in shards])
    assert cache["cache"]["tailMass"] == pytest.approx(float(tails.mean()), abs=1e-4)
    assert 0 < cache["cache"]["tailMass"] < 1

    uri = str(folder) + "/"
    reader = job_file(
        "reader", training={"maxSteps": 2}, student={"fromTeacher": {"numLayers": 3}}, teacher={"cache": {"uri": uri}}
    )
    [distill] = run_job(load_job(reader))  # no cache stage of its own
    assert distill["metrics"]["teacherPerplexity"] == cache["metrics"]["teacherPerplexity"]

    (corpus_dir / "extra.txt").write_text("A module that was not there when the cache was made.\n" * 40)
    other = job_file("other", training={"maxSteps": 2}, teacher={"cache": {"uri": uri}})
    with pytest.raises(StageError, match=r"made for another corpusHash than this job's"):
        run_job(load_job(other))

    shards[0].write_bytes(shards[0].read_bytes()[:-10])  # cut short after it was published
    (corpus_dir / "extra.txt").unlink()
    late = job_file("late-reader", training={"maxSteps": 2}, teacher={"cache": {"uri": uri}})
    with pytest.raises(StageError, match=r"shard-.*missing or differs from its manifest"):
        run_job(load_job(late))


def test_a_cache_stage_resumes_at_its_first_missing_shard(job_file, tmp_path, monkeypatch):
    from potential_meme.engine import cache_stage

    monkeypatch.setattr(cache_stage, "SHARD_ROWS", 4)  # several shards from the tiny corpus
    job = job_file("resumed", training={"maxSteps": 1}, teacher={"cache": {"topK": 8}})
    folder = _stage(tmp_path, "resumed", "cache-teacher")
    first = run_job(load_job(job))[0]
    shards = first["cache"]["shards"]
    assert len(shards) > 2
    # A stage stopped after two shards: their records stay, the rest and the manifest are gone.
    for name in shards[2:]:
        (folder / name).unlink()
        (folder / name.replace(".safetensors", ".json")).unlink()
    (folder / "manifest.json").unlink()
    written = {name: (folder / name).stat().st_mtime_ns for name in shards[:2]}
    (tmp_path / "runs" / "resumed" / "distill" / "manifest.json").unlink()
    again = run_job(load_job(job))[0]
    assert again["files"] == first["files"]  # the same bytes, made again where missing
    assert {name: (folder / name).stat().st_mtime_ns for name in shards[:2]} == written  # kept, not redone


def test_run_shows_the_cache_stage_in_its_table(job_file, corpus_dir):
    validated = {"validation": [{"name": "again", "source": str(corpus_dir)}]}
    job = job_file("shown", training={"maxSteps": 1}, teacher={"cache": {"topK": 4}}, dataset=validated)
    finished = cli("run", str(job))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert re.search(r"cache-teacher +[\d,]+ tokens cached, top 4, 16 bytes a token", finished.stdout)
    assert re.search(r"distill +again +[\d,.]+ +[\d,.]+ +[\d,.]+", finished.stdout)  # the teacher's, from the cache


def test_a_cache_is_refused_where_the_method_needs_the_teacher(job_file):
    layerwise = {"layerwise": {"teacherLayers": [2], "studentLayers": [1]}}
    with pytest.raises(SpecError, match="teacher.cache: a cache holds the teacher's output distributions"):
        load_job(job_file("layered", method=layerwise, teacher={"cache": {"topK": 8}}))
    with pytest.raises(SpecError, match="set exactly one of topK"):
        load_job(job_file("both", teacher={"cache": {"topK": 8, "uri": "s3://b/c/"}}))


def test_a_teacher_sharded_over_two_processes_makes_the_cache_one_process_makes(job_file, tmp_path):
    """With fsdp the cache-teacher stage shards the teacher, read by rank 0 alone. The processes write every
    other shard of the corpus, and the one with fewer runs as many forwards as the other, so that every layer
    is gathered by both: the shards are the bytes one process writes."""
    from helpers import Ranks

    whole = run_job(load_job(job_file("whole", training={"maxSteps": 1}, teacher={"cache": {"topK": 16}})))[0]
    job = job_file(
        "sharded",
        training={"maxSteps": 1, "strategy": "fsdp", "batchSize": 2},  # 2 x 2 rows a step, as whole's 4
        teacher={"cache": {"topK": 16}},
        resources={"gpusPerNode": 2},
    )
    ranks = Ranks(2, ["train", "--job", str(job), "--stage", "cache-teacher"])
    output = ranks.communicate(timeout=600)[0]
    assert ranks.returncode == 0, output[-4000:]
    assert "teacher cache: the teacher sharded over 2 processes" in output
    assert "rank 1 reads no weights" in output
    sharded = json.loads((_stage(tmp_path, "sharded", "cache-teacher") / "manifest.json").read_text())
    assert len(whole["files"]) == 5  # 3 for rank 0, 2 for rank 1, which then keeps rank 0's pace
    assert [(f["path"], f["sha256"]) for f in sharded["files"]] == [(f["path"], f["sha256"]) for f in whole["files"]]
    assert sharded["metrics"]["teacherPerplexity"] == pytest.approx(whole["metrics"]["teacherPerplexity"], rel=1e-5)

    # The distill stage reads the cache: the teacher only gives the student its layers and is never sharded.
    ranks = Ranks(2, ["train", "--job", str(job), "--stage", "distill"])
    output = ranks.communicate(timeout=600)[0]
    assert ranks.returncode == 0, output[-4000:]
    assert "its shards of the student come from rank 0" in output and "teacher and student" not in output
    assert re.search(r"strategy fsdp: .*estimated fsdp over 2 process\(es\), .*, no teacher, activations", output)
    assert json.loads((_stage(tmp_path, "sharded", "distill") / "manifest.json").read_text())["worldSize"] == 2
    assert_close_weights(_stage(tmp_path, "whole", "distill"), _stage(tmp_path, "sharded", "distill"))


def test_a_sharded_cache_stage_stopped_midway_resumes_with_the_processes_out_of_step(job_file, tmp_path):
    """A two-process stage stopped after some shards: rank 0 has two of its three left, rank 1 none of its two,
    so rank 1 runs only the forwards that keep rank 0's layers gathered; the cache is the same bytes."""
    from helpers import Ranks

    job = job_file(
        "stopped",
        training={"maxSteps": 1, "strategy": "fsdp"},
        teacher={"cache": {"topK": 16, "targets": "sampled"}},
        resources={"gpusPerNode": 2},
    )
    folder = _stage(tmp_path, "stopped", "cache-teacher")

    def make() -> dict:
        ranks = Ranks(2, ["train", "--job", str(job), "--stage", "cache-teacher"])
        output = ranks.communicate(timeout=600)[0]
        assert ranks.returncode == 0, output[-4000:]
        return json.loads((folder / "manifest.json").read_text())

    first = make()
    shards = first["cache"]["shards"]
    assert len(shards) == 5  # rank 0 writes 0, 2 and 4; rank 1 writes 1 and 3
    (folder / "manifest.json").unlink()
    for name in (shards[2], shards[4]):  # as if stopped before these were recorded
        (folder / name).unlink()
        (folder / name.replace(".safetensors", ".json")).unlink()
    assert make()["files"] == first["files"]
