"""The operator as a process, against the emulated API server, with the Kubeflow stand-in and S3."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from cluster import Cluster, Operator  # noqa: E402 - needs kmock

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


@pytest.fixture
def operator(cluster, tmp_path):
    running = Operator(cluster, tmp_path).start()
    yield running
    running.stop()
