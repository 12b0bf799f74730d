"""`potential-meme run` / `train` end to end on a tiny teacher, in a subprocess like a user runs it."""

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from potential_meme.engine.data import pack, read_documents
from potential_meme.engine.models import load_tokenizer
from potential_meme.spec.models import TextSource

from helpers import SHARED, cli, cli_env


def test_run_distills_saves_a_loadable_student_and_skips_when_rerun(job_file, tmp_path):
    path = job_file(training={"maxSteps": 12})
    result = cli("run", str(path), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    stage = tmp_path / "runs" / "tiny" / "distill"
    manifest = json.loads((stage / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["steps"] == 12 and metrics["tokens"] == 12 * 4 * 64
    assert metrics["studentPerplexityAfter"] < metrics["studentPerplexityBefore"]
    # The derived student's layers were chosen by measured importance, and the measurement is kept.
    assert metrics["layerSelection"] == "importance" and len(metrics["keptLayers"]) == 2
    dropped = [entry["layer"] for entry in metrics["droppedLayers"]]
    assert sorted(dropped + metrics["keptLayers"]) == [0, 1, 2, 3]
    assert all(entry["influence"] > 0 for entry in metrics["droppedLayers"])
    assert f"student keeps teacher layers {metrics['keptLayers']}" in result.stderr
    assert f"held-out perplexity, teacher {metrics['teacherPerplexity']:,.2f}" in result.stdout
    assert f"{metrics['studentPerplexityBefore']:,.2f}" in result.stdout
    assert f"{metrics['studentPerplexityAfter']:,.2f}" in result.stdout
    # Every file of the student is listed with its hash, and the folder loads with plain transformers.
    listed = {f["path"] for f in manifest["files"]}
    assert {"student/config.json", "student/model.safetensors", "student/tokenizer.json"} <= listed
    student = AutoModelForCausalLM.from_pretrained(stage / "student")
    assert student.config.num_hidden_layers == 2
    assert not list((stage / "checkpoints").glob("step-*"))  # cleaned once the student is saved

    again = cli("run", str(path), "--metrics-port", "0")
    assert again.returncode == 0
    assert "skipped" in again.stderr
    assert json.loads((stage / "manifest.json").read_text()) == manifest


def test_further_validation_sets_are_measured_and_reported_apart_from_the_held_out_split(
    job_file, tmp_path, tiny_teacher_dir
):
    # Text of another kind than the corpus (docstrings): licence prose and a README.
    prose = tmp_path / "prose"
    prose.mkdir()
    for source in (SHARED / "evaldata/mt_bench/LICENSE", SHARED / "evaldata/README.md"):
        (prose / f"{source.parent.name}-{source.stem}.txt").write_text(source.read_text())
    path = job_file(
        dataset={"validation": [{"name": "prose", "source": str(prose), "maxSequences": 3}]},
        training={"maxSteps": 4},
    )
    result = cli("run", str(path), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs/tiny/distill/manifest.json").read_text())["metrics"]
    elsewhere = metrics["validationSets"]["prose"]
    assert elsewhere["sequences"] == 3
    # The teacher's number is its perplexity on the set's first 3 rows, computed here by plain transformers.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    rows = pack(read_documents(TextSource(source=str(prose))), load_tokenizer(str(tiny_teacher_dir)), 64, max_rows=3)
    with torch.no_grad():
        expected = math.exp(teacher(input_ids=rows, labels=rows).loss.item())
    # CPUs differ in their float kernels: CI's machine once put the two computations 9e-4 apart. (A random tiny
    # teacher finds every text about equally hard: its number here may lie close to its held-out split's.)
    assert elsewhere["teacherPerplexity"] == pytest.approx(expected, rel=2e-3)
    assert f"validation perplexity on prose: teacher {elsewhere['teacherPerplexity']:.2f}" in result.stderr
    row = next(line for line in result.stdout.splitlines() if "prose" in line).split()
    assert row[:2] == ["distill", "prose"]
    assert [float(v.replace(",", "")) for v in row[2:]] == pytest.approx(
        [elsewhere["teacherPerplexity"], elsewhere["studentPerplexityBefore"], elsewhere["studentPerplexityAfter"]],
        abs=0.01,
    )

    missing = job_file("missing", dataset={"validation": [{"name": "prose", "source": str(tmp_path / "nothing")}]})
    refused = cli("run", str(missing), "--metrics-port", "0")
    assert refused.returncode == 2
    assert f"spec.dataset.validation.0.source: {tmp_path / 'nothing'} does not exist" in refused.stderr


def test_a_changed_spec_does_not_silently_reuse_a_finished_stage(job_file, tmp_path):
    assert cli("run", str(job_file(training={"maxSteps": 2})), "--metrics-port", "0").returncode == 0
    changed = cli("run", str(job_file(training={"maxSteps": 3})), "--metrics-port", "0")
    assert changed.returncode == 3  # permanent: a retry cannot help
    assert "different spec" in changed.stderr and "Traceback" not in changed.stderr


@pytest.mark.parametrize(
    "change,fragment",
    [
        (
            {"method": {"knowledge": {"alpha": 1.5}}},
            "spec.method.knowledge.alpha: Input should be less than or equal to 1",
        ),
        ({"method": {"distil": {}}}, "spec.method: unknown method 'distil'; accepted methods: augmented, knowledge"),
        ({"training": {"batchSize": "eight"}}, "spec.training.batchSize"),
        ({"training": {"batchsize": 8}}, "spec.training.batchsize: unknown field; accepted fields: batchSize"),
        ({"teacher": {"model": "./no/such/dir"}}, "spec.teacher.model: ./no/such/dir: no such model directory"),
        ({"dataset": {"source": "./no/such/data"}}, "spec.dataset.source: ./no/such/data does not exist"),
    ],
)
def test_invalid_job_exits_2_with_the_field_path_and_no_traceback(job_file, tmp_path, change, fragment):
    path = job_file()
    document = yaml.safe_load(path.read_text())
    document["spec"].update(change)
    path.write_text(yaml.safe_dump(document))
    result = cli("run", str(path))
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_train_runs_one_named_stage_and_refuses_unknown_ones(job_file, tmp_path):
    path = job_file(training={"maxSteps": 2})
    unknown = cli("train", "--job", str(path), "--stage", "quantize")
    assert unknown.returncode == 2 and "has distill" in unknown.stderr
    assert cli("train", "--job", str(path), "--stage", "distill").returncode == 0
    assert (tmp_path / "runs" / "tiny" / "distill" / "manifest.json").exists()


def test_bf16_autocast_and_gradient_checkpointing_run(job_file, tmp_path):
    path = job_file(training={"maxSteps": 3, "precision": "bf16", "gradientCheckpointing": True})
    result = cli("run", str(path), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/tiny/distill/manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 3 and metrics["finalLoss"] > 0


def test_progress_bar_on_a_terminal_and_log_lines_elsewhere(job_file):
    import fcntl
    import os
    import pty
    import struct
    import termios

    path = job_file(training={"maxSteps": 3})
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    process = subprocess.Popen(
        [sys.executable, "-m", "potential_meme.cli", "run", str(path), "--metrics-port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=cli_env(),
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(timeout=120) == 0
    text = screen.decode(errors="replace")
    assert "tiny/distill" in text and "3/3" in text and "tok_s=" in text and "loss=" in text
    assert "step 3/3 loss" not in text  # the bar replaces the log lines


def test_the_pod_launcher_says_whether_a_retry_can_help(job_file, tmp_path):
    """What Kubeflow's restartPolicy ExitCode reads: 1-127 fail the stage at once, 128 and above restart the pod."""
    from potential_meme.launch import pod_exit_code

    def launch(path, processes=1):
        return cli("launch", f"--nproc-per-node={processes}", "--", "train", "--job", str(path), "--stage", "distill")

    # One process runs in the launcher's own; more run under torchrun, which alone exits 1 for any failure.
    for processes in (1, 2):
        missing_data = launch(job_file(dataset={"source": str(tmp_path / "nowhere")}), processes)
        assert missing_data.returncode == 2, missing_data.stderr
        assert "spec.dataset.source" in missing_data.stderr

    broken_teacher = tmp_path / "broken-teacher"
    broken_teacher.mkdir()
    (broken_teacher / "config.json").write_text("{not json")
    crash = launch(job_file("crash", teacher={"model": str(broken_teacher)}))
    assert crash.returncode == 128, crash.stderr  # an unforeseen crash: worth a restart within backoffLimit

    # A stage error (3, test_a_changed_spec_does_not_silently_reuse_a_finished_stage) wins over a crash too.
    assert [pod_exit_code(codes) for codes in ([0, 0], [1, 0], [-9, 0], [2, -15], [3, 1], [137])] == [
        0,
        128,
        128,
        2,
        3,
        128,
    ]
