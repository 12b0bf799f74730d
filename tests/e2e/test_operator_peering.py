"""Two operator replicas with kopf peering: exactly one works; when it dies, the other takes over.

The chart grants the peering calls these tests record.
"""

import time

from test_operator import phase_is, progressive_job, pytorchjobs, wait_for

from potential_meme.operator.handlers import PEERING_LIFETIME_SECONDS

from cluster import DECLARED_API_CALLS, DECLARED_PEERING_CALLS, Operator

PEERING = "potential-meme"


def _peering_object(cluster):
    status, _ = cluster.call(
        cluster.request(
            "POST",
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}},
        )
    )
    assert status in (200, 201)


def _peers(cluster):
    return (
        cluster.call(cluster.request("GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}"))[1].get("status") or {}
    )


def _lines(operator, text):
    return [line for line in operator.log.read_text().splitlines() if text in line]


def test_one_of_two_replicas_works_and_the_other_takes_over_when_it_dies(
    cluster, tmp_path, tiny_teacher_dir, corpus_dir
):
    _peering_object(cluster)
    leader = Operator(cluster, tmp_path, peering=PEERING, priority=200, resync_seconds=2, name="leader").start()
    standby = Operator(cluster, tmp_path, peering=PEERING, priority=100, resync_seconds=2, name="standby").start()
    try:
        # Peered operators start paused; each resumes once it sees no live peer of a higher priority.
        deadline = time.monotonic() + 30
        while len(_peers(cluster)) < 2 or not _lines(leader, "Resuming operations"):
            assert time.monotonic() < deadline, (_peers(cluster), leader.log.read_text()[-2000:])
            time.sleep(0.5)
        cluster.apply(progressive_job("peered", tiny_teacher_dir, corpus_dir, steps=30))
        wait_for(cluster, "peered", lambda j: (j.get("status") or {}).get("currentStage") == "1/2 distill-150k")
        assert _lines(leader, "PyTorchJob peered-distill-150k") and not _lines(standby, "PyTorchJob peered-")
        assert not _lines(standby, "Resuming operations")  # standing by while the leader lives

        leader.kill()  # mid-job: its peering record expires after its lifetime (20 s), then the standby works
        killed_at = time.monotonic()
        while not _lines(standby, "Resuming operations"):
            assert time.monotonic() - killed_at < PEERING_LIFETIME_SECONDS + 10, standby.log.read_text()[-3000:]
            time.sleep(0.2)
        print(f"standby took over {time.monotonic() - killed_at:.1f} s after the leader was killed")
        job, _ = wait_for(cluster, "peered", phase_is("Succeeded", "Failed"), timeout=300)
        assert job["status"]["phase"] == "Succeeded"
        assert _lines(standby, "PyTorchJob peered-distill-100k")  # the second stage was the standby's
        names = sorted(child["metadata"]["name"] for child in pytorchjobs(cluster, "peered"))
        assert names == ["peered-distill-100k", "peered-distill-150k"]  # nothing twice
        assert cluster.pods_started == {"peered-distill-150k": 1, "peered-distill-100k": 1}
        # The working replica's resync reads the peering object every resync period (2 s here); a tiny job can
        # finish before the first one, so wait for it rather than stop the replicas early and miss that call.
        deadline = time.monotonic() + 10
        while ("get", "kopf.dev", "clusterkopfpeerings") not in cluster.emulator.operator_calls:
            assert time.monotonic() < deadline, sorted(cluster.emulator.operator_calls)
            time.sleep(0.2)
    finally:
        leader.stop()
        standby.stop()
    assert cluster.emulator.operator_calls - DECLARED_API_CALLS == DECLARED_PEERING_CALLS
