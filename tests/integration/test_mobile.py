"""Mobile distillation end to end: architectures derived from the teacher measured on this machine, the one
within the targets that `optimizeFor` prefers distilled (stage distill), then exported and run in each format's
runtime (stage export)."""

import json

import pytest
from test_library import metric_samples
from transformers import AutoModelForCausalLM

from potential_meme.distillation import MobileDistiller
from potential_meme.engine.mobile import NEAR_THE_LARGEST
from potential_meme.spec import SpecError
from potential_meme.storage import file_sha256

from helpers import cli, free_port

ROOMY = {"target_size_mb": 1000, "target_latency_ms": 10_000}


def _distiller(teacher, tmp_path, name, **targets):
    return MobileDistiller(str(teacher), **targets, output_uri=str(tmp_path / "runs"), job_name=name, verbose=False)


def test_the_largest_architecture_within_roomy_targets_is_distilled_exported_and_checked(
    tiny_teacher_dir, corpus_dir, tmp_path
):
    distiller = _distiller(tiny_teacher_dir, tmp_path, "roomy", **ROOMY)
    port = free_port()
    result = distiller.distill_for_mobile(
        str(corpus_dir),
        optimize_for="accuracy",
        batch_size=4,
        max_steps=3,
        max_seq_length=64,
        learning_rate=1e-3,
        metrics_port=port,
    )
    candidates, chosen = result["candidates"], result["architecture"]
    # 4 teacher layers: students of 3, 2 and 1 layers, each at full, half and quarter MLP width, each in fp32 and fp16
    assert {(c["layers"], c["mlpWidth"], c["precision"]) for c in candidates} == {
        (d, w, p) for d in (3, 2, 1) for w in (128, 64, 32) for p in ("fp32", "fp16")
    }
    assert all(c["fits"] and c["latencyMs"] > 0 and c["energyPerToken"] > 0 for c in candidates)
    by_precision = {c["precision"]: c["weightBytes"] for c in candidates if (c["layers"], c["mlpWidth"]) == (3, 128)}
    assert by_precision["fp16"] * 2 == by_precision["fp32"]
    # accuracy: the most parameters, and of one architecture at two precisions the more precise
    assert (chosen["layers"], chosen["mlpWidth"], chosen["precision"]) == (3, 128, "fp32")
    assert result["energyUnit"].startswith(("joules", "CPU-seconds"))
    assert result["studentPerplexityAfter"] < result["studentPerplexityBefore"]

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "roomy" / "distill" / "student")
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (3, 128)
    assert sum(p.numel() for p in student.parameters()) == chosen["parameters"]

    export = tmp_path / "runs" / "roomy" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert set(result["exports"]) == {"onnx", "executorch"}
    for entry in manifest["files"]:
        assert file_sha256(export / entry["path"]) == entry["sha256"]
    for name, exported in result["exports"].items():
        assert exported["withinTargetSize"] and exported["maxLogitDifference"] < 1e-3, name
        assert exported["bytes"] == sum((export / file).stat().st_size for file in exported["files"])
    samples = metric_samples(port)

    def sample(name, **labels):
        return samples[
            (f"potential_meme_trainer_{name}", tuple(sorted({"job": "roomy", "stage": "export", **labels}.items())))
        ]

    for name, exported in result["exports"].items():
        assert sample("student_bytes", variant=name) == exported["bytes"]
        assert sample("export_max_logit_difference", format=name) == exported["maxLogitDifference"]
        seconds = sample("export_forward_seconds", format=name)
        assert seconds == pytest.approx(exported["latencyMs"] / 1000)


def test_a_size_target_leaves_out_what_is_larger_and_the_choice_follows_optimize_for(
    tiny_teacher_dir, corpus_dir, tmp_path
):
    roomy = _distiller(tiny_teacher_dir, tmp_path, "measure", **ROOMY)
    measured = roomy.distill_for_mobile(
        str(corpus_dir), "size", formats=["onnx"], batch_size=4, max_steps=1, max_seq_length=64
    )
    sizes = sorted({c["weightBytes"] for c in measured["candidates"]})
    target_mb = (sizes[len(sizes) // 2] + 1) / 1e6  # about half the candidates fit
    for optimize_for, prefers in (("size", "weightBytes"), ("latency", "latencyMs")):
        distiller = _distiller(tiny_teacher_dir, tmp_path, f"tight-{optimize_for}", target_size_mb=target_mb)
        result = distiller.distill_for_mobile(
            str(corpus_dir), optimize_for, formats=["onnx"], batch_size=4, max_steps=1, max_seq_length=64
        )
        fitting = [c for c in result["candidates"] if c["fits"]]
        assert fitting and all(c["weightBytes"] <= target_mb * 1e6 for c in fitting)
        assert {c["fits"] for c in result["candidates"]} == {True, False}
        largest = max(c["parameters"] for c in fitting)
        contenders = [c for c in fitting if c["parameters"] >= NEAR_THE_LARGEST * largest]
        chosen = result["architecture"]
        assert chosen == min(contenders, key=lambda c: (c[prefers], ["fp32", "fp16"].index(c["precision"])))
        exported = result["exports"]["onnx"]
        assert exported["precision"] == chosen["precision"]  # the file stores what the search chose
        assert exported["bytes"] >= chosen["weightBytes"]  # the weights, and a tiny model's graph around them


def test_impossible_targets_say_the_smallest_size_and_latency_reachable(tiny_teacher_dir, corpus_dir, tmp_path):
    distiller = _distiller(tiny_teacher_dir, tmp_path, "impossible", target_size_mb=0.001, target_latency_ms=0.001)
    with pytest.raises(SpecError) as raised:
        distiller.distill_for_mobile(str(corpus_dir), batch_size=4, max_steps=1, max_seq_length=64)
    message = str(raised.value)
    assert "spec.method.mobile: no student derived from the teacher fits 0.001 MB and 0.001 ms" in message
    assert "the smallest reaches" in message and "raise targetSizeMb or targetLatencyMs" in message


def test_a_mobile_job_runs_from_a_job_file_and_refuses_a_student_of_its_own(job_file, tmp_path):
    mobile = {"targetSizeMb": 1000, "targetLatencyMs": 10_000, "formats": ["executorch"], "chunkSize": 64}
    refused = job_file("with-student", method={"mobile": mobile})  # the fixture sets student.fromTeacher
    result = cli("run", str(refused))
    assert result.returncode == 2 and "student: leave it out for mobile" in result.stderr

    job = job_file("from-file", method={"mobile": mobile}, training={"maxSteps": 2})
    document = job.read_text().replace("  student:\n    fromTeacher:\n      numLayers: 2\n", "")
    job.write_text(document)
    result = cli("run", str(job))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "from-file" / "export" / "student.pte").stat().st_size > 0


def test_export_to_mobile_writes_what_is_asked_and_names_what_is_missing(tiny_teacher_dir, tmp_path):
    distiller = _distiller(tiny_teacher_dir, tmp_path, "export-only", **ROOMY)
    report = distiller.export_to_mobile(str(tiny_teacher_dir), formats=["onnx"], output_dir=tmp_path / "out")
    assert report["onnx"]["files"] == ["student.onnx"] and (tmp_path / "out" / "student.onnx").exists()
    with pytest.raises(SpecError, match="formats"):
        distiller.export_to_mobile(str(tiny_teacher_dir), formats=["nonesuch"], output_dir=tmp_path / "out")
