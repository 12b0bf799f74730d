"""Exports run in their own runtimes and compute the student's logits, at every length checked."""

from __future__ import annotations

import sys

import pytest
import torch

from potential_meme.engine.models import load_model
from potential_meme.export import ExportMismatch, ExportUnavailable, LogitsOnly, _difference, export_model
from potential_meme.export import onnx as onnx_format
from potential_meme.spec import SpecError


@pytest.fixture(scope="module")
def student(tiny_teacher_dir):
    return load_model(str(tiny_teacher_dir))


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    student.train()
    results = export_model(student, ["onnx", "executorch", "tflite"], tmp_path_factory.mktemp("exported"))
    assert student.training  # the caller's model comes back as it was given
    return results


@pytest.mark.parametrize("name", ["onnx", "executorch"])
def test_an_export_runs_in_its_runtime_and_matches_pytorch_at_every_length(student, exported, name):
    result = exported[name]
    assert result.files[0].name.startswith("student.")
    assert result.bytes > 4 * sum(p.numel() for p in student.parameters())  # fp32 weights, all of them
    assert result.check_lengths == [5, 17, 64]  # one export serves every length: the sequence axis is dynamic
    assert result.max_logit_difference < 1e-4 and result.latency_ms > 0
    assert result.runtime.split()[0] == {"onnx": "onnxruntime", "executorch": "executorch"}[name]
    assert result.as_dict()["files"] == [path.name for path in result.files]


def test_a_tflite_file_converted_in_its_own_environment_matches_pytorch_at_every_length(student, exported):
    result = exported["tflite"]
    assert result.as_dict()["files"] == ["student.tflite"] and result.bytes > 4 * student.num_parameters()
    assert result.check_lengths == [5, 17, 64]  # prompts right-padded to the graph's fixed length
    assert result.max_logit_difference < 1e-4 and result.latency_ms > 0
    assert result.runtime.startswith("LiteRT interpreter (ai-edge-litert")


def test_without_the_tflite_converter_the_error_says_how_to_get_it(student, tmp_path, monkeypatch):
    monkeypatch.delenv("POTENTIAL_MEME_TFLITE_PYTHON", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *rest: None)  # this environment lacks it
    with pytest.raises(ExportUnavailable, match="tflite export needs litert-torch .* set POTENTIAL_MEME_TFLITE_PYTHON"):
        export_model(student, ["tflite"], tmp_path)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML runs, and the check above applies")
def test_a_core_ml_package_is_converted_and_its_interface_checked_where_core_ml_cannot_run(student, tmp_path):
    result = export_model(student, ["coreml"], tmp_path)["coreml"]
    report = result.as_dict()
    assert "student.mlpackage/Manifest.json" in report["files"] and result.bytes > 4 * student.num_parameters()
    assert report["maxLogitDifference"] is None and report["latencyMs"] is None
    assert report["runtime"].startswith("not run: Core ML predicts on macOS only")
    context = student.config.max_position_embeddings - 1
    assert report["declared"] == {
        "input_ids": {"dataType": "INT32", "shapeRanges": [[1, 1], [2, context]]},
        "causal_mask": {"dataType": "FLOAT32", "shapeRanges": [[1, 1], [1, 1], [2, context], [2, context]]},
        "logits": {"dataType": "FLOAT32", "shapeRanges": []},
    }


@pytest.fixture(scope="module")
def exported_fp16(student, tmp_path_factory):
    return export_model(
        student, ["onnx", "executorch", "tflite", "coreml"], tmp_path_factory.mktemp("fp16"), precision="fp16"
    )


@pytest.mark.parametrize("name", ["onnx", "executorch", "tflite", "coreml"])
def test_an_fp16_export_stores_two_bytes_a_weight_and_stays_within_rounding_of_fp32(
    student, exported, exported_fp16, name
):
    half = exported_fp16[name]
    assert half.precision == "fp16" and half.as_dict()["precision"] == "fp16"
    if name in exported:  # ~2 bytes saved a weight (casts added; a tiny model's files are mostly graph, not weights)
        assert exported[name].bytes - half.bytes > 1.5 * student.num_parameters()
    if half.max_logit_difference is not None:  # run in its runtime (Core ML: macOS only)
        assert 0 < half.max_logit_difference < 2e-2  # rounding, not a wrong graph (tiny logits here: below 1)


def test_a_wrong_export_is_caught_by_its_check(tiny_teacher_dir, exported):
    run, _ = onnx_format.runner(exported["onnx"].files[0])
    changed = load_model(str(tiny_teacher_dir))
    with torch.no_grad():
        changed.model.norm.weight.mul_(1.01)  # the model the file claims to be, 1 % off
    with pytest.raises(ExportMismatch, match="differ from PyTorch's"):
        _difference(LogitsOnly(changed).eval(), run, [torch.arange(9).unsqueeze(0)], "onnx")


def test_a_half_precision_model_is_exported_in_fp32_and_left_as_it_was(tiny_teacher_dir, tmp_path):
    half = load_model(str(tiny_teacher_dir), dtype=torch.bfloat16)
    result = export_model(half, ["executorch"], tmp_path)["executorch"]
    assert next(half.parameters()).dtype == torch.bfloat16
    assert result.bytes > 4 * sum(p.numel() for p in half.parameters()) and result.max_logit_difference < 1e-4


def test_unknown_formats_are_named(student, tmp_path):
    with pytest.raises(SpecError, match="formats: .*'jpeg'.*choose from onnx, executorch, coreml, tflite"):
        export_model(student, ["onnx", "jpeg"], tmp_path)


def test_a_missing_converter_names_what_to_install(student, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as on a machine without the export extra
    with pytest.raises(ExportUnavailable, match="onnx export needs the 'export' extra"):
        export_model(student, ["onnx"], tmp_path)
