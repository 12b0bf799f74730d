"""Examples a user copies: every local job has a cluster twin, and both pass the CRD schema as the API server would."""

from pathlib import Path

import pytest
import yaml

from potential_meme.spec import parse_job
from potential_meme.spec.crd import custom_resource_definition

from helpers import REPO
from k8s_rules import crd_validator

EXAMPLES = REPO / "examples"
LOCAL = sorted(EXAMPLES.glob("*.yaml"))
# What a cluster twin may change: where it runs and writes, and where its benchmark data and judge are.
PLACEMENT = {"resources", "runPolicy", "output", "batchSize", "mtBench", "mmlu"}


def job_validator(kind: str):
    return crd_validator(custom_resource_definition(kind))


def test_every_local_example_has_a_cluster_twin_running_the_same_work():
    assert {path.name for path in LOCAL} == {path.name for path in (EXAMPLES / "cluster").glob("*.yaml")}
    for local_path in LOCAL:
        local = yaml.safe_load(local_path.read_text())
        cluster = yaml.safe_load((EXAMPLES / "cluster" / local_path.name).read_text())
        assert cluster["kind"] == local["kind"] and cluster["metadata"] == local["metadata"]
        same = lambda spec: {key: value for key, value in spec.items() if key not in PLACEMENT}  # noqa: E731
        assert same(cluster["spec"]) == same(local["spec"]), local_path.name


@pytest.mark.parametrize("path", sorted((EXAMPLES / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_examples_pass_the_crd_schema_and_ask_for_gpus_unless_they_measure_a_cpu(path: Path):
    document = yaml.safe_load(path.read_text())
    errors = list(job_validator(document["kind"]).iter_errors(document))
    assert not errors, f"{list(errors[0].path)}: {errors[0].message}"
    job = parse_job(document)
    assert job.spec.resources.queue_name
    # a mobile job measures its candidates' latency where it runs: on a CPU like the device's, not a GPU
    assert (job.spec.resources.gpus_per_node >= 1) == (
        document["kind"] != "DistillationJob" or job.spec.method.mobile is None
    )
    if document["kind"] == "DistillationJob":
        assert job.spec.output.uri.startswith("s3://") and job.spec.output.credentials_secret


def test_the_schema_check_can_fail():
    document = yaml.safe_load((EXAMPLES / "cluster" / "kd-smollm2.yaml").read_text())
    document["spec"]["resources"]["gpusPerNode"] = "one"
    document["spec"]["training"]["bogus"] = 1
    messages = [error.message for error in job_validator("DistillationJob").iter_errors(document)]
    assert any("'one' is not of type 'integer'" in m for m in messages)
    assert any("'bogus' was unexpected" in m for m in messages)
