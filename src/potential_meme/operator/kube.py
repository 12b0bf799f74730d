"""A small asynchronous Kubernetes API client on aiohttp, authenticated the way kopf is.

The operator needs a handful of calls (get, list by label, create, merge-patch) on a few
resources; kopf already brings aiohttp and the credentials, so no client library is added.
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

from ..metrics.operator import API_REQUESTS
from ..spec.crd import RESOURCES


class KubeError(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=info.ca_path)
    if info.ca_data:
        context.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    if info.insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    certificate, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        certificate = _scratch_file(info.certificate_data)
        key = _scratch_file(info.private_key_data)
    if certificate:
        context.load_cert_chain(certificate, key)
    return context


def _scratch_file(data: bytes | str) -> str:
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=".pem")  # noqa: SIM115 - ssl needs a path
    handle.write(base64.b64decode(data))
    handle.close()
    return handle.name


def path(api_version: str, plural: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base] + (["namespaces", namespace] if namespace else []) + [plural]
    parts += [name] if name else []
    parts += [sub] if sub else []
    return "/".join(parts)


TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)
ATTEMPTS = 6  # a call is tried this often through throttling, 5xx and timeouts (~20 s of backoff at most)
BACKOFF_SECONDS, BACKOFF_CAP_SECONDS = 0.2, 8.0
STATUS_WAIT_SECONDS = 5.0  # the longest a status write gives way to creates in flight


def backoff(attempt: int, retry_after: str | None = None) -> float:
    """Exponential with jitter, so many reconciliations refused at once do not come back at once."""
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), BACKOFF_CAP_SECONDS)
    return min(BACKOFF_CAP_SECONDS, BACKOFF_SECONDS * 2**attempt) * random.uniform(0.5, 1.5)


class Kube:
    """`login()` gives the credentials; it is called again on a 401, as bound service-account tokens rotate.

    Status writes give way, for a bounded time, while creates are in flight. A burst of new jobs
    otherwise moves in lockstep: every job's ConfigMap, PyTorchJob and status write queue behind every
    other job's at the API server, and the first PyTorchJob waits for most of the burst's status
    writes. A status may lag a moment; the PyTorchJob is what the user waits for.
    """

    def __init__(self, login: Callable[[], kopf.ConnectionInfo]):
        self.login = login
        info = self._relogin()
        self.server = info.server.rstrip("/")
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        self.session = aiohttp.ClientSession(
            headers={"Accept": "application/json"},
            auth=auth,
            timeout=TIMEOUT,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
        )
        self.creating = 0
        self.no_creates = asyncio.Event()
        self.no_creates.set()

    async def close(self) -> None:
        await self.session.close()

    def _relogin(self) -> kopf.ConnectionInfo:
        info = self.login()
        self.authorization = f"Bearer {info.token}" if info.token else None
        return info

    async def _call(self, method: str, url_path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        relogged = False
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            request_headers = dict(headers or {})
            if self.authorization:
                request_headers["Authorization"] = self.authorization
            try:
                async with self.session.request(
                    method, self.server + url_path, headers=request_headers, **kwargs
                ) as response:
                    body = await response.json(content_type=None)
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if last:
                    API_REQUESTS.labels(method=method, outcome="failed").inc()
                    raise KubeError(0, f"{method} {url_path}: {type(exc).__name__}: {exc}") from exc
                API_REQUESTS.labels(method=method, outcome="retried").inc()
                await asyncio.sleep(backoff(attempt))
                continue
            if status == 401 and not relogged:
                relogged = True
                API_REQUESTS.labels(method=method, outcome="retried").inc()
                self._relogin()
                continue
            if (status == 429 or status >= 500) and not last:
                API_REQUESTS.labels(method=method, outcome="retried").inc()
                await asyncio.sleep(backoff(attempt, retry_after))
                continue
            if status >= 400:
                outcome = "failed" if status == 429 or status >= 500 else "refused"
                API_REQUESTS.labels(method=method, outcome=outcome).inc()
                raise KubeError(status, body)
            API_REQUESTS.labels(method=method, outcome="ok").inc()
            return body
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", path(api_version, plural, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, api_version: str, plural: str, namespace: str | None, labels: dict[str, str]):
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        body = await self._call("GET", path(api_version, plural, namespace), params={"labelSelector": selector})
        # Filter here too: a server that ignores the selector must not hand us other jobs' children.
        return [
            item
            for item in body.get("items", [])
            if all(item.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items())
        ]

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False when it already exists (a restarted operator finds its children)."""
        plural = PLURALS[obj["kind"]]
        self.creating += 1
        self.no_creates.clear()
        try:
            await self._call("POST", path(obj["apiVersion"], plural, obj["metadata"].get("namespace")), json=obj)
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        finally:
            self.creating -= 1
            if not self.creating:
                self.no_creates.set()

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> None:
        """Delete an object; one already gone is no error."""
        try:
            await self._call("DELETE", path(api_version, plural, namespace, name))
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def merge_patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        sub: str | None = None,
    ) -> dict[str, Any]:
        if sub == "status":
            try:
                await asyncio.wait_for(self.no_creates.wait(), STATUS_WAIT_SECONDS)
            except asyncio.TimeoutError:
                pass  # a steady stream of creates must not starve status writes
        return await self._call(
            "PATCH",
            path(api_version, plural, namespace, name, sub),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )


PLURALS = {
    "ConfigMap": "configmaps",
    "PyTorchJob": "pytorchjobs",
    **{kind: plural for kind, (plural, _, _) in RESOURCES.items()},  # the jobs: from the CRDs' one table
}
