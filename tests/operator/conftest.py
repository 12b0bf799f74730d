"""What the operator tests share: the real Kubeflow PyTorchJob schema."""

import pytest

from helpers import SHARED
from k8s_rules import crd_validator

KUBEFLOW_CRD = SHARED / "k8s" / "kubeflow.org_pytorchjobs.yaml"


@pytest.fixture(scope="session")
def pytorchjob_validator():
    if not KUBEFLOW_CRD.exists():
        pytest.skip(f"{KUBEFLOW_CRD} is absent (a checkout outside the workplace)")
    return crd_validator(KUBEFLOW_CRD)
