"""Failures and changes: a failing pod, a restarted operator, invalid manifests, suspend and resume."""

from __future__ import annotations

import re
import time

from test_operator import API, condition, progressive_job, pytorchjobs, wait_for

from potential_meme.storage import open_store


def test_a_failing_pod_fails_the_stage_and_the_job_with_its_reason(cluster, operator, tiny_teacher_dir, corpus_dir):
    broken = progressive_job("broken", tiny_teacher_dir, corpus_dir)
    broken["spec"]["dataset"]["source"] = "/nowhere/at/all"  # valid spec; the pod cannot read it
    cluster.apply(broken)
    job, _ = wait_for(cluster, "broken", lambda j: (j.get("status") or {}).get("phase") == "Failed")
    failed = condition(job, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "PyTorchJobFailed"
    assert re.search(r"distill-150k: broken-distill-150k-master-0 exited with code [1-9]", failed["message"])
    assert [s["phase"] for s in job["status"]["stages"]] == ["Failed", "Pending"]
    assert len(pytorchjobs(cluster, "broken")) == 1  # nothing after the failed stage
    # `kubectl describe` tells the story: one Warning event with the pod's reason.
    deadline = time.monotonic() + 30
    while not (events := [e for e in cluster.objects("v1/events") if e["involvedObject"]["name"] == "broken"]):
        assert time.monotonic() < deadline, "no event for the failed job"
        time.sleep(0.2)
    assert [(e["type"], e["reason"]) for e in events if e["type"] == "Warning"] == [("Warning", "PyTorchJobFailed")], (
        events
    )


def test_a_restarted_operator_adopts_its_children_and_finishes(cluster, operator, tiny_teacher_dir, corpus_dir):
    cluster.apply(progressive_job("restart", tiny_teacher_dir, corpus_dir, steps=40))
    wait_for(
        cluster,
        "restart",
        lambda j: (
            (j.get("status") or {}).get("currentStage") == "1/2 distill-150k"
            and (j.get("status") or {}).get("phase") == "Running"
        ),
    )
    operator.kill()
    time.sleep(1)
    operator.start()
    job, _ = wait_for(cluster, "restart", lambda j: (j.get("status") or {}).get("phase") in ("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded"
    names = [child["metadata"]["name"] for child in pytorchjobs(cluster, "restart")]
    assert sorted(names) == ["restart-distill-100k", "restart-distill-150k"]  # no duplicates
    assert cluster.pods_started == {"restart-distill-150k": 1, "restart-distill-100k": 1}


def test_a_hundred_invalid_manifests_get_clear_conditions_and_the_operator_lives_on(
    cluster, operator, tiny_teacher_dir, corpus_dir
):
    for index in range(100):
        bad = progressive_job(f"bad-{index:03d}", tiny_teacher_dir, corpus_dir)
        bad["spec"]["method"]["progressive"]["alpha"] = 2 + index  # above 1: refused
        cluster.apply(bad)
    deadline = time.monotonic() + 120
    while True:
        jobs = [cluster.get(API, "distillationjobs", "ml", f"bad-{index:03d}") for index in range(100)]
        valid = [condition(job, "Valid") for job in jobs]
        if all(valid):
            break
        assert time.monotonic() < deadline, f"{sum(1 for v in valid if v)} of 100 have a Valid condition"
        time.sleep(0.5)
    for index, verdict in enumerate(valid):
        assert verdict["status"] == "False" and verdict["reason"] == "InvalidSpec"
        assert verdict["message"].startswith("spec.method.progressive.alpha: Input should be less than or equal to 1")
        assert f"(got {2 + index})" in verdict["message"]
    assert not [c for c in cluster.objects("kubeflow.org/v1/pytorchjobs") if c["metadata"]["name"].startswith("bad-")]
    assert operator.process.poll() is None
    # ... and it still serves a good job.
    cluster.apply(progressive_job("good", tiny_teacher_dir, corpus_dir, steps=1))
    job, _ = wait_for(cluster, "good", lambda j: (j.get("status") or {}).get("phase") in ("Succeeded", "Failed"))
    assert job["status"]["phase"] == "Succeeded"
    # A spec change the CRD's CEL rules would refuse, arriving anyway (the emulator has no CEL): reported.
    cluster.patch(API, "distillationjobs", "ml", "good", {"spec": {"training": {"learningRate": 0.5}}})
    job, _ = wait_for(cluster, "good", lambda j: (condition(j, "SpecChangeRefused") or {}).get("status") == "True")
    assert job["status"]["phase"] == "Succeeded" and job["status"]["observedGeneration"] == 2


def test_suspend_stops_the_running_stage_and_resume_continues_it(cluster, operator, tiny_teacher_dir, corpus_dir):
    cluster.apply(progressive_job("pausing", tiny_teacher_dir, corpus_dir, steps=150))
    wait_for(cluster, "pausing", lambda j: (j.get("status") or {}).get("phase") == "Running")
    stage = open_store("s3://models/runs/pausing/distill-150k/")
    deadline = time.monotonic() + 120
    while not [key for key in stage.list("checkpoints/") if key.endswith("/COMPLETE")]:
        assert time.monotonic() < deadline, "no checkpoint to resume from"
        time.sleep(0.2)
    cluster.patch(API, "distillationjobs", "ml", "pausing", {"spec": {"suspend": True}})
    job, _ = wait_for(cluster, "pausing", lambda j: (j.get("status") or {}).get("phase") == "Suspended")
    assert condition(job, "Suspended")["status"] == "True"
    (child,) = pytorchjobs(cluster, "pausing")
    assert child["spec"]["runPolicy"]["suspend"] is True
    deadline = time.monotonic() + 30
    while not condition(cluster.get("kubeflow.org/v1", "pytorchjobs", "ml", "pausing-distill-150k"), "Suspended"):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    cluster.patch(API, "distillationjobs", "ml", "pausing", {"spec": {"suspend": False}})
    job, _ = wait_for(
        cluster, "pausing", lambda j: (j.get("status") or {}).get("phase") in ("Succeeded", "Failed"), timeout=300
    )
    assert job["status"]["phase"] == "Succeeded"
    assert cluster.pods_started["pausing-distill-150k"] == 2  # started, suspended, started again
    assert "resuming pausing/distill-150k from checkpoint" in cluster.logs["pausing-distill-150k/Master-0"].read_text()


def test_a_job_too_big_for_its_pods_gets_no_pod_until_its_resources_grow(
    cluster, operator, tiny_teacher_dir, corpus_dir
):
    too_big = progressive_job("too-big", tiny_teacher_dir, corpus_dir, steps=2)
    too_big["spec"]["method"] = {"knowledge": {"chunkSize": 64}}
    too_big["spec"]["student"] = {"fromTeacher": {"numLayers": 2}}
    too_big["spec"]["resources"] = {"memory": "1Mi"}  # the student's weights and AdamW state alone are ~2 MB
    cluster.apply(too_big)
    job, _ = wait_for(cluster, "too-big", lambda j: condition(j, "Valid") is not None)
    verdict = condition(job, "Valid")
    assert verdict["status"] == "False" and verdict["reason"] == "DoesNotFit"
    assert verdict["message"].startswith("spec.resources.memory: the first training stage needs ")
    assert "does not fit in 0.8 MiB usable of 1.0 MiB" in verdict["message"]
    assert pytorchjobs(cluster, "too-big") == []
    cluster.patch(API, "distillationjobs", "ml", "too-big", {"spec": {"resources": {"memory": "2Gi"}}})

    def finished_after_the_change(j):
        status = j.get("status") or {}
        return status.get("observedGeneration") == 2 and status.get("phase") in ("Succeeded", "Failed")

    job, _ = wait_for(cluster, "too-big", finished_after_the_change)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert condition(job, "Valid")["status"] == "True"
