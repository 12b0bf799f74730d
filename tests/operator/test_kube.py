"""The operator's API client against a real HTTP server that misbehaves as API servers do under load."""

from __future__ import annotations

import pytest

kopf = pytest.importorskip("kopf")
pytestmark = pytest.mark.asyncio
from aiohttp import web  # noqa: E402 - after the skip
from prometheus_client import REGISTRY  # noqa: E402

from potential_meme.operator import kube as kube_module  # noqa: E402
from potential_meme.operator.kube import Kube, KubeError  # noqa: E402

CONFIGMAP = "/api/v1/namespaces/ml/configmaps/settings"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(kube_module, "BACKOFF_SECONDS", 0.001)


def _count(method: str, outcome: str) -> float:
    labels = {"method": method, "outcome": outcome}
    return REGISTRY.get_sample_value("potential_meme_operator_api_requests_total", labels) or 0.0


async def _serve(handler):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def test_throttling_and_server_errors_are_retried_until_the_answer_comes():
    replies = [(500, {}), (429, {"Retry-After": "0"}), (503, {}), (200, {})]
    seen = []

    async def handler(request):
        status, headers = replies[len(seen)]
        seen.append(request.path)
        return web.json_response(
            {"metadata": {"name": "settings"}} if status == 200 else {}, status=status, headers=headers
        )

    runner, url = await _serve(handler)
    client = Kube(lambda: kopf.ConnectionInfo(server=url, token="t"))
    retried_before = _count("GET", "retried")
    try:
        assert await client.get("v1", "configmaps", "ml", "settings") == {"metadata": {"name": "settings"}}
        assert seen == [CONFIGMAP] * 4 and _count("GET", "retried") - retried_before == 3
    finally:
        await client.close()
        await runner.cleanup()


async def test_a_rotated_token_is_read_again_on_401():
    tokens = {"current": "old"}
    authorizations = []

    async def handler(request):
        authorizations.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer new":
            return web.json_response({"message": "Unauthorized"}, status=401)
        return web.json_response({"items": []})

    runner, url = await _serve(handler)
    client = Kube(lambda: kopf.ConnectionInfo(server=url, token=tokens["current"]))
    try:
        tokens["current"] = "new"  # the kubelet rewrote the projected token file
        assert await client.list("v1", "configmaps", "ml", {}) == []
        assert authorizations == ["Bearer old", "Bearer new"]
    finally:
        await client.close()
        await runner.cleanup()


async def test_errors_that_last_and_refusals_reach_the_caller_with_the_apis_message():
    calls = []

    async def handler(request):
        calls.append(request.method)
        if request.method == "POST":
            return web.json_response({"message": 'admission webhook "validator" denied the request'}, status=422)
        return web.json_response({"message": "etcd is down"}, status=500)

    runner, url = await _serve(handler)
    client = Kube(lambda: kopf.ConnectionInfo(server=url, token="t"))
    try:
        with pytest.raises(KubeError) as down:
            await client.get("v1", "configmaps", "ml", "settings")
        assert down.value.status == 500 and "etcd is down" in str(down.value)
        assert calls == ["GET"] * kube_module.ATTEMPTS
        calls.clear()
        with pytest.raises(KubeError) as refused:  # a refusal is an answer: not retried
            await client.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ml"}})
        assert refused.value.status == 422 and "denied the request" in str(refused.value) and calls == ["POST"]
    finally:
        await client.close()
        await runner.cleanup()
    unreachable = Kube(lambda: kopf.ConnectionInfo(server=url, token="t"))  # the server is gone now
    try:
        with pytest.raises(KubeError) as gone:
            await unreachable.get("v1", "configmaps", "ml", "settings")
        assert gone.value.status == 0 and "ClientConnectorError" in str(gone.value)
    finally:
        await unreachable.close()


async def test_status_writes_give_way_to_creates_in_flight_but_not_forever(monkeypatch):
    """Under a burst, every job's PyTorchJob before any job's status; a status still goes out in bounded time."""
    import asyncio

    arrived: list[str] = []
    release = asyncio.Event()

    async def handler(request):
        arrived.append(f"{request.method} {request.path}")
        if request.method == "POST":
            await release.wait()  # a slow create, as under a burst
        return web.json_response({})

    runner, url = await _serve(handler)
    client = Kube(lambda: kopf.ConnectionInfo(server=url, token="t"))
    pytorchjob = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "a", "namespace": "ml"}}
    status = ("distill.potential-meme.io/v1alpha1", "distillationjobs", "ml", "b", {"status": {"phase": "Pending"}})
    try:
        create = asyncio.create_task(client.create(pytorchjob))
        while not arrived:
            await asyncio.sleep(0.01)
        patch = asyncio.create_task(client.merge_patch(*status, sub="status"))
        await asyncio.sleep(0.3)
        assert arrived == ["POST /apis/kubeflow.org/v1/namespaces/ml/pytorchjobs"]  # the status waits
        release.set()
        await asyncio.wait_for(asyncio.gather(create, patch), 5)
        assert arrived[-1] == "PATCH /apis/distill.potential-meme.io/v1alpha1/namespaces/ml/distillationjobs/b/status"

        # A create that never ends holds a status back for STATUS_WAIT_SECONDS, no longer.
        monkeypatch.setattr(kube_module, "STATUS_WAIT_SECONDS", 0.2)
        release.clear()
        stuck = asyncio.create_task(client.create(pytorchjob))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(client.merge_patch(*status, sub="status"), 2)
        assert not stuck.done()
        release.set()
        await stuck
    finally:
        await client.close()
        await runner.cleanup()
