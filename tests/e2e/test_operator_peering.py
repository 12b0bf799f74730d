"""kopf peering, for more than one operator replica: the chart grants the peering calls this test records."""

import time

from test_operator import phase_is, progressive_job, wait_for

from cluster import DECLARED_API_CALLS, DECLARED_PEERING_CALLS, Operator

PEERING = "potential-meme"


def test_a_peered_operator_announces_itself_and_runs_jobs(cluster, tmp_path, tiny_teacher_dir, corpus_dir):
    status, _ = cluster.call(
        cluster.request(
            "POST",
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}},
        )
    )
    assert status in (200, 201)
    operator = Operator(cluster, tmp_path, peering=PEERING).start()
    try:
        cluster.apply(progressive_job("peered", tiny_teacher_dir, corpus_dir, steps=2))
        job, _ = wait_for(cluster, "peered", phase_is("Succeeded", "Failed"))
        assert job["status"]["phase"] == "Succeeded"
        deadline = time.monotonic() + 30
        while not (
            peers := (
                cluster.call(cluster.request("GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}"))[1].get(
                    "status"
                )
                or {}
            )
        ):
            assert time.monotonic() < deadline, "the operator never announced itself in the peering object"
            time.sleep(0.5)
        assert len(peers) == 1  # this operator, keyed by its identity
    finally:
        operator.stop()
    assert cluster.emulator.operator_calls - DECLARED_API_CALLS == DECLARED_PEERING_CALLS
