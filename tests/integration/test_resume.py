"""A run killed with SIGKILL after a checkpoint continues from that checkpoint, not from step 0."""

import hashlib
import json
import re
import signal
import time

from helpers import start_cli

STEPS = 80


def _start(path):
    return start_cli("run", str(path), "--metrics-port", "0")


def _weights_digest(stage):
    return hashlib.sha256((stage / "student" / "model.safetensors").read_bytes()).hexdigest()


def test_sigkill_after_a_checkpoint_resumes_there_and_matches_an_uninterrupted_run(job_file, tmp_path):
    training = {"maxSteps": STEPS, "maxSeqLength": 128, "batchSize": 8}
    uninterrupted = job_file("straight", training=training, checkpoint={"everySteps": 20})
    assert _start(uninterrupted).wait(timeout=600) == 0

    interrupted = job_file("killed", training=training, checkpoint={"everySteps": 20})
    stage = tmp_path / "runs" / "killed" / "distill"
    process = _start(interrupted)
    deadline = time.monotonic() + 300
    while not list(stage.glob("checkpoints/step-*/COMPLETE")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (stage / "manifest.json").exists(), "the run finished before it could be killed"
    saved = max(int(p.parent.name.removeprefix("step-")) for p in stage.glob("checkpoints/step-*/COMPLETE"))
    assert 20 <= saved < STEPS

    rerun = _start(interrupted)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    resumed = int(re.search(r"resuming killed/distill from checkpoint at step (\d+)", output).group(1))
    assert resumed >= saved
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["resumedFromStep"] == resumed and manifest["metrics"]["steps"] == STEPS
    assert f"step {resumed + 1}/{STEPS}" in output and "step 1/" not in output
    # Optimizer, schedule, RNG and data position were restored: the result is the uninterrupted one.
    straight = tmp_path / "runs" / "straight" / "distill"
    assert _weights_digest(stage) == _weights_digest(straight)
    assert (
        manifest["metrics"]["finalLoss"] == json.loads((straight / "manifest.json").read_text())["metrics"]["finalLoss"]
    )
