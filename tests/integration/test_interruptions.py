"""A run stopped any way resumes where its last checkpoint left it: SIGTERM, SIGKILL under DDP, a
different number of processes, checkpoints on S3."""

import json
import re
import signal
import time

import boto3
import pytest
from test_ddp import assert_same_weights

from potential_meme.engine import checkpoint
from potential_meme.engine.resume import accumulation_for
from potential_meme.spec import load_job
from potential_meme.spec.errors import StageError
from potential_meme.storage import open_store

from helpers import Ranks, start_cli

PREEMPTED = 143  # 128 + SIGTERM: Kubeflow restarts the pod (restartPolicy ExitCode)


def _kill_after_a_checkpoint(ranks: Ranks, stage_dir) -> int:
    """SIGKILL every rank once a checkpoint is complete, as a node failure would; returns the newest step saved."""
    deadline = time.monotonic() + 300
    while not list(stage_dir.glob("checkpoints/step-*/COMPLETE")):
        assert ranks.poll() is None, ranks.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ranks.kill()
    ranks.wait()
    assert not (stage_dir / "manifest.json").exists(), "the run finished before it could be killed"
    return max(int(p.parent.name.removeprefix("step-")) for p in stage_dir.glob("checkpoints/step-*/COMPLETE"))


def test_sigterm_writes_a_checkpoint_at_the_end_of_the_step_and_exits_for_a_restart(job_file, tmp_path):
    job = job_file("drained", training={"maxSteps": 40}, checkpoint={"everySteps": 1000})  # none but SIGTERM's
    stage = tmp_path / "runs" / "drained" / "distill"
    process = start_cli("run", str(job))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if (match := re.search(r"step (\d+)/40", line)) and int(match.group(1)) >= 3:
            process.send_signal(signal.SIGTERM)
            signalled_after = int(match.group(1))
            break
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode == PREEMPTED, output
    assert re.search(r"SIGTERM: step \d+ is done; writing a checkpoint and stopping", output)
    assert "preempted: stopped by SIGTERM after step" in output and "Traceback" not in output
    saved = checkpoint.complete_steps(open_store(str(stage)))
    assert len(saved) == 1 and saved[0] >= signalled_after, (saved, signalled_after)
    steps_logged = [int(n) for n in re.findall(r"step (\d+)/40", output)]
    assert max(steps_logged) == saved[0]  # every step done is in the checkpoint: nothing lost

    rerun = start_cli("run", str(job))
    rerun_output = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, rerun_output
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["resumedFromStep"] == saved[0] and manifest["metrics"]["steps"] == 40


def test_sigkill_under_ddp_resumes_on_two_processes_or_on_one_with_the_same_global_batch(job_file, tmp_path):
    training = {"batchSize": 2, "maxSteps": 10, "maxGradNorm": None}
    reference = job_file("reference", training={**training, "gradientAccumulationSteps": 2})  # 1 process, 2 x 2
    assert start_cli("run", str(reference)).wait(timeout=600) == 0
    expected = tmp_path / "runs" / "reference" / "distill" / "student" / "model.safetensors"

    for name, resume_processes in (("again-on-two", 2), ("then-on-one", 1)):
        job = job_file(name, training=training, checkpoint={"everySteps": 2}, resources={"gpusPerNode": 2})
        stage = tmp_path / "runs" / name / "distill"
        train = ["train", "--job", str(job), "--stage", "distill"]
        saved = _kill_after_a_checkpoint(Ranks(2, train), stage)
        resumed = Ranks(resume_processes, train)
        output = resumed.communicate(timeout=600)[0]
        assert resumed.returncode == 0, output[-4000:]
        manifest = json.loads((stage / "manifest.json").read_text())
        assert (manifest["resumedFromStep"] or 0) >= saved, output[-4000:]
        assert manifest["worldSize"] == resume_processes
        if resume_processes == 1:
            assert "resuming on 1 process(es) x 2 to keep its global batch of 4 sequences per step" in output
        # Data order, schedule and optimizer state carried over: the uninterrupted result, up to summation order.
        assert_same_weights(expected, stage / "student" / "model.safetensors")


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_with_what_to_do(job_file):
    job = load_job(job_file("resized", training={"batchSize": 2}))
    restored = checkpoint.Restored(8, {}, {"world_size": 2, "accumulation": 1})
    with pytest.raises(StageError) as refused:
        accumulation_for(job, restored, world_size=3)
    message = str(refused.value)
    assert "checkpoint at step 8 was made by 2 process(es) taking 2 micro-batches of 2 per step" in message
    assert "resume with 1, 2 processes" in message and "delete the stage's checkpoints/" in message
    assert accumulation_for(job, checkpoint.Restored(8, {}, {"world_size": 4, "accumulation": 3}), 6) == 2


def test_a_run_checkpointing_to_s3_resumes_from_s3(job_file, s3_endpoint):
    job = job_file("remote", training={"maxSteps": 60}, checkpoint={"everySteps": 5}, output={"uri": "s3://models/r"})
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    process = start_cli("run", str(job))
    deadline = time.monotonic() + 300
    while not any(
        key["Key"].endswith("/COMPLETE")
        for key in client.list_objects_v2(Bucket="models", Prefix="r/remote/distill/checkpoints/").get("Contents", [])
    ):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    process.kill()
    process.wait()
    rerun = start_cli("run", str(job))
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    manifest = json.loads(client.get_object(Bucket="models", Key="r/remote/distill/manifest.json")["Body"].read())
    assert manifest["resumedFromStep"] >= 5 and manifest["metrics"]["steps"] == 60
    assert re.search(r"resuming remote/distill from checkpoint at step \d+", output)


def test_a_sharded_run_checkpointing_to_s3_resumes_from_its_shards_there(job_file, s3_endpoint):
    job = job_file(
        "remote-sharded",
        training={"maxSteps": 30, "strategy": "fsdp", "batchSize": 2},
        checkpoint={"everySteps": 5},
        output={"uri": "s3://models/r"},
        resources={"gpusPerNode": 2},
    )
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = "r/remote-sharded/distill/checkpoints/"

    def keys() -> list[str]:
        return [key["Key"] for key in client.list_objects_v2(Bucket="models", Prefix=prefix).get("Contents", [])]

    ranks = Ranks(2, ["train", "--job", str(job), "--stage", "distill"])
    deadline = time.monotonic() + 300
    while not any(key.endswith("/COMPLETE") for key in keys()):
        assert ranks.poll() is None, ranks.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ranks.kill()
    ranks.wait()
    complete = min(key for key in keys() if key.endswith("/COMPLETE")).removesuffix("COMPLETE")
    assert sorted(key.removeprefix(complete) for key in keys() if key.startswith(complete)) == [
        "COMPLETE",
        "student/shard-00001-model-00001-of-00001.safetensors",
        "student/shard-00002-model-00001-of-00001.safetensors",
        "training_state.pt",
    ]
    rerun = Ranks(2, ["train", "--job", str(job), "--stage", "distill"])
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-4000:]
    manifest = json.loads(
        client.get_object(Bucket="models", Key="r/remote-sharded/distill/manifest.json")["Body"].read()
    )
    assert manifest["resumedFromStep"] >= 5 and manifest["metrics"]["steps"] == 30
    assert manifest["metrics"]["strategy"] == "fsdp"


SLOW_RANK_ZERO = """
import sys, time
from potential_meme.engine import checkpoint
real_save = checkpoint.save

def slow_save(*args, **kwargs):  # a big checkpoint to a slow store, as rank 0 sees it
    time.sleep(float(sys.argv[1]))
    real_save(*args, **kwargs)

checkpoint.save = slow_save
from potential_meme.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("minutes,survives", [(0.05, False), (0.5, True)])
def test_the_other_ranks_wait_for_a_slow_upload_as_long_as_configured(job_file, tmp_path, minutes, survives):
    script = tmp_path / "slow_rank_zero.py"
    script.write_text(SLOW_RANK_ZERO)
    job = job_file(
        "slow",
        training={"batchSize": 2, "maxSteps": 3},
        checkpoint={"everySteps": 2, "uploadTimeoutMinutes": minutes},
        resources={"gpusPerNode": 2},
    )
    ranks = Ranks(2, ["8", "train", "--job", str(job), "--stage", "distill"], script=script)
    output = ranks.communicate(timeout=300)[0]
    finished = (tmp_path / "runs" / "slow" / "distill" / "manifest.json").exists()
    if survives:  # 8 s of upload within a 30 s timeout
        assert ranks.returncode == 0 and finished, output[-3000:]
    else:  # within 3 s: the waiting rank gives up, as it would after 60 minutes by default
        assert ranks.returncode != 0 and not finished
        assert re.search(r"[Tt]imed? ?out", output), output[-3000:]
