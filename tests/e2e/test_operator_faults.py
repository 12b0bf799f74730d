"""Fault injection: what a user sees when the cluster around a job misbehaves, and that nothing is made twice."""

from __future__ import annotations

import shutil
import time

import pytest
from test_operator import API, condition, phase_is, progressive_job, pytorchjobs, single_stage_job, wait_for

from potential_meme.storage import open_store

from cluster import Operator
from helpers import free_port

PYTORCHJOBS = "kubeflow.org/v1"
RETRY = "distill.potential-meme.io/retry"


@pytest.fixture
def quick_operator(cluster, tmp_path):
    """An operator whose safety-net resync runs every 2 s instead of 60, so repairs show within a test."""
    running = Operator(cluster, tmp_path, resync_seconds=2).start()
    yield running
    running.stop()


def _stays(cluster, name, predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = cluster.get(API, "distillationjobs", "ml", name)
        assert predicate(job), job.get("status")
        time.sleep(0.5)
    return job


def test_a_failed_stage_stays_failed_when_its_pytorchjob_is_deleted_until_a_retry_is_asked(
    cluster, quick_operator, tiny_teacher_dir, corpus_dir, tmp_path
):
    late_corpus = tmp_path / "late-corpus"  # not there yet: the stage fails for good (exit 2)
    job = single_stage_job("retry", tiny_teacher_dir, corpus_dir, steps=1)
    job["spec"]["dataset"]["source"] = str(late_corpus)
    cluster.apply(job)
    failed, _ = wait_for(cluster, "retry", phase_is("Failed", "Succeeded"))
    assert failed["status"]["phase"] == "Failed"
    assert cluster.pods_started == {"retry-distill-100k": 1}  # exit 2 is permanent: Kubeflow does not restart it

    def retry(value):
        cluster.patch(API, "distillationjobs", "ml", "retry", {"metadata": {"annotations": {RETRY: value}}})

    retry("1")  # the cause is not fixed: the stage runs again, in a new PyTorchJob, and fails again
    failed, _ = wait_for(
        cluster, "retry", lambda j: cluster.pods_started["retry-distill-100k"] == 2 and phase_is("Failed")(j)
    )
    assert failed["status"]["retry"] == "1"

    cluster.delete(PYTORCHJOBS, "pytorchjobs", "ml", "retry-distill-100k")  # as a TTL after finish would
    job = _stays(cluster, "retry", phase_is("Failed"), seconds=6)  # three resyncs
    assert not pytorchjobs(cluster, "retry") and cluster.pods_started == {"retry-distill-100k": 2}
    assert condition(job, "Failed")["message"].startswith("stage distill-100k: retry-distill-100k-master-0 exited")

    shutil.copytree(corpus_dir, late_corpus)  # the cause is fixed; the user asks for a retry
    retry("2")
    done, _ = wait_for(cluster, "retry", phase_is("Succeeded"))
    assert done["status"]["retry"] == "2" and cluster.pods_started == {"retry-distill-100k": 3}


def test_a_foreign_object_with_a_childs_name_is_reported_and_never_adopted(
    cluster, operator, tiny_teacher_dir, corpus_dir
):
    squatter = {
        "apiVersion": PYTORCHJOBS,
        "kind": "PyTorchJob",
        "metadata": {"name": "taken-distill-150k", "namespace": "ml", "labels": {"team": "other"}},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "template": {"spec": {"containers": [{"name": "pytorch", "image": "other", "command": ["true"]}]}},
                }
            }
        },
    }
    assert cluster.apply(squatter)[0] in (200, 201)
    cluster.apply(progressive_job("taken", tiny_teacher_dir, corpus_dir))
    job, _ = wait_for(cluster, "taken", lambda j: (condition(j, "Blocked") or {}).get("status") == "True")
    blocked = condition(job, "Blocked")
    assert blocked["reason"] == "NameConflict" and "PyTorchJob taken-distill-150k already exists" in blocked["message"]
    assert job["status"]["phase"] == "Pending"
    untouched = cluster.get(PYTORCHJOBS, "pytorchjobs", "ml", "taken-distill-150k")
    assert "ownerReferences" not in untouched["metadata"] and untouched["metadata"]["labels"] == {"team": "other"}
    assert not pytorchjobs(cluster, "taken")  # and nothing else was made for the job


def test_a_configmap_deleted_while_a_stage_runs_comes_back(cluster, quick_operator, tiny_teacher_dir, corpus_dir):
    # Long enough to outlast a resync after the deletion: 20 tiny steps can finish within one second.
    cluster.apply(single_stage_job("lost", tiny_teacher_dir, corpus_dir, steps=300))
    wait_for(cluster, "lost", phase_is("Running"))
    configmap = cluster.get("v1", "configmaps", "ml", "lost-job")
    cluster.delete("v1", "configmaps", "ml", "lost-job")
    deadline = time.monotonic() + 30
    while (again := cluster.get("v1", "configmaps", "ml", "lost-job")) is None:
        assert time.monotonic() < deadline, "the ConfigMap was not made again"
        time.sleep(0.2)
    assert again["data"] == configmap["data"] and again["metadata"]["uid"] != configmap["metadata"]["uid"]
    job, _ = wait_for(cluster, "lost", phase_is("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded"
    assert [c["metadata"]["name"] for c in pytorchjobs(cluster, "lost")] == ["lost-distill-100k"]


def test_output_to_the_pods_own_disk_is_refused_in_a_cluster(cluster, operator, tiny_teacher_dir, corpus_dir):
    job = progressive_job("local", tiny_teacher_dir, corpus_dir)
    job["spec"]["output"] = {"uri": "file://./runs"}
    cluster.apply(job)
    job, _ = wait_for(cluster, "local", lambda j: condition(j, "Valid") is not None)
    valid = condition(job, "Valid")
    assert valid["status"] == "False" and valid["message"].startswith("spec.output.uri: 'file://./runs' is a folder")
    assert job["status"]["phase"] == "Failed" and not pytorchjobs(cluster, "local")


def test_kubeflow_missing_is_reported_until_it_is_installed(cluster, tiny_teacher_dir, corpus_dir, tmp_path):
    install_kubeflow = cluster.withdraw("kubeflow.org/v1/pytorchjobs")
    # Started before Kubeflow: the operator cannot watch PyTorchJobs (and, without the right to watch
    # CRDs, does not notice them arrive), so once they exist its resync alone follows the job.
    operator = Operator(cluster, tmp_path, resync_seconds=2).start()
    try:
        cluster.apply(single_stage_job("early", tiny_teacher_dir, corpus_dir))
        job, _ = wait_for(cluster, "early", lambda j: (condition(j, "Blocked") or {}).get("status") == "True")
        blocked = condition(job, "Blocked")
        assert blocked["reason"] == "KubeflowMissing" and "install Kubeflow's training operator" in blocked["message"]
        assert job["status"]["phase"] == "Pending"
        install_kubeflow()
        job, _ = wait_for(cluster, "early", phase_is("Succeeded", "Failed"))
        assert job["status"]["phase"] == "Succeeded" and condition(job, "Blocked")["status"] == "False"
        assert [c["metadata"]["name"] for c in pytorchjobs(cluster, "early")] == ["early-distill-100k"]
        # The resync made every move here, and announced each as an Event, as event handlers do.
        reasons = [e["reason"] for e in cluster.objects("v1/events") if e["involvedObject"]["name"] == "early"]
        assert "Succeeded" in reasons, reasons
        assert operator.process.poll() is None
    finally:
        operator.stop()


def test_refused_creates_are_reported_with_the_apis_message_and_other_jobs_go_on(
    cluster, quick_operator, tiny_teacher_dir, corpus_dir
):
    refusals = {
        "forbidden": (403, 'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:ml:pm" cannot create'),
        "denied": (422, 'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request'),
    }
    faults = {
        name: cluster.inject("create", "pytorchjobs", status, message, name=f"{name}-distill-100k")
        for name, (status, message) in refusals.items()
    }
    for name in refusals:
        cluster.apply(single_stage_job(name, tiny_teacher_dir, corpus_dir))
    for name, (status, message) in refusals.items():
        job, _ = wait_for(cluster, name, lambda j: (condition(j, "Blocked") or {}).get("status") == "True")
        blocked = condition(job, "Blocked")
        assert blocked["reason"] == "CreateRefused" and f"HTTP {status}: {message}" in blocked["message"]
        assert job["status"]["phase"] == "Pending"
    faults["forbidden"].clear()  # the RBAC is fixed: that job runs while the other stays refused
    job, _ = wait_for(cluster, "forbidden", phase_is("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded"
    assert condition(cluster.get(API, "distillationjobs", "ml", "denied"), "Blocked")["status"] == "True"
    faults["denied"].clear()  # the quota is raised
    job, _ = wait_for(cluster, "denied", phase_is("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded" and condition(job, "Blocked")["status"] == "False"


def test_an_api_server_throttling_and_failing_for_a_while_loses_nothing(
    cluster, operator, tiny_teacher_dir, corpus_dir
):
    cluster.inject("create", "pytorchjobs", 429, "too many requests", times=3)
    cluster.inject("patch", "distillationjobs/status", 500, "etcdserver: request timed out", seconds=4)
    cluster.inject("list", "pytorchjobs", 503, "the server is currently unable to handle the request", times=2)
    cluster.apply(single_stage_job("flaky", tiny_teacher_dir, corpus_dir))
    job, _ = wait_for(cluster, "flaky", phase_is("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded"
    assert [c["metadata"]["name"] for c in pytorchjobs(cluster, "flaky")] == ["flaky-distill-100k"]
    assert cluster.pods_started == {"flaky-distill-100k": 1}
    retried = [line for line in operator.metrics().splitlines() if 'outcome="retried"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in retried) >= 5, retried


def test_a_store_the_operator_cannot_reach_is_reported_then_read_once_it_can(
    cluster, tmp_path, tiny_teacher_dir, corpus_dir
):
    blind = Operator(
        cluster, tmp_path, resync_seconds=2, environment={"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}
    )
    blind.start()
    try:
        cluster.apply(single_stage_job("unseen", tiny_teacher_dir, corpus_dir))
        job, _ = wait_for(
            cluster, "unseen", lambda j: (condition(j, "ArtifactsVerified") or {}).get("status") == "False"
        )
        verified = condition(job, "ArtifactsVerified")
        assert verified["reason"] == "StoreUnreachable"
        assert "s3://models/runs/unseen/distill-100k/manifest.json" in verified["message"]
        assert job["status"]["phase"] == "Running" and len(pytorchjobs(cluster, "unseen")) == 1
    finally:
        blind.stop()
    seeing = Operator(cluster, tmp_path, resync_seconds=2).start()
    try:
        job, _ = wait_for(cluster, "unseen", phase_is("Succeeded", "Failed"))
        assert job["status"]["phase"] == "Succeeded" and condition(job, "ArtifactsVerified")["status"] == "True"
    finally:
        seeing.stop()


def test_a_rotated_token_is_picked_up(cluster, operator, tiny_teacher_dir, corpus_dir):
    cluster.apply(single_stage_job("rotated", tiny_teacher_dir, corpus_dir, steps=20))
    wait_for(cluster, "rotated", phase_is("Running"))
    cluster.rotate_token("rotated-token")
    job, _ = wait_for(cluster, "rotated", phase_is("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded"
    assert cluster.emulator.unauthorized >= 1  # the old token was refused at least once, and then replaced


def test_an_operator_killed_between_the_configmap_and_the_pytorchjob_makes_each_once(
    cluster, tmp_path, tiny_teacher_dir, corpus_dir
):
    first = Operator(cluster, tmp_path).start()
    stuck = cluster.inject("create", "pytorchjobs", 500, "etcdserver: leader changed")
    cluster.apply(single_stage_job("halfway", tiny_teacher_dir, corpus_dir))
    deadline = time.monotonic() + 30
    while cluster.get("v1", "configmaps", "ml", "halfway-job") is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first.kill()
    stuck.clear()
    second = Operator(cluster, tmp_path).start()
    try:
        job, _ = wait_for(cluster, "halfway", phase_is("Succeeded", "Failed"))
        assert job["status"]["phase"] == "Succeeded"
        assert [c["metadata"]["name"] for c in pytorchjobs(cluster, "halfway")] == ["halfway-distill-100k"]
        assert len([c for c in cluster.objects("v1/configmaps") if c["metadata"]["name"] == "halfway-job"]) == 1
    finally:
        second.stop()


def test_a_job_deleted_and_made_again_under_its_name_gets_children_of_its_own(
    cluster, operator, tiny_teacher_dir, corpus_dir
):
    cluster.apply(single_stage_job("again", tiny_teacher_dir, corpus_dir, steps=40))
    first, _ = wait_for(cluster, "again", phase_is("Running"))
    cluster.delete(API, "distillationjobs", "ml", "again")
    cluster.apply(single_stage_job("again", tiny_teacher_dir, corpus_dir))
    job, _ = wait_for(cluster, "again", phase_is("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded" and job["metadata"]["uid"] != first["metadata"]["uid"]
    children = pytorchjobs(cluster, "again")
    assert {c["metadata"]["ownerReferences"][0]["uid"] for c in children} == {job["metadata"]["uid"]}
    assert [c["metadata"]["name"] for c in children] == ["again-distill-100k"]


def test_a_pytorchjob_deleted_while_running_is_made_again_and_resumes(cluster, operator, tiny_teacher_dir, corpus_dir):
    cluster.apply(single_stage_job("deleted", tiny_teacher_dir, corpus_dir, steps=60))
    wait_for(cluster, "deleted", phase_is("Running"))
    stage = open_store("s3://models/runs/deleted/distill-100k/")
    deadline = time.monotonic() + 120
    while not [key for key in stage.list("checkpoints/") if key.endswith("/COMPLETE")]:
        assert time.monotonic() < deadline, "no checkpoint to resume from"
        time.sleep(0.2)
    cluster.delete(PYTORCHJOBS, "pytorchjobs", "ml", "deleted-distill-100k")
    job, _ = wait_for(cluster, "deleted", phase_is("Succeeded", "Failed"), timeout=400)
    assert job["status"]["phase"] == "Succeeded"
    assert cluster.pods_started == {"deleted-distill-100k": 2}
    assert "resuming deleted/distill-100k from checkpoint" in cluster.logs["deleted-distill-100k/Master-0"].read_text()
