"""The operator as a process, against the emulated API server, with the Kubeflow stand-in and S3."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from cluster import (  # noqa: E402 - needs kmock
    DECLARED_API_CALLS,
    DECLARED_PEERING_CALLS,
    E2E_TESTS_PASSED,
    RECORDED_API_CALLS,
    Cluster,
    Operator,
)


@pytest.fixture
def cluster(tmp_path, s3_endpoint):
    trainer_env = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    with Cluster(tmp_path, trainer_env) as running:
        yield running
    calls = running.emulator.operator_calls
    RECORDED_API_CALLS.update(calls)
    undeclared = calls - DECLARED_API_CALLS - DECLARED_PEERING_CALLS
    assert not undeclared, (
        f"the operator made calls its RBAC would refuse; add them to operator_api_calls.json: {undeclared}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call" and report.passed:
        E2E_TESTS_PASSED.add(item.nodeid)


@pytest.fixture
def operator(cluster, tmp_path):
    running = Operator(cluster, tmp_path).start()
    yield running
    running.stop()
