"""Refuse early: what the models' configs refute fails before any weights load, naming the field."""

import json

import pytest
import yaml
from transformers import AutoTokenizer

from potential_meme.engine.trainer import run_job
from potential_meme.spec import SpecError, load_job

from helpers import cli, save_tiny_llama


def _refused(path, monkeypatch):
    """The SpecError of running `path`; loading any weights on the way fails the test."""
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the spec was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(SpecError) as refused:
        run_job(load_job(path))
    return str(refused.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"student": {"fromTeacher": {"numLayers": 9}}},
            "spec.student.fromTeacher.numLayers: 9 is more than the teacher's 4 decoder layers; choose 1 to 4",
        ),
        (
            {"method": {"layerwise": {"teacherLayers": [2, 7], "studentLayers": [1, 2]}}},
            "spec.method.layerwise.teacherLayers: [7] beyond the model's 4 decoder layers",
        ),
        (
            {"method": {"layerwise": {"teacherLayers": [2, 4], "studentLayers": [1, 3]}}},
            "spec.method.layerwise.studentLayers: [3] beyond the model's 2 decoder layers",
        ),
        (
            {"student": None, "method": {"progressive": {"intermediateSizes": [900000], "finalSize": "50k"}}},
            "spec.method.progressive.intermediateSizes.0: 900,000 parameters is not smaller than the teacher's",
        ),
        (
            {"training": {"maxSeqLength": 512}},
            "spec.training.maxSeqLength: 512 tokens is more than the teacher's context of 256",
        ),
    ],
)
def test_what_the_configs_refute_is_refused_before_any_weights_load(job_file, monkeypatch, change, message):
    assert message in _refused(job_file("early", **change), monkeypatch)


def test_an_output_that_cannot_be_written_is_refused_before_training(job_file, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    message = _refused(job_file("nowhere", output={"uri": str(tmp_path / "a-file" / "runs")}), monkeypatch)
    assert "spec.output.uri: cannot write to" in message and "is not a folder this user can write" in message


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_torch_cannot_take_is_a_field_error(job_file, seed):
    with pytest.raises(SpecError, match="spec.training.seed"):
        load_job(job_file("seeded", training={"seed": seed}))


def test_a_job_file_that_is_not_utf8_gets_a_clear_error(job_file):
    path = job_file("latin")
    path.write_bytes(path.read_bytes().replace(b"latin", b"lat\xefn"))
    result = cli("run", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not UTF-8 (byte 0xef at offset" in result.stderr and "save it as UTF-8" in result.stderr


def _student(root, tokenizer_dir, vocab_rows=None, tokenizer=None):
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(tokenizer_dir)
    save_tiny_llama(root, tokenizer, hidden_size=32, layers=2, seed=1, vocab_rows=vocab_rows)
    return str(root)


def test_a_student_padded_to_another_vocabulary_size_is_distilled_on_the_shared_tokens(
    job_file, tiny_teacher_dir, tmp_path, caplog
):
    import logging

    student = _student(tmp_path / "padded-student", tiny_teacher_dir, vocab_rows=576)  # teacher: 512 rows
    with caplog.at_level(logging.INFO, logger="potential_meme"):
        manifest = run_job(load_job(job_file("padded", student={"model": student, "fromTeacher": None})))[-1]
    assert "share a tokenizer of 512 tokens but have 512 and 576 output rows" in caplog.text
    assert manifest["metrics"]["studentPerplexityAfter"] < manifest["metrics"]["studentPerplexityBefore"]
    saved = json.loads((tmp_path / "runs" / "padded" / "distill" / "student" / "config.json").read_text())
    assert saved["vocab_size"] == 576


def test_a_student_with_another_tokenizer_is_refused_naming_both_models(job_file, tiny_teacher_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tokenizer.add_tokens(["<tool_call>"])  # one token more: ids and strings no longer match the teacher's
    student = _student(tmp_path / "other-student", tiny_teacher_dir, tokenizer=tokenizer)
    path = job_file("foreign", student={"model": student, "fromTeacher": None})
    result = cli("run", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"spec.student.model: {student} and the teacher" in result.stderr
    assert "different tokenizers (513 and 512 tokens; first difference: ('<tool_call>', 512))" in result.stderr
    document = yaml.safe_load(path.read_text())
    assert document["spec"]["student"]["model"] == student
