"""The operator's real loop: kopf over HTTP to the emulated API server, pods as local processes, S3 on moto."""

from __future__ import annotations

import json
import time

from prometheus_client.parser import text_string_to_metric_families

from potential_meme.storage import open_store

API = "distill.potential-meme.io/v1alpha1"


def progressive_job(name, tiny_teacher_dir, corpus_dir, steps=3, **spec):
    return {
        "apiVersion": API,
        "kind": "DistillationJob",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "teacher": {"model": str(tiny_teacher_dir)},
            "dataset": {"source": str(corpus_dir), "validationFraction": 0.3, "maxValidationSequences": 4},
            "method": {"progressive": {"intermediateSizes": [150_000], "finalSize": "100k", "chunkSize": 64}},
            "training": {"batchSize": 4, "maxSteps": steps, "maxSeqLength": 64, "learningRate": 1e-3},
            "checkpoint": {"everySteps": 2},
            "output": {"uri": "s3://models/runs"},
            **spec,
        },
    }


def wait_for(cluster, name, predicate, timeout=240, namespace="ml"):
    """Poll the job until predicate(job) holds; returns (job, every distinct (phase, currentStage) seen)."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        job = cluster.get(API, "distillationjobs", namespace, name)
        status = (job or {}).get("status") or {}
        state = (status.get("phase"), status.get("currentStage"))
        if not seen or seen[-1] != state:
            seen.append(state)
        if job is not None and predicate(job):
            return job, seen
        assert time.monotonic() < deadline, f"timed out; states seen: {seen}"
        time.sleep(0.25)


def phase_is(*phases):
    return lambda job: (job.get("status") or {}).get("phase") in phases


def pytorchjobs(cluster, job_name):
    return [
        obj
        for obj in cluster.objects("kubeflow.org/v1/pytorchjobs")
        if obj["metadata"]["labels"].get("distill.potential-meme.io/job") == job_name
    ]


def test_progressive_job_runs_stage_by_stage_to_a_student_in_s3(cluster, operator, tiny_teacher_dir, corpus_dir):
    status, _ = cluster.apply(progressive_job("chain", tiny_teacher_dir, corpus_dir))
    assert status == 201 or status == 200
    job, seen = wait_for(cluster, "chain", phase_is("Succeeded", "Failed"))
    status = job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert ("Running", "1/2 distill-150k") in seen and ("Running", "2/2 distill-100k") in seen
    assert seen.index(("Running", "1/2 distill-150k")) < seen.index(("Running", "2/2 distill-100k"))
    assert status["observedGeneration"] == 1
    stages = status["stages"]
    assert [(s["name"], s["phase"], s["pytorchJob"]) for s in stages] == [
        ("distill-150k", "Succeeded", "chain-distill-150k"),
        ("distill-100k", "Succeeded", "chain-distill-100k"),
    ]
    for stage in stages:
        assert stage["metrics"]["steps"] == 3 and stage["metrics"]["studentPerplexityAfter"] > 0
        assert stage["startTime"] and stage["finishTime"]
    assert stages[1]["metrics"]["teacherParameters"] == stages[0]["metrics"]["studentParameters"]
    assert status["artifacts"]["student"] == "s3://models/runs/chain/distill-100k/student/"
    assert open_store(status["artifacts"]["student"]).exists("model.safetensors")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Valid"]["status"] == "True"
    # Every child is owned by the job, so deleting the job deletes them.
    children = pytorchjobs(cluster, "chain")
    assert {child["metadata"]["ownerReferences"][0]["uid"] for child in children} == {job["metadata"]["uid"]}

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(operator.metrics())
        for s in family.samples
    }
    assert samples[("potential_meme_operator_pytorchjobs_created_total", ())] == 2
    assert samples[("potential_meme_operator_jobs", (("phase", "Succeeded"),))] == 1
    assert samples[("potential_meme_operator_stage_duration_seconds_count", ())] == 2
    assert (
        samples[
            ("potential_meme_operator_reconciliations_total", (("kind", "DistillationJob"), ("result", "succeeded")))
        ]
        >= 1
    )

    cluster.delete(API, "distillationjobs", "ml", "chain")
    deadline = time.monotonic() + 30
    while pytorchjobs(cluster, "chain") or [
        c for c in cluster.objects("v1/configmaps") if c["metadata"]["name"] == "chain-job"
    ]:
        assert time.monotonic() < deadline, "children outlived their owner"
        time.sleep(0.2)
