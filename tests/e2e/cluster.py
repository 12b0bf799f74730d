"""A Kubernetes API (kmock's emulator, made stricter) and a stand-in for Kubeflow's training operator.

The emulator runs in its own thread and event loop on 127.0.0.1; the operator under test is a
separate process that reaches it over HTTP through a kubeconfig, exactly as in a cluster.

Where the emulator is weaker than a real API server, this harness makes it stricter: it fills
the metadata the server owns (namespace from the URL, uid, creationTimestamp, generation,
resourceVersion), bumps generation on spec changes, and plays the garbage collector for owner
references. The Kubeflow stand-in runs each replica's command as a local process with the
environment the training operator injects and writes PyTorchJob conditions as it does.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock

from potential_meme.spec.crd import RESOURCES
from potential_meme.spec.models import API_VERSION

import kubectl_api
from helpers import free_port, start_command
from zygote import Forked

GROUP_RESOURCES = {
    "v1/namespaces": {"namespaced": False, "kind": "Namespace", "verbs": ["list", "watch", "get"]},
    "v1/configmaps": {
        "namespaced": True,
        "kind": "ConfigMap",
        "verbs": ["list", "watch", "get", "create", "patch", "delete"],
    },
    "v1/events": {"namespaced": True, "kind": "Event", "verbs": ["create", "list"]},
    "kubeflow.org/v1/pytorchjobs": {
        "namespaced": True,
        "kind": "PyTorchJob",
        "subresources": ["status"],
        "verbs": ["list", "watch", "get", "create", "patch", "delete"],
    },
    "kopf.dev/v1/clusterkopfpeerings": {
        "namespaced": False,
        "kind": "ClusterKopfPeering",
        "verbs": ["list", "watch", "get", "create", "patch"],
    },
    # Our own kinds, named as their CRDs name them (kubectl finds `distillationjob`, `dj`).
    **{
        f"{API_VERSION}/{plural}": {
            "namespaced": True,
            "kind": kind,
            "singular": kind.lower(),
            "shortnames": short_names,
            "categories": ["potential-meme"],
            "subresources": ["status"],
            "verbs": ["list", "watch", "get", "create", "patch", "delete"],
        }
        for kind, (plural, short_names, _) in RESOURCES.items()
    },
}

GROUP_RESOURCES_BY_PLURAL = {key.rsplit("/", 1)[1]: info for key, info in GROUP_RESOURCES.items()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


OPERATOR_TOKEN = "operator-token"  # tells the operator's requests from the harness's own
# (verb, API group, resource) of every call the operator may make: the chart's RBAC grants exactly these.
_DECLARED = json.loads((Path(__file__).parent / "operator_api_calls.json").read_text())
DECLARED_API_CALLS = {tuple(call) for call in _DECLARED["operator"]}
DECLARED_PEERING_CALLS = {tuple(call) for call in _DECLARED["clusterPeering"]}  # with --peering, cluster-wide
RECORDED_API_CALLS: set[tuple[str, str, str]] = set()  # what the operator did call, over this session's e2e tests
E2E_TESTS_PASSED: set[str] = set()
VERBS = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.DELETE: "delete",
}


class Fault:
    """The operator's calls of one verb on one resource answered with an error, a number of times or for a while."""

    def __init__(
        self,
        verb: str,
        resource: str,
        status: int,
        message: str,
        times: int | None,
        seconds: float | None,
        name: str | None,
    ):
        self.verb, self.resource, self.status, self.message, self.name = verb, resource, status, message, name
        self.times, self.until = times, (time.monotonic() + seconds) if seconds is not None else None
        self.served = 0

    def clear(self) -> None:
        self.times = 0

    def matches(self, verb: str, resource: str, name: str | None) -> bool:
        if (verb, resource) != (self.verb, self.resource) or self.name not in (None, name):
            return False
        if self.times is not None and self.served >= self.times:
            return False
        return self.until is None or time.monotonic() < self.until

    def response(self) -> aiohttp.web.Response:
        self.served += 1
        body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": self.status, "message": self.message}
        headers = {"Retry-After": "1"} if self.status == 429 else {}
        return aiohttp.web.json_response(body, status=self.status, headers=headers)


class StrictEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.faults: list[Fault] = []
        self.accepted_tokens = {OPERATOR_TOKEN}
        self.unauthorized = 0  # requests refused for a token no longer accepted
        self.operator_requests = 0  # every request the operator sent (watch streams count once)
        self.operator_call_counts: collections.Counter = collections.Counter()  # (verb, group, resource) -> calls
        self.versions = itertools.count(1)
        self.operator_calls: set[tuple[str, str, str]] = set()  # (verb, API group, resource[/subresource])
        self.created_at: dict[tuple[str, str, str], float] = {}  # (plural, namespace, name) -> wall time
        self.in_flight: set[int] = set()  # ids of the requests being served
        # Every object ever created: plural -> (namespace, name) -> kmock's key, in creation order.
        self.keys_by_plural: dict[str, dict[tuple[str | None, str], tuple]] = {}
        self.deletions = 0

    @staticmethod
    def _call_of(request) -> tuple[str, str, str] | None:
        """(verb, API group, resource[/subresource]) of an API request; None for discovery."""
        if request.action is None or request.resource is None or not request.resource.plural:
            return None
        if request.action == kmock.action.UPDATE:
            verb = "patch" if request.method.value.upper() == "PATCH" else "update"
        else:
            verb = VERBS[request.action]
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        return verb, request.resource.group or "", resource

    def _is_operator(self, request) -> bool:
        return (request.headers.get("Authorization") or "").removeprefix("Bearer ") in self.accepted_tokens | {
            OPERATOR_TOKEN
        }

    def _record(self, request) -> None:
        if not self._is_operator(request):
            return  # the harness's own call
        self.operator_requests += 1
        call = self._call_of(request)
        if call is not None:  # not discovery
            self.operator_calls.add(call)
            self.operator_call_counts[call] += 1

    def _fault(self, request) -> aiohttp.web.Response | None:
        """An injected fault, or 401 for a token the API server no longer accepts (a rotated one)."""
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        if token and token not in self.accepted_tokens and self._is_operator(request):
            self.unauthorized += 1
            return aiohttp.web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)
        call = self._call_of(request)
        if call is None or not self._is_operator(request):
            return None
        name = request.name or ((request.data or {}).get("metadata") or {}).get("name")
        for fault in self.faults:
            if fault.matches(call[0], call[2], name):
                return fault.response()
        return None

    async def _handle(self, request):
        # kmock keeps every request ever served and matches each new one by scanning that history:
        # O(n) a request, minutes at the scale benchmark's thousands. Only requests still being
        # served (watches included) can need matching, so the history is cut down to those.
        self.in_flight.add(id(request))
        self._requests[:] = [served for served in self._requests if id(served) in self.in_flight]
        try:
            return await self._serve(request)
        finally:
            self.in_flight.discard(id(request))

    async def _serve_watch(self, request):
        # A watch is matched once, when it starts; while it streams (for the test's whole life) it need
        # not be among the requests every new request is matched against.
        self.in_flight.discard(id(request))
        async for event in super()._serve_watch(request):
            yield event

    def stored(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """An object as stored now, read in-process (as the training operator reads its informer cache)."""
        key = self.keys_by_plural.get(plural, {}).get((namespace, name))
        obj = self._objects._objects.get(key) if key else None
        return None if obj is None or obj.deleted else obj.raw

    def stored_objects(self, plural: str) -> list[tuple[tuple, Any]]:
        """(kmock key, kmock object) of every object of a resource ever created, deleted ones included."""
        return [(key, self._objects._objects[key]) for key in list(self.keys_by_plural.get(plural, {}).values())]

    def _KubernetesEmulator__get_objs(self, request, strict: bool):  # noqa: N802 - overrides kmock's private lookup
        """A request naming one object finds it by key: kmock scans every object, O(n) a request."""
        if request.name is not None and (strict or request.namespace is not None):
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [obj] if obj is not None else []
        return super()._KubernetesEmulator__get_objs(request, strict)

    async def _serve_list(self, request):
        """Lists honour labelSelector (equality and existence terms), as the API server does.

        Objects are matched on the stored labels before being copied out: kmock copies every
        object of the resource for every list, which dominates at the scale benchmark's sizes.
        """
        if not request.resource.plural or not any(request.resource == known for known in self._get_resources()):
            return await super()._serve_list(request)  # kmock's own 404
        terms = [term.partition("=") for term in (request.params.get("labelSelector") or "").split(",") if term]
        items = []
        for key, obj in self.stored_objects(request.resource.plural):
            if obj.deleted or (request.namespace is not None and key[1] != request.namespace):
                continue
            raw = obj.raw
            labels = (raw.get("metadata") or {}).get("labels") or {}
            if all(label in labels and (not equals or labels[label] == value) for label, equals, value in terms):
                if kubectl_api.field_selected(raw, request.params.get("fieldSelector")):
                    items.append(raw)
        if "as=Table" in (request.headers.get("Accept") or ""):
            rendered = kubectl_api.table(request.resource.plural, items)
            if rendered is not None:
                return rendered
        kind = GROUP_RESOURCES_BY_PLURAL.get(request.resource.plural, {}).get("kind", "")
        api_version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        return {"kind": f"{kind}List", "apiVersion": api_version, "metadata": {"resourceVersion": "1"}, "items": items}

    def _get_resources(self):
        # kmock adds the resource of every stored object, scanning them all on each list and watch;
        # every object here is of a declared resource.
        return kmock.KubernetesScaffold._get_resources(self)

    async def _serve(self, request):
        fault = self._fault(request)
        if fault is not None:
            return fault
        self._record(request)
        path = request.url.path
        if path == "/openapi/v3":
            return aiohttp.web.json_response(kubectl_api.openapi_index())
        if path == f"/openapi/v3/{kubectl_api.GROUP_VERSION}":
            return aiohttp.web.json_response(kubectl_api.openapi_group())
        if (
            request.action == kmock.action.CREATE
            and request.params.get("fieldValidation") == "Strict"
            and (problems := kubectl_api.strict_problems(request.resource.plural, request.data))
        ):
            message = f"{request.data.get('kind')} in version {kubectl_api.VERSION} cannot be handled: " + "; ".join(
                problems
            )
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422, "message": message}
            return aiohttp.web.json_response(body, status=422)
        if request.action == kmock.action.DELETE:
            self.deletions += 1
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == kmock.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                if request.namespace:
                    meta["namespace"] = request.namespace
                if not meta.get("name") and meta.get("generateName"):  # as the API server does (kopf's events)
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
                self.created_at[(request.resource.plural, request.namespace, meta.get("name"))] = time.time()
                key = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
                self.keys_by_plural.setdefault(request.resource.plural, {})[key[1:]] = key
                meta.update(
                    uid=str(uuid.uuid4()),
                    creationTimestamp=_now(),
                    generation=1,
                    resourceVersion=str(next(self.versions)),
                )
            elif request.action == kmock.action.UPDATE:
                meta = request.data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(self.versions))
                key = (request.resource, request.namespace, request.name)
                if request.subresource is None and "spec" in request.data and key in self.objects:
                    meta["generation"] = int(self.objects[key].get("metadata", {}).get("generation", 1)) + 1
        return await super()._handle(request)


class ForkedReplica:
    """A forked command with the asyncio process interface the stand-in waits on."""

    def __init__(self, forked: Forked):
        self.forked = forked
        self.pid = forked.pid

    @property
    def returncode(self) -> int | None:
        return self.forked.returncode

    async def wait(self) -> int:
        return await asyncio.to_thread(self.forked.wait)


Replica = asyncio.subprocess.Process | ForkedReplica


class Cluster:
    """The emulated API server plus the Kubeflow stand-in, in a background thread."""

    def __init__(self, workdir: Path, environment: dict[str, str], run_pods: bool = True):
        self.workdir = workdir
        self.environment = environment  # what trainer processes get (S3 credentials, endpoint)
        self.run_pods = run_pods  # False: PyTorchJobs are acknowledged (Created) and their pods never start
        self.token = OPERATOR_TOKEN  # what the operator's kubeconfig holds
        self.ready = threading.Event()
        self.processes: dict[str, list[Replica]] = {}
        self.logs: dict[str, Path] = {}
        self.pods_started: dict[str, int] = {}
        self.deleted: set[str] = set()  # PyTorchJob uids whose running pods were deleted

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Cluster:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the emulated API server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.emulator = StrictEmulator()
        for key, info in GROUP_RESOURCES.items():
            self.emulator.resources[key] = info
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self.session = aiohttp.ClientSession()
            self.ready.set()
            tasks = [asyncio.create_task(self._kubeflow()), asyncio.create_task(self._garbage_collector())]
            await self.stopping.wait()
            for task in tasks:
                task.cancel()
            for processes in self.processes.values():
                for process in processes:
                    if process.returncode is None:
                        os.killpg(process.pid, signal.SIGKILL)
            await self.session.close()

    def call(self, coroutine, timeout: float = 30) -> Any:
        """Run a coroutine on the cluster's loop from the test's thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def inject(
        self,
        verb: str,
        resource: str,
        status: int,
        message: str,
        times: int | None = None,
        seconds: float | None = None,
        name: str | None = None,
    ) -> Fault:
        """Answer the operator's `verb` calls on `resource` (of object `name`, or any) with `status`,
        `times` times, or for `seconds`, or until cleared."""
        fault = Fault(verb, resource, status, message, times, seconds, name)
        self.emulator.faults.append(fault)
        return fault

    def withdraw(self, resource: str) -> Callable[[], None]:
        """The API server stops serving `resource` ("group/version/plural"), as when its CRD is not
        installed: it leaves discovery and every call of the operator's on it gets 404. Returns what
        installs it again."""
        info = self.emulator.resources.pop(resource)
        plural = resource.rsplit("/", 1)[1]
        absent = "the server could not find the requested resource"
        faults = [self.inject(verb, plural, 404, absent) for verb in sorted(set(VERBS.values()) | {"patch"})]

        def install() -> None:
            self.emulator.resources[resource] = info
            for fault in faults:
                fault.clear()

        return install

    def rotate_token(self, new: str) -> None:
        """The API server accepts only `new` from now on; the kubeconfig the operator reads holds it."""
        self.token = new
        self.emulator.accepted_tokens = {new}
        self.kubeconfig()

    def kubeconfig(self, user: str = "operator") -> Path:
        """The operator's kubeconfig, or a user's (`user`: a token of their own, so their calls are not
        counted as the operator's)."""
        path = self.workdir / ("kubeconfig.json" if user == "operator" else f"kubeconfig-{user}.json")
        token = self.token if user == "operator" else f"{user}-token"
        partial = path.with_suffix(".partial")  # renamed into place: a reader never sees half a file
        partial.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": user, "user": {"token": token}}],
                    "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": user}}],
                }
            )
        )
        os.replace(partial, path)
        return path

    # ------------------------------------------------------------------ API over HTTP

    @staticmethod
    def path(api_version: str, plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        return "/".join([base, "namespaces", namespace, plural] + ([name] if name else []) + ([sub] if sub else []))

    async def request(self, method: str, url_path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, self.url + url_path, json=body, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    def objects(self, resource: str) -> list[dict[str, Any]]:
        async def snapshot():
            return [
                dict(obj.raw)
                for (res, _, _), obj in list(self.emulator.objects.items())
                if not obj.deleted and f"{res.group + '/' if res.group else ''}{res.version}/{res.plural}" == resource
            ]

        return self.call(snapshot())

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = self.call(self.request("GET", self.path(api_version, plural, namespace, name)))
        return body if status == 200 else None

    def _create(self, obj: dict[str, Any]):
        plural = {
            "DistillationJob": "distillationjobs",
            "EvaluationJob": "evaluationjobs",
            "PyTorchJob": "pytorchjobs",
        }[obj["kind"]]
        namespace = obj["metadata"].get("namespace", "default")
        return self.request("POST", self.path(obj["apiVersion"], plural, namespace), obj)

    def apply(self, obj: dict[str, Any]) -> tuple[int, Any]:
        return self.call(self._create(obj))

    def apply_all(
        self, objects: list[dict[str, Any]], timeout: float = 300, parallel: int = 8
    ) -> list[tuple[int, Any]]:
        """Create every object at once, as `kubectl apply -f folder/` does (a few requests in flight at a time)."""

        async def create_all():
            gate = asyncio.Semaphore(parallel)

            async def create(obj):
                async with gate:
                    return await self._create(obj)

            return await asyncio.gather(*(create(obj) for obj in objects))

        return self.call(create_all(), timeout)

    def patch(self, api_version: str, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> Any:
        return self.call(self.request("PATCH", self.path(api_version, plural, namespace, name), patch))

    def delete(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        return self.call(self.request("DELETE", self.path(api_version, plural, namespace, name)))

    # ------------------------------------------------------------------ garbage collector

    async def _garbage_collector(self) -> None:
        deletions_seen = 0
        while True:
            await asyncio.sleep(0.2)
            if self.emulator.deletions == deletions_seen:
                continue  # only a deletion orphans anything
            deletions_seen = self.emulator.deletions
            objects = self._live_objects()
            alive = {obj.get("metadata", {}).get("uid") for obj in objects}
            for obj in objects:
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                if owners and not any(owner["uid"] in alive for owner in owners):
                    meta = obj["metadata"]
                    plural = {"ConfigMap": "configmaps", "PyTorchJob": "pytorchjobs"}.get(obj.get("kind"))
                    if plural:
                        await self.request(
                            "DELETE", self.path(obj["apiVersion"], plural, meta["namespace"], meta["name"])
                        )

    def _live_objects(self) -> list[dict[str, Any]]:
        return [dict(obj.raw) for obj in list(self.emulator.objects.values()) if not obj.deleted]

    # ------------------------------------------------------------------ Kubeflow stand-in

    def _changed_pytorchjobs(
        self, versions: dict[Any, int], live: dict[Any, str]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """PyTorchJobs written since last asked (an object's history grows by one a write), and the uids
        of those deleted since (`live`: key -> uid of the object last seen under it)."""
        changed, gone = [], []
        for key, obj in self.emulator.stored_objects("pytorchjobs"):
            if obj.deleted:
                if key in live:
                    gone.append(live.pop(key))
                continue
            uid = obj.raw["metadata"]["uid"]
            if live.get(key, uid) != uid:  # deleted and made again between two looks
                gone.append(live[key])
            live[key] = uid
            if versions.get(key) != len(obj.history):
                versions[key] = len(obj.history)
                changed.append(dict(obj.raw))
        return changed, gone

    async def _kubeflow(self) -> None:
        handled: dict[str, str] = {}  # PyTorchJob uid -> what we last did
        versions: dict[Any, int] = {}
        live: dict[Any, str] = {}
        while True:
            await asyncio.sleep(0.2)
            changed, gone = self._changed_pytorchjobs(versions, live)
            for uid in gone:  # the garbage collector deletes a deleted PyTorchJob's pods
                if handled.pop(uid, None) == "running":
                    asyncio.create_task(self._delete_pods(uid))
            for job in changed:
                uid = job["metadata"]["uid"]
                suspended = bool(job["spec"].get("runPolicy", {}).get("suspend"))
                state = handled.get(uid)
                if state is None and not self.run_pods:
                    handled[uid] = "pending"  # as on a cluster with no free GPU: its pods wait
                    await self._conditions(job, [("Created", "PyTorchJobCreated", "PyTorchJob is created.")])
                    continue
                if state is None:
                    handled[uid] = "created"
                    await self._conditions(job, [("Created", "PyTorchJobCreated", "PyTorchJob is created.")])
                    state = "created"
                if state in ("created", "suspended") and not suspended:
                    handled[uid] = "running"
                    if self.run_pods:
                        asyncio.create_task(self._run(job))
                    else:
                        await self._conditions(job, [("Running", "PyTorchJobRunning", "PyTorchJob is running.")])
                elif state == "running" and suspended:
                    handled[uid] = "suspended"
                    await self._delete_pods(uid)
                    await self._conditions(
                        job, [("Suspended", "PyTorchJobSuspended", "PyTorchJob is suspended.")], running=False
                    )

    async def _delete_pods(self, uid: str, grace_seconds: float = 10) -> None:
        """As the kubelet deletes a pod: SIGTERM (torchrun passes it to its workers), SIGKILL after the grace."""
        self.deleted.add(uid)
        running = [process for process in self.processes.get(uid, []) if process.returncode is None]
        for process in running:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(process.wait() for process in running)), grace_seconds)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)

    async def _conditions(
        self, job: dict[str, Any], new: list[tuple[str, str, str]], running: bool | None = None, **status: Any
    ) -> None:
        meta = job["metadata"]
        current = self.emulator.stored("pytorchjobs", meta["namespace"], meta["name"]) or {}
        conditions = [
            c
            for c in (current.get("status") or {}).get("conditions", [])
            if c["type"] not in {kind for kind, _, _ in new}
        ]
        if running is False:
            conditions = [dict(c, status="False") if c["type"] == "Running" else c for c in conditions]
        conditions += [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastUpdateTime": _now(),
                "lastTransitionTime": _now(),
            }
            for kind, reason, message in new
        ]
        await self.request(
            "PATCH",
            self.path(job["apiVersion"], "pytorchjobs", meta["namespace"], meta["name"], "status"),
            {"status": {"conditions": conditions, **status}},
        )

    async def _run(self, job: dict[str, Any]) -> None:
        """Run the pods; with restartPolicy ExitCode, restart them on a code of 128 or more, up to backoffLimit."""
        restarts = 0
        while True:
            failure = await self._run_pods(job)
            if failure is None:
                return
            code, message = failure
            policy = job["spec"]["pytorchReplicaSpecs"]["Master"].get("restartPolicy")
            if policy == "ExitCode" and code >= 128 and restarts < job["spec"]["runPolicy"].get("backoffLimit", 0):
                restarts += 1
                await self._conditions(job, [("Restarting", "PyTorchJobRestarting", message)])
                continue
            await self._conditions(job, [("Failed", "PyTorchJobFailed", message)], running=False, completionTime=_now())
            return

    async def _start_replica(self, command: list[str], env: dict[str, str], log: Path) -> Replica:
        """A replica's process, in a session of its own: deleting a pod ends every process in it, torchrun's too."""
        with open(log, "ab") as output:
            if command[0] == "potential-meme":  # every trainer pod: forked with the engine imported
                return ForkedReplica(start_command(command[1:], env, self.workdir, output.fileno(), output.fileno()))
            return await asyncio.create_subprocess_exec(
                *command,
                env=env,
                cwd=self.workdir,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def _run_pods(self, job: dict[str, Any]) -> tuple[int, str] | None:
        """Start every replica as a local process, as the training operator starts pods; the first failure."""
        meta, spec = job["metadata"], job["spec"]
        uid = meta["uid"]
        mounts = await self._volumes(job)
        replicas = [
            (kind, index)
            for kind in ("Master", "Worker")
            for index in range(spec["pytorchReplicaSpecs"].get(kind, {}).get("replicas", 0))
        ]
        port = free_port()
        processes = []
        for rank, (kind, index) in enumerate(replicas):
            container = spec["pytorchReplicaSpecs"][kind]["template"]["spec"]["containers"][0]
            command = [self._localize(arg, mounts) for arg in container["command"]]
            env = dict(self.environment)
            # Secret references have no Secret to read here; every other value is localized like the command.
            env.update(
                {
                    item["name"]: self._localize(item["value"], mounts)
                    for item in container.get("env", [])
                    if "value" in item
                }
            )
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(len(replicas)),
                RANK=str(rank),
                PET_MASTER_ADDR="127.0.0.1",
                PET_MASTER_PORT=str(port),
                PET_NNODES=str(len(replicas)),
                PET_NPROC_PER_NODE=str(spec.get("nprocPerNode", "1")),
                PET_NODE_RANK=str(rank),
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            )
            log = self.workdir / f"{meta['name']}-{kind.lower()}-{index}.log"
            self.logs[f"{meta['name']}/{kind}-{index}"] = log
            processes.append(await self._start_replica(command, env, log))
        self.processes[uid] = processes
        self.pods_started[meta["name"]] = self.pods_started.get(meta["name"], 0) + 1
        await self._conditions(job, [("Running", "PyTorchJobRunning", "PyTorchJob is running.")], startTime=_now())
        codes = [await process.wait() for process in processes]
        if uid in self.deleted:
            self.deleted.discard(uid)
            return None  # its pods were deleted (suspension): no verdict
        if all(code == 0 for code in codes):
            await self._conditions(
                job,
                [("Succeeded", "PyTorchJobSucceeded", "PyTorchJob is successfully completed.")],
                running=False,
                completionTime=_now(),
            )
            return None
        failed = next(i for i, code in enumerate(codes) if code != 0)
        kind, index = replicas[failed]
        return codes[failed], f"{meta['name']}-{kind.lower()}-{index} exited with code {codes[failed]}"

    async def _volumes(self, job: dict[str, Any]) -> dict[str, Path]:
        """Volumes as local folders (a ConfigMap's keys as files, any other volume empty): mountPath -> folder."""
        mounts = {}
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        container = pod["containers"][0]
        for volume in pod.get("volumes", []):
            folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix=f"{volume['name']}-"))
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                status, configmap = await self.request(
                    "GET", self.path("v1", "configmaps", job["metadata"]["namespace"], name)
                )
                assert status == 200, f"ConfigMap {name} is missing: the pod could not start"
                for key, value in configmap.get("data", {}).items():
                    (folder / key).write_text(value)
            for mount in container.get("volumeMounts", []):
                if mount["name"] == volume["name"]:
                    mounts[mount["mountPath"]] = folder
        return mounts

    @staticmethod
    def _localize(arg: str, mounts: dict[str, Path]) -> str:
        for mount, folder in mounts.items():
            if arg.startswith(mount + "/"):
                return str(folder / arg[len(mount) + 1 :])
        return arg


class Operator:
    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        peering: str | None = None,
        resync_seconds: float = 60,
        priority: int | None = None,
        name: str = "operator",
        environment: dict[str, str] | None = None,
    ):
        self.cluster, self.workdir, self.peering = cluster, workdir, peering
        self.resync_seconds, self.priority, self.name = resync_seconds, priority, name
        self.environment = environment or {}  # over the test's own (e.g. another S3 endpoint)
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Operator:
        env = dict(
            os.environ,
            KUBECONFIG=str(self.cluster.kubeconfig()),
            PYTHONUNBUFFERED="1",
            POTENTIAL_MEME_RESYNC_SECONDS=str(self.resync_seconds),
            **self.environment,
        )
        env.pop("WORLD_SIZE", None)
        self.starts += 1
        self.log = self.workdir / f"{self.name}-{self.starts}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "potential_meme.cli",
                "operator",
                "--metrics-port",
                str(self.metrics_port),
                "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz",
                *(["--peering", self.peering] if self.peering else []),
                *(["--priority", str(self.priority)] if self.priority is not None else []),
            ],
            env=env,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1)
                return self
            except OSError:
                assert self.process.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the operator did not become live"
                time.sleep(0.2)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
