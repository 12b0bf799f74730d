"""The operator as a process, against the emulated API server, with the Kubeflow stand-in and S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import free_port

pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from cluster import Cluster  # noqa: E402 - needs kmock

OPERATOR_API_CALLS: set[tuple[str, str, str]] = set()  # (verb, group, resource) over the whole e2e run


@pytest.fixture
def cluster(tmp_path, s3_endpoint):
    trainer_env = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    with Cluster(tmp_path, trainer_env) as running:
        yield running
    OPERATOR_API_CALLS.update(running.emulator.operator_calls)


def pytest_sessionfinish(session):
    if OPERATOR_API_CALLS:
        print("\noperator API calls:", *sorted(OPERATOR_API_CALLS), sep="\n  ")


class Operator:
    def __init__(self, cluster: Cluster, workdir):
        self.cluster, self.workdir = cluster, workdir
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Operator:
        env = dict(os.environ, KUBECONFIG=str(self.cluster.kubeconfig()), PYTHONUNBUFFERED="1")
        env.pop("WORLD_SIZE", None)
        self.starts += 1
        self.log = self.workdir / f"operator-{self.starts}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "potential_meme.cli",
                "operator",
                "--metrics-port",
                str(self.metrics_port),
                "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz",
            ],
            env=env,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1)
                return self
            except OSError:
                assert self.process.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the operator did not become live"
                time.sleep(0.2)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


@pytest.fixture
def operator(cluster, tmp_path):
    running = Operator(cluster, tmp_path).start()
    yield running
    running.stop()
