"""Examples a user copies: every local job has a cluster twin, and both pass the CRD schema as the API server would."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from potential_meme.spec import parse_job
from potential_meme.spec.crd import custom_resource_definition

from helpers import REPO

EXAMPLES = REPO / "examples"
LOCAL = sorted(EXAMPLES.glob("*.yaml"))
PLACEMENT = {"resources", "runPolicy", "output", "batchSize"}  # what a cluster twin may change


def _strict(schema: dict) -> dict:
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation) refuses them."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    schema = custom_resource_definition(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(_strict(schema))


def test_every_local_example_has_a_cluster_twin_running_the_same_work():
    assert {path.name for path in LOCAL} == {path.name for path in (EXAMPLES / "cluster").glob("*.yaml")}
    for local_path in LOCAL:
        local = yaml.safe_load(local_path.read_text())
        cluster = yaml.safe_load((EXAMPLES / "cluster" / local_path.name).read_text())
        assert cluster["kind"] == local["kind"] and cluster["metadata"] == local["metadata"]
        same = lambda spec: {key: value for key, value in spec.items() if key not in PLACEMENT}  # noqa: E731
        assert same(cluster["spec"]) == same(local["spec"]), local_path.name


@pytest.mark.parametrize("path", sorted((EXAMPLES / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_examples_pass_the_crd_schema_and_ask_for_gpus(path: Path):
    document = yaml.safe_load(path.read_text())
    errors = list(crd_validator(document["kind"]).iter_errors(document))
    assert not errors, f"{list(errors[0].path)}: {errors[0].message}"
    job = parse_job(document)
    assert job.spec.resources.gpus_per_node >= 1 and job.spec.resources.queue_name
    if document["kind"] == "DistillationJob":
        assert job.spec.output.uri.startswith("s3://") and job.spec.output.credentials_secret


def test_the_schema_check_can_fail():
    document = yaml.safe_load((EXAMPLES / "cluster" / "kd-smollm2.yaml").read_text())
    document["spec"]["resources"]["gpusPerNode"] = "one"
    document["spec"]["training"]["bogus"] = 1
    messages = [error.message for error in crd_validator("DistillationJob").iter_errors(document)]
    assert any("'one' is not of type 'integer'" in m for m in messages)
    assert any("'bogus' was unexpected" in m for m in messages)
