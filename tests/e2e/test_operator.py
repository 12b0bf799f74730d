"""The operator's real loop: kopf over HTTP to the emulated API server, pods as local processes, S3 on moto."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from potential_meme.storage import open_store, read_json

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


def single_stage_job(name, tiny_teacher_dir, corpus_dir, steps=2):
    """A progressive job with only its final size: one stage, one PyTorchJob."""
    job = progressive_job(name, tiny_teacher_dir, corpus_dir, steps=steps)
    job["spec"]["method"]["progressive"]["intermediateSizes"] = []
    return job


def evaluation_job(name, distillation_job, **spec):
    return {
        "apiVersion": API,
        "kind": "EvaluationJob",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"distillationJob": distillation_job, "batchSize": 2, **spec},
    }


def wait_for(cluster, name, predicate, timeout=240, namespace="ml", plural="distillationjobs"):
    """Poll the job until predicate(job) holds; returns (job, every distinct (phase, currentStage) seen)."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        job = cluster.get(API, plural, namespace, name)
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


def condition(job, kind):
    return next((c for c in (job.get("status") or {}).get("conditions", []) if c["type"] == kind), None)


def pytorchjobs(cluster, job_name, kind="DistillationJob"):
    return [
        obj
        for obj in cluster.objects("kubeflow.org/v1/pytorchjobs")
        if obj["metadata"]["labels"].get("distill.potential-meme.io/job") == job_name
        and obj["metadata"]["labels"].get("distill.potential-meme.io/kind") == kind
    ]


def test_progressive_job_runs_stage_by_stage_to_a_student_in_s3_then_is_evaluated(
    cluster, operator, tiny_teacher_dir, corpus_dir
):
    # The evaluation comes first and shares the job's name: it waits, and nothing of the two collides.
    # A student pruned and trained for a few steps does not halve its teacher's perplexity: the gate fails.
    gate = {"metric": "perplexity.perplexity", "atMost": 0.5, "relativeToTeacher": True}
    assert cluster.apply(evaluation_job("chain", distillation_job="chain", gates=[gate]))[0] in (200, 201)
    evaluation, _ = wait_for(
        cluster,
        "chain",
        lambda j: (condition(j, "Running") or {}).get("reason") == "DistillationJobNotFound",
        plural="evaluationjobs",
    )
    assert evaluation["status"]["phase"] == "Pending"
    status, _ = cluster.apply(progressive_job("chain", tiny_teacher_dir, corpus_dir))
    assert status == 201 or status == 200
    evaluation_seen = []

    def finished_while_the_evaluation_waits(job):
        evaluation = cluster.get(API, "evaluationjobs", "ml", "chain")
        running = condition(evaluation, "Running") or {}
        evaluation_seen.append((evaluation["status"]["phase"], running.get("reason"), running.get("message")))
        if phase_is("Succeeded", "Failed")(job):
            return True
        assert not pytorchjobs(cluster, "chain", kind="EvaluationJob"), "the evaluation started too early"
        return False

    job, seen = wait_for(cluster, "chain", finished_while_the_evaluation_waits)
    assert ("Pending", "WaitingForDistillationJob", "DistillationJob chain is Running (stage 2/2 distill-100k)") in (
        evaluation_seen
    ), evaluation_seen
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

    evaluation, _ = wait_for(cluster, "chain", phase_is("Succeeded", "Failed"), plural="evaluationjobs")
    assert evaluation["status"]["phase"] == "Succeeded", json.dumps(evaluation["status"], indent=1)
    [row] = evaluation["status"]["stages"]
    assert (row["name"], row["pytorchJob"]) == ("evaluate", "chain-evaluate")
    # The evaluation inherits the job's output and sequences: it finds the trainer's own figures again.
    results_uri = evaluation["status"]["artifacts"]["results"]
    assert results_uri == "s3://models/runs/chain/evaluate/results.json"
    results = read_json(open_store(results_uri.removesuffix("results.json")), "results.json")["models"]
    student, teacher = (
        results[role]["benchmarks"]["perplexity"]["perplexity"]["value"] for role in ("student", "teacher")
    )
    assert results["student"]["reference"] == status["artifacts"]["student"]
    assert student == pytest.approx(stages[1]["metrics"]["studentPerplexityAfter"], rel=1e-4)
    assert teacher == pytest.approx(stages[0]["metrics"]["teacherPerplexity"], rel=1e-4)
    assert row["metrics"]["studentPerplexity"] == student
    gate = condition(evaluation, "QualityGate")
    assert (gate["status"], gate["reason"]) == ("False", "GateFailed")
    assert gate["message"] == f"perplexity.perplexity {student:.4g} not <= {0.5 * teacher:.4g}"
    assert open_store(results_uri.removesuffix("results.json")).exists("report.pdf")

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(operator.metrics())
        for s in family.samples
    }
    assert samples[("potential_meme_operator_pytorchjobs_created_total", ())] == 3
    for kind in ("DistillationJob", "EvaluationJob"):
        assert samples[("potential_meme_operator_jobs", (("kind", kind), ("phase", "Succeeded")))] == 1
    assert samples[("potential_meme_operator_stage_duration_seconds_count", ())] == 3
    assert (
        samples[
            ("potential_meme_operator_reconciliations_total", (("kind", "DistillationJob"), ("result", "succeeded")))
        ]
        >= 1
    )

    cluster.delete(API, "distillationjobs", "ml", "chain")
    cluster.delete(API, "evaluationjobs", "ml", "chain")
    deadline = time.monotonic() + 30
    while (
        pytorchjobs(cluster, "chain")
        or pytorchjobs(cluster, "chain", kind="EvaluationJob")
        or [c for c in cluster.objects("v1/configmaps") if c["metadata"]["name"].startswith("chain-")]
    ):
        assert time.monotonic() < deadline, "children outlived their owner"
        time.sleep(0.2)
