"""A small asynchronous Kubernetes API client on aiohttp, authenticated the way kopf is.

The operator needs a handful of calls (get, list by label, create, merge-patch) on a few
resources; kopf already brings aiohttp and the credentials, so no client library is added.
"""

from __future__ import annotations

import base64
import ssl
import tempfile
from typing import Any

import aiohttp
import kopf


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


class Kube:
    def __init__(self, info: kopf.ConnectionInfo):
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"Bearer {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        self.server = info.server.rstrip("/")
        self.session = aiohttp.ClientSession(
            headers=headers, auth=auth, connector=aiohttp.TCPConnector(ssl=_ssl_context(info))
        )

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, url_path: str, **kwargs: Any) -> Any:
        async with self.session.request(method, self.server + url_path, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise KubeError(response.status, body)
            return body

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
        try:
            await self._call("POST", path(obj["apiVersion"], plural, obj["metadata"].get("namespace")), json=obj)
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
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
        return await self._call(
            "PATCH",
            path(api_version, plural, namespace, name, sub),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )


PLURALS = {
    "ConfigMap": "configmaps",
    "PyTorchJob": "pytorchjobs",
    "DistillationJob": "distillationjobs",
    "EvaluationJob": "evaluationjobs",
}
