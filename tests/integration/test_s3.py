"""Teacher, data and output on a real S3 server (moto's server mode) on 127.0.0.1, over HTTP."""

import json

import boto3

from potential_meme.engine.models import load_model
from potential_meme.storage import open_store, sync_up

from helpers import cli


def test_store_round_trip(s3_endpoint, tmp_path):
    store = open_store("s3://models/some/prefix")
    store.write_bytes("a/b.json", b"{}")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f.txt").write_text("hello")
    sync_up(store, tmp_path / "x", "dir")
    assert store.list() == ["a/b.json", "dir/f.txt"]
    assert store.exists("dir/f.txt") and not store.exists("dir/nope")
    assert store.read_bytes("dir/f.txt") == b"hello"
    store.delete_prefix("dir/")
    assert store.list() == ["a/b.json"]
    # The objects really are on the server, under the prefix.
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="models")["Contents"]]
    assert keys == ["some/prefix/a/b.json"]


def test_job_reads_teacher_and_data_from_s3_and_publishes_the_student_there(
    s3_endpoint, job_file, tiny_teacher_dir, corpus_dir
):
    sync_up(open_store("s3://models/teachers/tiny"), tiny_teacher_dir, "")
    sync_up(open_store("s3://models/corpora/stdlib"), corpus_dir, "")
    path = job_file(
        teacher={"model": "s3://models/teachers/tiny"},
        dataset={"source": "s3://models/corpora/stdlib"},
        training={"maxSteps": 4},
        output={"uri": "s3://models/runs"},
    )
    result = cli("run", str(path), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    store = open_store("s3://models/runs/tiny/distill")
    manifest = json.loads(store.read_bytes("manifest.json"))
    assert manifest["metrics"]["steps"] == 4
    for entry in manifest["files"]:
        assert store.exists(entry["path"])
    student = load_model("s3://models/runs/tiny/distill/student/")
    assert student.config.num_hidden_layers == 2


def test_run_honours_output_endpoint_as_the_pods_do(s3_endpoint, job_file, monkeypatch):
    import os

    from potential_meme.engine.trainer import run_job
    from potential_meme.spec import load_job

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # only the job file knows where the store is
    job = load_job(
        job_file("endpoint", training={"maxSteps": 2}, output={"uri": "s3://models/e", "endpoint": s3_endpoint})
    )
    run_job(job)
    manifest = boto3.client("s3", endpoint_url=s3_endpoint).get_object(
        Bucket="models", Key="e/endpoint/distill/manifest.json"
    )
    assert json.loads(manifest["Body"].read())["metrics"]["steps"] == 2
    assert "AWS_ENDPOINT_URL_S3" not in os.environ  # the caller's environment is left as it was
