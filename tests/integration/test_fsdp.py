"""Sharded training (FSDP2) under gloo: the decoder layers of student and teacher split over 2 and 4 CPU
processes train exactly what one process trains, step by step, and a run sharded over 4 resumes on 2, or
whole on 1, from the shards each process checkpointed."""

import json
import re
import shutil
import time

import pytest
import torch
from test_ddp import assert_same_weights
from test_interruptions import _kill_after_a_checkpoint

from helpers import Ranks, save_tiny_llama, start_cli

TRAINING = {"batchSize": 1, "maxSteps": 6, "maxGradNorm": 0.5}  # clipped: the norm spans shards and whole tensors


def _ranks(processes: int, job, stage: str = "distill") -> Ranks:
    return Ranks(processes, ["train", "--job", str(job), "--stage", stage])


def _run_alone(job) -> None:
    """`potential-meme run` of `job` in one process: the reference a sharded run must match."""
    assert start_cli("run", str(job)).wait(timeout=600) == 0


def _run(processes: int, job, stage: str = "distill") -> str:
    ranks = _ranks(processes, job, stage)
    output = ranks.communicate(timeout=900)[0]
    assert ranks.returncode == 0, output[-4000:]
    return output


def _manifest(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "distill" / "manifest.json").read_text())


def _loss_curve(output: str) -> list[float]:
    """Each step's loss, as the log says it (`logEverySteps` 1)."""
    return [float(loss) for loss in re.findall(r"step \d+/\d+ loss (\d+\.\d+)", output)]


def _student(tmp_path, name: str):
    return tmp_path / "runs" / name / "distill" / "student" / "model.safetensors"


def test_fsdp_on_two_and_four_processes_trains_what_one_process_trains(job_file, tmp_path, tiny_teacher_dir):
    evaluated = {"evalEverySteps": 3, "earlyStoppingPatience": 5}  # the best student is gathered from shards
    reference = job_file("one", training={**TRAINING, **evaluated, "gradientAccumulationSteps": 4})
    one = start_cli("run", str(reference))
    output = one.communicate(timeout=600)[0]
    assert one.returncode == 0, output[-4000:]
    expected, expected_curve = _manifest(tmp_path, "one"), _loss_curve(output)
    assert len(expected_curve) == TRAINING["maxSteps"]
    for processes in (2, 4):
        name = f"sharded-{processes}"
        accumulation = 4 // processes
        job = job_file(
            name,
            training={**TRAINING, **evaluated, "gradientAccumulationSteps": accumulation, "strategy": "fsdp"},
            resources={"gpusPerNode": processes},
        )
        output = _run(processes, job)
        assert "strategy fsdp: training.strategy says so" in output
        assert _loss_curve(output) == pytest.approx(expected_curve, rel=1e-3)  # step by step, as logged
        for rank in range(1, processes):  # rank 0 alone reads the teacher and derives the student
            assert f"rank {rank} reads no weights of {tiny_teacher_dir}: its shards of teacher and student" in output
        manifest = _manifest(tmp_path, name)
        assert manifest["worldSize"] == processes and manifest["metrics"]["strategy"] == "fsdp"
        peaks = manifest["metrics"]["peakMemoryBytesByRank"]  # the resident sets of distinct processes
        assert len(peaks) == processes and len(set(peaks)) == processes and min(peaks) > 2**20
        assert peaks[0] == manifest["metrics"]["peakMemoryBytes"]
        for key in ("tokens", "steps"):
            assert manifest["metrics"][key] == expected["metrics"][key]
        for key in ("finalLoss", "studentPerplexityAfter", "studentPerplexityBefore", "teacherPerplexity"):
            assert abs(manifest["metrics"][key] - expected["metrics"][key]) < 1e-3 * expected["metrics"][key], key
        assert_same_weights(_student(tmp_path, "one"), _student(tmp_path, name))


def test_a_run_sharded_over_four_processes_resumes_on_two_or_whole_on_one(job_file, tmp_path):
    training = {**TRAINING, "maxSteps": 10}
    reference = job_file("reference", training={**training, "gradientAccumulationSteps": 4})
    _run_alone(reference)
    job = job_file(
        "resized",
        training={**training, "strategy": "fsdp"},
        checkpoint={"everySteps": 2},
        resources={"gpusPerNode": 4},
    )
    stage = tmp_path / "runs" / "resized" / "distill"
    saved = _kill_after_a_checkpoint(_ranks(4, job), stage)
    written = stage / f"checkpoints/step-{saved:08d}"
    # Each process wrote its own shards; no process gathered the student or its optimizer state.
    shards = {path.name: path.stat().st_size for path in (written / "student").iterdir()}
    assert len(shards) == 4 and not (written / "student.pt").exists()
    student_bytes = _student(tmp_path, "reference").stat().st_size  # the weights alone, whole
    assert sum(shards.values()) > 3 * student_bytes > 2 * max(shards.values())  # weights and two moments, spread
    assert (written / "training_state.pt").stat().st_size < student_bytes / 4
    shutil.copytree(stage, tmp_path / "runs" / "whole" / "distill")

    output = _run(2, job)
    assert "resuming on 2 process(es) x 2 to keep its global batch of 4 sequences per step" in output
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["resumedFromStep"] >= saved and manifest["worldSize"] == 2
    assert_same_weights(_student(tmp_path, "reference"), stage / "student" / "model.safetensors")

    # The same shards into one process holding a whole student, as ddp does.
    whole = job_file("whole", training={**training, "strategy": "ddp"}, checkpoint={"everySteps": 2})
    output = _run(1, whole)
    assert f"resuming whole/distill from checkpoint at step {saved}" in output
    assert _manifest(tmp_path, "whole")["metrics"]["strategy"] == "ddp"
    assert_same_weights(_student(tmp_path, "reference"), _student(tmp_path, "whole"))


def test_shards_written_by_two_processes_resume_on_three_that_split_every_tensor_unevenly(job_file, tmp_path):
    # Hidden size 64 and the tiny teacher's other dimensions do not divide by 3: FSDP pads the last shard.
    training = {**TRAINING, "maxSteps": 8}
    reference = job_file("reference", training={**training, "gradientAccumulationSteps": 6})
    _run_alone(reference)
    job = job_file(
        "odd",
        training={**training, "strategy": "fsdp", "gradientAccumulationSteps": 3},
        checkpoint={"everySteps": 2},
        resources={"gpusPerNode": 2},
    )
    stage = tmp_path / "runs" / "odd" / "distill"
    saved = _kill_after_a_checkpoint(_ranks(2, job), stage)
    output = _run(3, job)
    assert "resuming on 3 process(es) x 2 to keep its global batch of 6 sequences per step" in output
    manifest = _manifest(tmp_path, "odd")
    assert manifest["resumedFromStep"] >= saved and manifest["worldSize"] == 3
    assert_same_weights(_student(tmp_path, "reference"), _student(tmp_path, "odd"))


def test_the_best_student_is_kept_as_shards_through_a_checkpoint_and_published(job_file, tmp_path):
    # A rate that overshoots from the first step: the best student is the one training started from.
    training = {**TRAINING, "maxSteps": 10, "learningRate": 0.5, "evalEverySteps": 1, "earlyStoppingPatience": 20}
    reference = job_file("reference", training={**training, "gradientAccumulationSteps": 2})
    _run_alone(reference)
    expected = _manifest(tmp_path, "reference")["metrics"]
    assert expected["bestStep"] < expected["steps"] - 2
    job = job_file(
        "best",
        training={**training, "strategy": "fsdp"},
        checkpoint={"everySteps": 2},
        resources={"gpusPerNode": 2},
    )
    stage = tmp_path / "runs" / "best" / "distill"
    ranks = _ranks(2, job)
    deadline = time.monotonic() + 300
    while not list(stage.glob(f"checkpoints/step-{expected['steps'] - 2:08d}/COMPLETE")):  # past the best
        assert ranks.poll() is None, ranks.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ranks.kill()
    ranks.wait()
    training_state = torch.load(next(stage.glob("checkpoints/step-*/training_state.pt")), weights_only=True)[
        "early_stopping"
    ]
    assert training_state["best_in_shards"] and training_state["best_state"] is None  # rank 0 gathered nothing
    output = _run(2, job)
    assert "resuming best/distill from checkpoint" in output
    manifest = _manifest(tmp_path, "best")["metrics"]
    assert manifest["bestStep"] == expected["bestStep"]
    assert manifest["studentPerplexityAfter"] == pytest.approx(expected["studentPerplexityAfter"], rel=1e-3)
    assert_same_weights(_student(tmp_path, "reference"), _student(tmp_path, "best"))


def test_a_whole_checkpoint_resumes_sharded(job_file, tmp_path):
    training = {**TRAINING, "maxSteps": 10, "gradientAccumulationSteps": 4}
    reference = job_file("reference", training=training)
    _run_alone(reference)
    job = job_file("later-sharded", training={**training, "strategy": "ddp"}, checkpoint={"everySteps": 2})
    stage = tmp_path / "runs" / "later-sharded" / "distill"
    saved = _kill_after_a_checkpoint(_ranks(1, job), stage)
    assert (stage / f"checkpoints/step-{saved:08d}/student.pt").is_file()
    job = job_file(
        "later-sharded",
        training={**training, "strategy": "fsdp"},
        checkpoint={"everySteps": 2},
        resources={"gpusPerNode": 2},
    )
    output = _run(2, job)
    assert "resuming on 2 process(es) x 2 to keep its global batch of 4 sequences per step" in output
    manifest = _manifest(tmp_path, "later-sharded")
    assert manifest["resumedFromStep"] >= saved and manifest["metrics"]["strategy"] == "fsdp"
    assert_same_weights(_student(tmp_path, "reference"), _student(tmp_path, "later-sharded"))


def test_a_progressive_chain_pruned_by_rank_zero_alone_trains_what_one_process_trains(
    job_file, tmp_path, tiny_teacher_dir
):
    progressive = {"progressive": {"intermediateSizes": [150_000], "finalSize": "100k", "chunkSize": 64}}
    stages = ("distill-150k", "distill-100k")

    def chain(name: str, processes: int, **training) -> str:
        job = job_file(name, student=None, method=progressive, training={**TRAINING, **training})
        return "".join(_run(processes, job, stage) for stage in stages)

    chain("one", 1, gradientAccumulationSteps=2)
    output = chain("sharded", 2, gradientAccumulationSteps=1, strategy="fsdp")
    # Each stage's source (the teacher, then the stage before's student) is read and pruned by rank 0 alone.
    assert f"rank 1 reads no weights of {tiny_teacher_dir}: its shards of teacher and student" in output
    assert output.count("rank 1 reads no weights of") == 2 and "rank 0 reads no weights" not in output
    for stage in stages:
        one, sharded = (
            json.loads((tmp_path / "runs" / name / stage / "manifest.json").read_text()) for name in ("one", "sharded")
        )
        assert sharded["metrics"]["strategy"] == "fsdp" and sharded["worldSize"] == 2
        assert sharded["metrics"]["keptLayers"] == one["metrics"]["keptLayers"]
        assert sharded["metrics"]["parametersAfter"] == one["metrics"]["parametersAfter"]
        assert abs(sharded["metrics"]["finalLoss"] - one["metrics"]["finalLoss"]) < 1e-3 * one["metrics"]["finalLoss"]
        student = f"{stage}/student/model.safetensors"
        assert_same_weights(tmp_path / "runs/one" / student, tmp_path / "runs/sharded" / student)


def test_a_mobile_student_searched_and_built_by_rank_zero_alone_trains_what_one_process_trains(
    job_file, tmp_path, tiny_teacher_dir
):
    # Roomy targets: every candidate fits, and accuracy takes the largest, whatever the latencies measured.
    mobile = {"mobile": {"targetSizeMb": 1000, "targetLatencyMs": 10_000, "formats": ["onnx"], "chunkSize": 64}}
    for name, processes, training in (
        ("one", 1, {"gradientAccumulationSteps": 2}),
        ("sharded", 2, {"gradientAccumulationSteps": 1, "strategy": "fsdp"}),
    ):
        output = _run(processes, job_file(name, student=None, method=mobile, training={**TRAINING, **training}))
    assert output.count("mobile student: ") == 1  # rank 0 alone measured the candidates
    assert f"rank 1 reads no weights of {tiny_teacher_dir}: its shards of teacher and student" in output
    one, sharded = _manifest(tmp_path, "one"), _manifest(tmp_path, "sharded")
    assert sharded["metrics"]["strategy"] == "fsdp"
    chosen = ("layers", "mlpWidth", "precision")  # the same choice; its measured latency and energy differ
    assert [sharded["metrics"]["architecture"][key] for key in chosen] == [
        one["metrics"]["architecture"][key] for key in chosen
    ]
    assert sharded["metrics"]["keptLayers"] == one["metrics"]["keptLayers"]
    assert_same_weights(_student(tmp_path, "one"), _student(tmp_path, "sharded"))


def test_auto_shards_only_what_cannot_fit_whole(job_file, tmp_path, monkeypatch):
    """auto keeps whole copies when the estimate fits the device, and shards when told the device is small."""
    roomy = job_file("roomy", training={**TRAINING, "maxSteps": 2}, resources={"gpusPerNode": 2})
    output = _run(2, roomy)
    assert "strategy ddp: auto: whole copies of student and teacher, as it fits" in output
    assert _manifest(tmp_path, "roomy")["metrics"]["strategy"] == "ddp"
    monkeypatch.setenv("POTENTIAL_MEME_DEVICE_MEMORY", "4Mi")  # a device smaller than one whole copy
    cramped = job_file("cramped", training={**TRAINING, "maxSteps": 2}, resources={"gpusPerNode": 2})
    output = _run(2, cramped)
    assert "strategy fsdp: auto: whole copies would need" in output
    metrics = _manifest(tmp_path, "cramped")["metrics"]
    assert metrics["strategy"] == "fsdp" and metrics["memoryEstimateBytesPerDevice"] > 0


def test_a_student_of_its_own_is_read_by_rank_zero_alone_and_trains_what_one_process_trains(
    job_file, tmp_path, tiny_teacher_dir
):
    from potential_meme.engine.models import load_tokenizer

    student = tmp_path / "student"
    save_tiny_llama(student, load_tokenizer(str(tiny_teacher_dir)), hidden_size=32, layers=3, seed=1)
    named = {"student": {"model": str(student), "fromTeacher": None}, "training": TRAINING}
    _run_alone(job_file("whole", **named))
    job = job_file("sharded", **named | {"training": {**TRAINING, "strategy": "fsdp", "gradientAccumulationSteps": 1}})
    reference = job_file("whole-batch-4", **named | {"training": {**TRAINING, "gradientAccumulationSteps": 4}})
    _run_alone(reference)
    output = _run(4, job)
    for rank in (1, 2, 3):
        assert f"rank {rank} reads no weights of {tiny_teacher_dir}" in output
        assert f"rank {rank} reads no weights of {student}" in output
    assert "rank 0 reads no weights" not in output
    expected, manifest = _manifest(tmp_path, "whole-batch-4"), _manifest(tmp_path, "sharded")
    for key in ("finalLoss", "studentPerplexityAfter", "studentPerplexityBefore", "teacherPerplexity"):
        assert abs(manifest["metrics"][key] - expected["metrics"][key]) < 1e-3 * expected["metrics"][key], key
    assert_same_weights(_student(tmp_path, "whole-batch-4"), _student(tmp_path, "sharded"))


SHARDED_LOADING = """
import json, sys
import torch
from potential_meme.engine.models import load_config, load_model, resolve
from potential_meme.engine.runtime import start_runtime
from potential_meme.engine.sharding import load_sharded

def resident(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

runtime = start_runtime("fp32")
open("/proc/self/clear_refs", "w").write("5")  # the peak resident set starts again from here
before = resident("VmRSS")
reference = resolve(sys.argv[1])
model = load_sharded(reference, load_config(reference), torch.float32, runtime)
grown = resident("VmHWM") - before
tokens = torch.arange(64).reshape(2, 32) * 7 % model.config.vocab_size
with torch.no_grad():
    logits = model(tokens).logits
    difference = (logits - load_model(sys.argv[1])(tokens).logits).abs().max().item()
print("LOADED " + json.dumps({"rank": runtime.rank, "grown": grown, "difference": difference}))
"""


def test_sharded_loading_keeps_one_whole_copy_on_rank_zero_and_only_shards_elsewhere(tmp_path, tiny_teacher_dir):
    """Rank 0 reads the weights; rank 1 builds the model on the meta device and receives its half of each decoder
    layer (and the small whole parts), so its memory grows by about half the model's (plus what the allocator
    keeps of the tensors received one at a time), where reading the weights itself would cost it 1.5 models (the
    whole, then its shards). Both then compute the logits of a model loaded whole (rotary frequencies included)."""
    from potential_meme.engine.models import load_tokenizer

    model = tmp_path / "wide"
    save_tiny_llama(model, load_tokenizer(str(tiny_teacher_dir)), hidden_size=768, layers=12, seed=3)
    whole_bytes = (model / "model.safetensors").stat().st_size
    script = tmp_path / "sharded_loading.py"
    script.write_text(SHARDED_LOADING)
    ranks = Ranks(2, [str(model)], script=script)
    output = ranks.communicate(timeout=300)[0]
    assert ranks.returncode == 0, output[-3000:]
    loaded = {
        entry["rank"]: entry
        for entry in (json.loads(line[7:]) for line in output.splitlines() if line.startswith("LOADED "))
    }
    assert loaded[0]["grown"] > 0.9 * whole_bytes, (loaded, whole_bytes)
    assert loaded[1]["grown"] < 0.75 * whole_bytes, (loaded, whole_bytes)
    assert max(entry["difference"] for entry in loaded.values()) < 1e-5
