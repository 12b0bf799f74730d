"""What the operator tests share: the real Kubeflow PyTorchJob schema, the webhook's rules, the restricted
Pod Security Standard."""

import jsonschema
import pytest
import yaml

from helpers import SHARED

KUBEFLOW_CRD = SHARED / "k8s" / "kubeflow.org_pytorchjobs.yaml"


@pytest.fixture(scope="session")
def pytorchjob_validator():
    if not KUBEFLOW_CRD.exists():
        pytest.skip(f"{KUBEFLOW_CRD} is absent (a checkout outside the workplace)")
    schema = yaml.safe_load(KUBEFLOW_CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    # Kubernetes' int-or-string fields (quantities, ports) carry no `type`: teach jsonschema the rule.
    def int_or_string(validator, value, instance, schema_node):
        if value and not isinstance(instance, (int, str)):
            yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")

    validator_class = jsonschema.validators.extend(
        jsonschema.Draft4Validator, {"x-kubernetes-int-or-string": int_or_string}
    )
    return validator_class(schema)
