"""DDP under torchrun: 2 CPU processes on the gloo backend stand in for 2 GPUs."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from helpers import cli, cli_env, free_port


def assert_same_weights(first, second):
    """Equal up to summation order, entry by entry, but for a few entries of any tensor: Adam's first update is
    lr * g / (|g| + eps), so an entry whose gradient is within rounding of zero (most rows of the tied embedding,
    whose tokens never occur, and the odd entry elsewhere) moves by up to lr either way on another CPU's kernels."""
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    for name, value in b.items():
        differing = ~torch.isclose(a[name], value, rtol=1e-4, atol=1e-5)
        largest = (a[name] - value).abs().max().item()
        assert differing.float().mean() < 0.01, (
            f"{name}: {differing.sum()} of {value.numel()} entries differ, by up to {largest:.2e}"
        )


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(job_file, tmp_path):
    # 2 processes x batch 2 take exactly the rows that 1 process x batch 4 takes at each step.
    ddp_job = job_file(
        "ddp", training={"batchSize": 2, "maxSteps": 4, "maxGradNorm": None}, resources={"nodes": 1, "gpusPerNode": 2}
    )
    single_job = job_file("single", training={"batchSize": 4, "maxSteps": 4, "maxGradNorm": None})
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    ddp = subprocess.run(
        [*torchrun, "-m", "potential_meme.cli", "train", "--job", str(ddp_job), "--stage", "distill"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = cli("train", "--job", str(single_job), "--stage", "distill", timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]

    runs = tmp_path / "runs"
    ddp_manifest = json.loads((runs / "ddp/distill/manifest.json").read_text())
    single_manifest = json.loads((runs / "single/distill/manifest.json").read_text())
    assert ddp_manifest["worldSize"] == 2 and single_manifest["worldSize"] == 1
    assert ddp_manifest["metrics"]["tokens"] == single_manifest["metrics"]["tokens"]
    assert abs(ddp_manifest["metrics"]["finalLoss"] - single_manifest["metrics"]["finalLoss"]) < 1e-4
    assert_same_weights(
        runs / "ddp/distill/student/model.safetensors", runs / "single/distill/student/model.safetensors"
    )


def test_gradient_accumulation_matches_the_larger_batch(job_file, tmp_path):
    from potential_meme.engine.trainer import run_job
    from potential_meme.spec import load_job

    accumulated = job_file("accumulated", training={"batchSize": 2, "gradientAccumulationSteps": 2, "maxSteps": 3})
    whole = job_file("whole", training={"batchSize": 4, "maxSteps": 3})
    first = run_job(load_job(accumulated))[-1]
    second = run_job(load_job(whole))[-1]
    assert first["metrics"]["tokens"] == second["metrics"]["tokens"]
    assert abs(first["metrics"]["finalLoss"] - second["metrics"]["finalLoss"]) < 1e-4
    runs = tmp_path / "runs"
    assert_same_weights(
        runs / "accumulated/distill/student/model.safetensors", runs / "whole/distill/student/model.safetensors"
    )
