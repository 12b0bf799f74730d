"""A stage's student is read only as its manifest recorded it: by the next stage, an evaluation, the library."""

import json

import pytest

from potential_meme.engine.models import resolve
from potential_meme.spec.errors import StageError
from potential_meme.storage import file_sha256, open_store, sync_up


def _publish(stage, files):
    student = stage / "student"
    student.mkdir(parents=True)
    entries = []
    for name, data in files.items():
        (student / name).parent.mkdir(parents=True, exist_ok=True)
        (student / name).write_bytes(data)
        entries.append({"path": f"student/{name}", "sha256": file_sha256(student / name), "bytes": len(data)})
    (stage / "manifest.json").write_text(json.dumps({"files": entries}))
    return student


@pytest.mark.parametrize("reference", ["path", "file-uri", "s3"])
def test_a_student_changed_after_its_stage_finished_is_refused(tmp_path, reference, request):
    stage = tmp_path / "runs" / "job" / "distill"
    student = _publish(stage, {"config.json": b"{}", "model.safetensors": b"w" * 3000, "sub/tokenizer.json": b"{}"})
    uri = {"path": str(student), "file-uri": student.as_uri() + "/"}.get(reference)
    if reference == "s3":
        request.getfixturevalue("s3_endpoint")
        sync_up(open_store("s3://models/job/distill"), stage, "")
        uri = "s3://models/job/distill/student/"
        assert resolve(uri).directory  # as published: accepted
        sync_up(
            open_store("s3://models/job/distill/student"), _publish(tmp_path / "other", {"model.safetensors": b"v"}), ""
        )
    else:
        assert resolve(uri).directory == str(student.resolve())
        (student / "model.safetensors").write_bytes(b"w" * 1500)  # cut short
        (student / "sub" / "tokenizer.json").unlink()
    with pytest.raises(StageError, match="model.safetensors differs from the sha256 its manifest records") as refused:
        resolve(uri)
    assert "run that stage again" in str(refused.value)
    if reference != "s3":
        assert "sub/tokenizer.json is missing" in str(refused.value)


def test_a_model_folder_that_is_not_a_stage_output_is_not_checked(tmp_path):
    (tmp_path / "student").mkdir()  # named like one, but no manifest beside it
    (tmp_path / "student" / "config.json").write_text("{}")
    assert resolve(str(tmp_path / "student")).directory == str((tmp_path / "student").resolve())
