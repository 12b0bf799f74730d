"""The user's own client: the real kubectl binary against the emulated API server, as a user drives the operator."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml
from test_operator import condition, phase_is, single_stage_job, wait_for

from cluster import Cluster, Operator
from helpers import REPO

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs kubernetes-client)")


def kubectl(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [KUBECTL, "--kubeconfig", str(cluster.kubeconfig(user="alice")), "-n", "ml", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_apply_every_cluster_example_then_get_shows_the_printer_columns(tmp_path, s3_endpoint):
    with Cluster(tmp_path, {}, run_pods=False) as cluster:  # GPU-sized examples: their pods wait, as without GPUs
        operator = Operator(cluster, tmp_path).start()
        try:
            applied = kubectl(cluster, "apply", "-f", str(REPO / "examples" / "cluster"))
            assert applied.returncode == 0, applied.stderr
            expected = {
                f"{document['kind'].lower()}.distill.potential-meme.io/{document['metadata']['name']} created"
                for path in (REPO / "examples" / "cluster").glob("*.yaml")
                for document in [yaml.safe_load(path.read_text())]
            }
            assert set(applied.stdout.splitlines()) == expected
            distillation_jobs = sum(line.startswith("distillationjob.") for line in expected)
            deadline = time.monotonic() + 60
            while True:
                listed = kubectl(cluster, "get", "distillationjobs")
                assert listed.returncode == 0, listed.stderr
                rows = [line.split() for line in listed.stdout.splitlines()]
                if len(rows) == 1 + distillation_jobs and all(len(row) == 5 for row in rows[1:]):
                    break  # every job has a phase and a stage
                assert time.monotonic() < deadline, listed.stdout
                time.sleep(0.5)
            assert rows[0] == ["NAME", "PHASE", "STAGE", "AGE"]
            assert {(row[0], row[1], row[2], row[3]) for row in rows[1:]} >= {
                ("kd-smollm2", "Pending", "1/1", "distill"),
                ("progressive-smollm2", "Pending", "1/2", "distill-100m"),
                ("response-smollm2", "Pending", "1/2", "generate"),
            }
            short = kubectl(cluster, "get", "dj", "-o", "name")
            assert "distillationjob.distill.potential-meme.io/layerwise-smollm2" in short.stdout.splitlines()

            # A field the CRD does not know, or a wrong type: kubectl's strict validation, by the server.
            bad = tmp_path / "bad.yaml"
            document = yaml.safe_load((REPO / "examples" / "cluster" / "kd-smollm2.yaml").read_text())
            document["metadata"]["name"] = "typo"
            document["spec"]["training"]["learningrate"] = 0.1
            bad.write_text(yaml.safe_dump(document))
            refused = kubectl(cluster, "apply", "-f", str(bad))
            assert refused.returncode != 0 and "learningrate" in refused.stderr, refused.stderr
        finally:
            operator.stop()


def test_wait_until_succeeded_and_describe_shows_the_events(cluster, operator, tiny_teacher_dir, corpus_dir, tmp_path):
    job_file = tmp_path / "tiny.yaml"
    job_file.write_text(yaml.safe_dump(single_stage_job("tiny", tiny_teacher_dir, corpus_dir)))
    assert kubectl(cluster, "apply", "-f", str(job_file)).returncode == 0
    waited = kubectl(
        cluster, "wait", "--for=condition=Succeeded", "distillationjob/tiny", "--timeout=240s", timeout=260
    )
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "distillationjob.distill.potential-meme.io/tiny condition met"
    job, _ = wait_for(cluster, "tiny", phase_is("Succeeded"))
    assert condition(job, "Succeeded")["status"] == "True"
    described = kubectl(cluster, "describe", "distillationjob", "tiny")
    assert described.returncode == 0, described.stderr
    events = described.stdout.split("Events:", 1)[1]
    assert "Normal" in events and "Running" in events and "Succeeded" in events, events
