"""After the other e2e tests: the operator used every call it declares (the RBAC grants nothing unused).

Each e2e test already fails when the operator makes an undeclared call (conftest.py). Named to run
last; meaningful only when the whole e2e suite ran and passed in this session.
"""

import pytest

from cluster import DECLARED_API_CALLS, DECLARED_PEERING_CALLS, E2E_TESTS_PASSED, RECORDED_API_CALLS


def test_every_declared_api_call_was_made(request):
    e2e = {
        item.nodeid for item in request.session.items if "e2e/" in item.nodeid and item.nodeid != request.node.nodeid
    }
    collected = {path.stem for path in request.path.parent.glob("test_operator*.py")}
    ran_files = {nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py") for nodeid in e2e}
    if collected - ran_files or not e2e <= E2E_TESTS_PASSED:
        pytest.skip("only meaningful after every other e2e test ran and passed in this session")
    unused = (DECLARED_API_CALLS | DECLARED_PEERING_CALLS) - RECORDED_API_CALLS
    assert sorted(unused) == [], "declared (and granted) but never made"
