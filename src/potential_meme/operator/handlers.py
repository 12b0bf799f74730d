"""kopf handlers: DistillationJobs and EvaluationJobs become one Kubeflow PyTorchJob per planned stage.

Every trigger (a job appearing or its spec changing, one of its PyTorchJobs changing, the periodic
resync) runs the same `reconcile`: read the children and the stage manifests, `decide`, create
what is missing, write the status. Reconciling twice is harmless, so no trigger is special.
An EvaluationJob that names a DistillationJob waits for it to succeed, then runs on its student.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf
from pydantic import ValidationError

from ..metrics import operator as metrics
from ..spec import SpecError, parse_job, read_job_document
from ..spec.memory import fit_refusal
from ..spec.models import API_GROUP, API_VERSION, EvaluationJob, JobStatus
from ..spec.plan import MANIFEST, Stage, plan_stages, resolve_evaluation, resolve_evaluation_as_recorded
from ..storage import open_store, read_json_if_exists
from .kube import PLURALS, Kube, KubeError
from .render import (
    JOB_FILE,
    LABEL_JOB,
    LABEL_KIND,
    PYTORCHJOB_API,
    Defaults,
    Job,
    child_labels,
    configmap_name,
    pytorchjob_name,
    render_configmap,
    render_pytorchjob,
    with_defaults,
)
from .status import Blocker, Problem, blocked_status, child_state, decide, distillation_blocker, invalid_status

DISTILLATION_JOBS = (API_GROUP, "v1alpha1", "distillationjobs")
EVALUATION_JOBS = (API_GROUP, "v1alpha1", "evaluationjobs")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
# Events drive the work; the resync only catches what a lost event or a failed reconciliation left
# behind, and costs a reconciliation per unfinished job each round.
RESYNC_SECONDS = float(os.environ.get("POTENTIAL_MEME_RESYNC_SECONDS", "60"))
# `kubectl annotate --overwrite distillationjob NAME distill.potential-meme.io/retry=$(date +%s)`: a new value
# retries a Failed job's failed stages. A failed stage otherwise stays failed, even when its PyTorchJob is gone.
RETRY_ANNOTATION = f"{API_GROUP}/retry"
PEERING_LIFETIME_SECONDS = 20
RESYNC_CONCURRENCY = 8  # reconciliations in flight during a resync: the API server sees a steady trickle

log = logging.getLogger(__name__)


def defaults_from_environment() -> Defaults:
    """The installation's defaults (the Helm chart sets these variables)."""
    environment = {
        "trainer_image": os.environ.get("POTENTIAL_MEME_TRAINER_IMAGE"),
        "s3_endpoint": os.environ.get("POTENTIAL_MEME_S3_ENDPOINT"),
        "credentials_secret": os.environ.get("POTENTIAL_MEME_CREDENTIALS_SECRET"),
        "queue_name": os.environ.get("POTENTIAL_MEME_QUEUE_NAME"),
        "output_uri": os.environ.get("POTENTIAL_MEME_OUTPUT_URI"),
    }
    return Defaults(**{key: value for key, value in environment.items() if value})


class _NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled state. kopf diffs every event against it (a deep copy of the body, its progress
    fields cleared, then a diff) for on.create/on.update handlers; this operator has only on.event
    handlers, which never read that diff. It cost ~15 % of the operator's CPU in a burst of 500 jobs."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:
        return None

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        raise AssertionError("no kopf change handler is registered: nothing has a last-handled state to store")


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = _NoDiffBase()

    def login() -> kopf.ConnectionInfo:
        """Read afresh each time: a bound service-account token is rotated on disk by the kubelet."""
        info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
        if info is None:
            raise kopf.PermanentError("no Kubernetes credentials: neither a service account nor KUBECONFIG")
        return info

    memo.kube = Kube(login)
    # A dead replica's peering record expires after this long; a standby then takes over (kopf's default: 60 s).
    settings.peering.lifetime = PEERING_LIFETIME_SECONDS
    memo.peering = settings.peering
    memo.defaults = defaults_from_environment()
    memo.locks = collections.defaultdict(asyncio.Lock)
    memo.waiting = collections.defaultdict(set)  # (namespace, DistillationJob) -> EvaluationJobs waiting on it
    memo.child_states = {}  # (namespace, PyTorchJob) -> what the job's status showed of it, last seen
    memo.children = {}  # (namespace, kind, job) -> {PyTorchJob name: body}, as the watch last saw them
    memo.reconciled = set()  # (kind, namespace, job) this process has reconciled
    memo.distillation_progress = {}  # (namespace, DistillationJob) -> (phase, currentStage) last seen
    memo.background = {}  # name -> task; the resync is started by the first job event (_ensure_resync)
    port = os.environ.get("POTENTIAL_MEME_OPERATOR_METRICS_PORT")
    if port:
        metrics.serve(int(port))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.background.values():
        task.cancel()
    await memo.kube.close()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _previous_status(body: dict[str, Any]) -> JobStatus | None:
    try:
        return JobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None  # written by someone else: start afresh


def _known_manifests(previous: JobStatus | None) -> dict[str, dict[str, Any] | None]:
    """The manifests the status already holds: a stage it shows as Succeeded was read before."""
    return {
        row.name: {"metrics": row.metrics, "finishedAt": row.finish_time}
        for row in (previous.stages if previous else [])
        if row.phase == "Succeeded"
    }


async def _read_finished(
    job: Job,
    children: dict[str, dict[str, Any]],
    manifests: dict[str, dict[str, Any] | None],
    unreadable: dict[str, Problem],
) -> None:
    """Read into `manifests` (or `unreadable`) the manifest of every stage whose PyTorchJob has Succeeded
    and that was not read yet. A stage with no PyTorchJob yet gets one, and its pod skips the work when
    the manifest is there already (a stage run before by `potential-meme run`)."""
    unread = [
        stage
        for stage in plan_stages(job)
        if stage.name not in manifests
        and stage.name not in unreadable
        and (child := children.get(pytorchjob_name(job, stage))) is not None
        and child_state(child).phase == "Succeeded"
    ]
    if unread:
        read, problems = await asyncio.to_thread(_read_manifests, job, unread)
        manifests.update(read)
        unreadable.update(problems)


def _read_manifests(job: Job, stages: list[Stage]) -> tuple[dict[str, dict[str, Any] | None], dict[str, Problem]]:
    """The manifests of `stages`, read as the pods wrote them (the job's own endpoint), and what could not be.

    Blocking I/O: run in a thread. The operator reads with its own credentials: it never reads the job's
    Secret, so the store must grant the operator read access to the job's prefix (README: storage).
    """
    endpoint = job.spec.output.endpoint
    manifests: dict[str, dict[str, Any] | None] = {}
    problems: dict[str, Problem] = {}
    for stage in stages:
        where = f"{stage.output_uri}{MANIFEST}" + (f" at {endpoint}" if endpoint else "")
        try:
            manifests[stage.name] = manifest = read_json_if_exists(open_store(stage.output_uri, endpoint), MANIFEST)
        except Exception as exc:  # noqa: BLE001 - any store failure is reported on the job, not raised
            problems[stage.name] = Problem(
                "StoreUnreachable",
                f"stage {stage.name} finished but the operator cannot read {where}: {type(exc).__name__}: {exc}; "
                "give the operator's credentials read access to the job's output (it retries every resync)",
            )
            continue
        if manifest is None:
            problems[stage.name] = Problem(
                "ManifestNotFound",
                f"stage {stage.name}: its PyTorchJob succeeded but {where} does not exist; the operator reads "
                "the store with its own credentials and endpoint: check they reach the job's output",
            )
    return manifests, problems


def _announce(body: dict[str, Any], status: JobStatus) -> None:
    """A Kubernetes Event when the phase changes, so `kubectl describe` and event exporters show the story."""
    if (body.get("status") or {}).get("phase", "Pending") == status.phase:
        return  # a new job starts Pending: that is no news
    conditions = {condition.type: condition for condition in status.conditions}
    reason, message = status.phase, status.current_stage or ""
    if status.phase == "Failed" and "Failed" in conditions:
        reason, message = conditions["Failed"].reason, conditions["Failed"].message
    kopf.event(body, type="Warning" if status.phase == "Failed" else "Normal", reason=reason, message=message)
    meta = body["metadata"]
    log.log(
        logging.WARNING if status.phase == "Failed" else logging.INFO,
        "%s %s/%s: %s (%s) %s",
        body["kind"],
        meta.get("namespace"),
        meta["name"],
        status.phase,
        reason,
        message,
    )


async def _write_status(kube: Kube, body: dict[str, Any], status: JobStatus) -> None:
    _announce(body, status)
    new = status.to_yaml_dict()
    if body.get("status") != new:
        meta = body["metadata"]
        await kube.merge_patch(
            API_VERSION, PLURALS[body["kind"]], meta.get("namespace"), meta["name"], {"status": new}, sub="status"
        )


async def _resolved_evaluation(
    kube: Kube, defaults: Defaults, job: EvaluationJob
) -> tuple[EvaluationJob | None, Blocker | None]:
    """The evaluation with its DistillationJob's student filled in, or what it waits for.

    The ConfigMap, once made, records the resolution: a later change to (or deletion of) the
    DistillationJob cannot change what an evaluation that has started runs.
    """
    namespace, name = job.metadata.namespace, job.spec.distillation_job
    configmap = await kube.get("v1", "configmaps", namespace, configmap_name(job))
    if configmap is not None:
        recorded = parse_job(read_job_document(configmap["data"][JOB_FILE]), source=configmap_name(job))
        return resolve_evaluation_as_recorded(job, recorded), None
    body = await kube.get(API_VERSION, "distillationjobs", namespace, name)
    blocker = distillation_blocker(name, body)
    if blocker is not None:
        return None, blocker
    distillation = parse_job({k: v for k, v in body.items() if k != "status"}, source=name)
    return resolve_evaluation(job, with_defaults(distillation, defaults)), None


def _owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    return any(owner.get("uid") == uid for owner in obj.get("metadata", {}).get("ownerReferences") or [])


def _name_taken(kind: str, name: str, existing: dict[str, Any]) -> Problem:
    owners = existing["metadata"].get("ownerReferences") or []
    holder = ", ".join(f"{o.get('kind')} {o.get('name')} (uid {o.get('uid')})" for o in owners) or "no owner"
    return Problem(
        "NameConflict",
        f"{kind} {name} already exists and is not this job's (it belongs to {holder}); "
        "delete it, or give the job another name",
    )


def _refused(kind: str, name: str, exc: KubeError) -> Problem:
    if exc.status == 404 and kind == "PyTorchJob":
        return Problem(
            "KubeflowMissing",
            f"cannot create {kind} {name}: the API server has no {PYTORCHJOB_API} PyTorchJobs; install Kubeflow's "
            "training operator (its PyTorchJob CRD) in the cluster",
        )
    return Problem("CreateRefused", f"the API server refused to create {kind} {name}: {exc}")


async def _ensure(
    kube: Kube, obj: dict[str, Any], uid: str | None
) -> tuple[bool, dict[str, Any] | None, Problem | None]:
    """Make `obj` exist as this job's child: (whether this call created it, the child as the cluster has
    it, what stands in the way). A child that already exists comes back with its status, so a
    reconciliation that did not see it in the watch still reads its progress. A same-named object of
    someone else's is reported, never adopted."""
    meta = obj["metadata"]
    plural = PLURALS[obj["kind"]]
    try:
        if await kube.create(obj):
            return True, obj, None
    except KubeError as exc:
        if exc.status in (400, 403, 404, 422):
            return False, None, _refused(obj["kind"], meta["name"], exc)
        raise
    existing = await kube.get(obj["apiVersion"], plural, meta.get("namespace"), meta["name"])
    if existing is None:  # deleted between our create and our read: the next reconciliation makes it
        gone = Problem("ChildGone", f"{obj['kind']} {meta['name']} was deleted while being made; retrying")
        return False, None, gone
    if not _owned_by(existing, uid):
        return False, None, _name_taken(obj["kind"], meta["name"], existing)
    return False, existing, None


async def _ensure_configmap(kube: Kube, job: Job, uid: str | None, look_first: bool) -> Problem | None:
    """The pods mount it: it comes before a stage's PyTorchJob, and comes back if deleted while a stage runs.

    `look_first`: it usually exists (a stage is running): read it, and render it only when it is gone.
    """
    if look_first:
        name = configmap_name(job)
        existing = await kube.get("v1", "configmaps", job.metadata.namespace, name)
        if existing is not None:
            return None if _owned_by(existing, uid) else _name_taken("ConfigMap", name, existing)
    return (await _ensure(kube, render_configmap(job), uid))[2]


def _retry_requested(body: dict[str, Any], previous: JobStatus | None) -> str | None:
    """The retry annotation's value when it is new since the status last acted on one."""
    requested = (body["metadata"].get("annotations") or {}).get(RETRY_ANNOTATION)
    return requested if requested is not None and requested != (previous.retry if previous else None) else None


async def _retry(kube: Kube, job: Job, previous: JobStatus, children: dict[str, dict[str, Any]]) -> JobStatus:
    """Forget the failed stages so they run again: their PyTorchJobs are deleted, their rows and Failed cleared."""
    failed = [row.name for row in previous.stages if row.phase == "Failed"]
    for stage in plan_stages(job):
        name = pytorchjob_name(job, stage)
        if stage.name in failed and name in children:
            await kube.delete(PYTORCHJOB_API, "pytorchjobs", job.metadata.namespace, name)
            children.pop(name)
    log.info("%s/%s: retrying stage(s) %s", job.metadata.namespace, job.metadata.name, ", ".join(failed))
    return previous.model_copy(
        update={
            "stages": [row for row in previous.stages if row.phase != "Failed"],
            "conditions": [condition for condition in previous.conditions if condition.type != "Failed"],
        }
    )


def _cluster_problems(job: Job) -> list[tuple[str, str]]:
    """What the operator refuses in a cluster though a laptop runs it: output to the pod's own disk."""
    uri = job.spec.output.uri
    if "://" in uri and not uri.startswith("file://"):
        return []
    return [
        (
            "spec.output.uri",
            f"{uri!r} is a folder on the trainer pod's own disk, lost with the pod; in a cluster set "
            "s3://bucket/prefix, or install the operator with a default store (Helm value s3.bucket)",
        )
    ]


async def reconcile(
    kube: Kube,
    defaults: Defaults,
    body: dict[str, Any],
    new: bool = False,
    watched: dict[str, dict[str, Any]] | None = None,
) -> JobStatus:
    """One reconciliation. `new`: the job has just appeared (its ADDED event) and has no status, so
    nothing was made for it yet and there are no children to look up; a name clash with a deleted
    namesake's leftovers shows as a conflict on create and is put right by the child's next event.
    `watched`: the job's PyTorchJobs as the operator's watch last saw them, instead of a LIST."""
    meta = body["metadata"]
    previous, now, generation = _previous_status(body), _now(), meta.get("generation")
    try:
        job = parse_job({key: value for key, value in body.items() if key != "status"}, source=meta["name"])
        if isinstance(job, EvaluationJob) and job.spec.distillation_job:
            resolved, blocker = await _resolved_evaluation(kube, defaults, job)
            if blocker is not None:
                status = blocked_status(previous, blocker, now, generation)
                await _write_status(kube, body, status)
                return status
            job = resolved
        job = with_defaults(job, defaults)
        refusals = _cluster_problems(job)
        if refusals:
            raise SpecError(refusals)
    except SpecError as exc:
        # The API server's schema is not the only gate: refuse to act and say why, field by field.
        status = invalid_status(previous, "; ".join(f"{p}: {m}" for p, m in exc.problems), now, generation)
        await _write_status(kube, body, status)
        return status
    started = previous is not None and any(row.pytorch_job for row in previous.stages)
    too_big = None if started else fit_refusal(job)  # a stage already running has shown what fits
    if too_big is not None:
        status = invalid_status(previous, too_big, now, generation, reason="DoesNotFit")
        await _write_status(kube, body, status)
        return status
    uid = meta.get("uid")
    kubeflow_missing: Problem | None = None
    if watched is not None:
        listed = list(watched.values())
    elif new and not body.get("status"):
        listed = []
    else:
        try:
            listed = await kube.list(PYTORCHJOB_API, "pytorchjobs", job.metadata.namespace, child_labels(job))
        except KubeError as exc:
            if exc.status != 404:
                raise
            listed, kubeflow_missing = [], _refused("PyTorchJob", "(any)", exc)
    # Only children this job owns count: a deleted namesake's leftovers carry the same labels.
    children = {child["metadata"]["name"]: child for child in listed if _owned_by(child, uid)}
    going = {name for name, child in children.items() if child["metadata"].get("deletionTimestamp")}
    retry = _retry_requested(body, previous)
    if retry is not None and previous is not None and previous.phase == "Failed":
        previous = await _retry(kube, job, previous, children)
    children = {name: child for name, child in children.items() if name not in going}
    manifests, unreadable = _known_manifests(previous), {}
    await _read_finished(job, children, manifests, unreadable)
    decision = decide(job, children, manifests, previous, now, generation, unreadable)
    blocked_by = kubeflow_missing
    active = any(child_state(child).phase not in ("Succeeded", "Failed") for child in children.values())
    may_create = not meta.get("deletionTimestamp") and kubeflow_missing is None  # a job being deleted gets none
    if may_create and (decision.create is not None or active):
        blocked_by = await _ensure_configmap(kube, job, uid, look_first=decision.create is None)
        create = decision.create
        if create is not None and blocked_by is None and pytorchjob_name(job, create) not in going:
            child = render_pytorchjob(job, create, defaults)
            created, made, blocked_by = await _ensure(kube, child, uid)
            if created:
                metrics.PYTORCHJOBS_CREATED.inc()
                log.info("%s/%s: PyTorchJob %s", job.metadata.namespace, job.metadata.name, child["metadata"]["name"])
            if made is not None:
                children[child["metadata"]["name"]] = made
            if made is not None and not created:  # there already, though the watch had not shown it
                await _read_finished(job, children, manifests, unreadable)
    decision = decide(job, children, manifests, previous, now, generation, unreadable, blocked_by)
    decision.status.retry = retry if retry is not None else (previous.retry if previous else None)
    for name, child in children.items():
        suspended = bool(child.get("spec", {}).get("runPolicy", {}).get("suspend"))
        if suspended != job.spec.suspend and decision.status.phase not in ("Succeeded", "Failed"):
            await kube.merge_patch(
                PYTORCHJOB_API,
                "pytorchjobs",
                job.metadata.namespace,
                name,
                {"spec": {"runPolicy": {"suspend": job.spec.suspend}}},
            )
    metrics.stage_durations(previous, decision.status)
    await _write_status(kube, body, decision.status)
    return decision.status


async def _reconcile_counted(
    memo: kopf.Memo,
    kind: str,
    namespace: str | None,
    name: str,
    body: dict[str, Any] | None = None,
    new: bool = False,
    from_watch: bool = False,
) -> None:
    """Reconcile one job, one reconciliation at a time per job.

    `body`, the object as the triggering event or list carried it, is used when no other
    reconciliation of the job was under way; otherwise it may be stale once the lock is ours, and
    the job is read again. `from_watch`: take the job's children from the PyTorchJob watch, not a LIST.
    """
    lock = memo.locks[(kind, namespace, name)]
    if lock.locked():
        body = None
    async with lock:
        fresh = body or await memo.kube.get(API_VERSION, PLURALS[kind], namespace, name)
        if fresh is None:
            return
        watched = dict(memo.children.get((namespace, kind, name), {})) if from_watch else None
        try:
            status = await reconcile(memo.kube, memo.defaults, fresh, new=new and body is fresh, watched=watched)
        except Exception:
            metrics.RECONCILIATIONS.labels(kind=kind, result="error").inc()
            raise
        memo.reconciled.add((kind, namespace, name))
        metrics.RECONCILIATIONS.labels(kind=kind, result=status.phase.lower()).inc()
        metrics.job_phase(kind, namespace, name, status.phase)
        if kind == "EvaluationJob":
            _track_waiting(memo, fresh, waiting=status.phase == "Pending")


def _track_waiting(memo: kopf.Memo, evaluation: dict[str, Any], waiting: bool) -> None:
    """Remember which evaluations wait on which DistillationJob, so its phase changes wake them."""
    meta, awaited = evaluation["metadata"], (evaluation.get("spec") or {}).get("distillationJob")
    if not awaited:
        return
    waiters = memo.waiting[(meta.get("namespace"), awaited)]
    if waiting:
        waiters.add(meta["name"])
    else:
        waiters.discard(meta["name"])


def _needs_reconcile(event: str | None, body: kopf.Body, known: bool) -> bool:
    """A job new to this process, or whose spec (or retry request) changed since its status was written.

    `known`: this process has reconciled the job before. A listing (event None) or an ADDED of a known
    job is a watch reconnecting (a watch without a resourceVersion replays every object as ADDED), not
    news: the resync covers it. Our own status writes come back as events too; they need no work. A
    status that has not caught up with the spec (observedGeneration) always does, so nothing is lost
    between events.
    """
    if event in (None, "ADDED") and not known:  # a new job, or the first listing after a start
        return True
    status = body.get("status") or {}
    retry = (body["metadata"].get("annotations") or {}).get(RETRY_ANNOTATION)
    return status.get("observedGeneration") != body["metadata"].get("generation") or (
        retry is not None and retry != status.get("retry")
    )


@kopf.on.event(*DISTILLATION_JOBS)
@kopf.on.event(*EVALUATION_JOBS)
async def job_event(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """Every job event: level-triggered, so kopf keeps no bookkeeping on the users' objects."""
    _ensure_resync(memo)
    kind, namespace, name = body["kind"], meta.get("namespace"), meta["name"]
    if type == "DELETED":
        # Children go with the job through their owner references; only our own bookkeeping is left.
        metrics.job_phase(kind, namespace, name, None)
        memo.locks.pop((kind, namespace, name), None)
        memo.reconciled.discard((kind, namespace, name))
        if kind == "EvaluationJob":
            _track_waiting(memo, dict(body), waiting=False)
    elif _needs_reconcile(type, body, known=(kind, namespace, name) in memo.reconciled):
        await _reconcile_counted(memo, kind, namespace, name, dict(body), new=type == "ADDED")
    if kind == "DistillationJob":
        await _wake_evaluations(memo, namespace, name, None if type == "DELETED" else body.get("status") or {})


async def _wake_evaluations(memo: kopf.Memo, namespace: str | None, name: str, status: dict | None) -> None:
    """A DistillationJob appearing or moving on wakes the evaluations waiting on it, instead of their next tick."""
    key = (namespace, name)
    progress = (status.get("phase"), status.get("currentStage")) if status is not None else None
    if memo.distillation_progress.get(key) == progress:
        return
    memo.distillation_progress[key] = progress
    for evaluation in sorted(memo.waiting.get(key, ())):
        await _reconcile_counted(memo, "EvaluationJob", namespace, evaluation)


async def _leading(memo: kopf.Memo) -> bool:
    """Whether this replica is the one that works: no live peer in the peering object has a higher priority.

    kopf pauses the handlers of a replica that sees a higher-priority peer; the resync is ours, not
    kopf's, so it asks the same question of the same object. Replicas get distinct priorities
    (`potential-meme operator --priority`, random by default), so exactly one works.
    """
    peering = memo.peering
    if peering.standalone or not peering.name:
        return True
    plural, namespace = ("clusterkopfpeerings", None) if peering.clusterwide else ("kopfpeerings", memo.namespaces[0])
    body = await memo.kube.get("kopf.dev/v1", plural, namespace, peering.name)
    now = datetime.now(timezone.utc)
    for record in ((body or {}).get("status") or {}).values():
        seen = datetime.fromisoformat(record.get("lastseen") or now.isoformat())
        alive = seen + timedelta(seconds=int(record.get("lifetime", 60))) > now
        if alive and int(record.get("priority", 0)) > peering.priority:
            return False
    return True


def _ensure_resync(memo: kopf.Memo) -> None:
    """Start the resync from inside a kopf event handler: its task inherits the handler's context, where
    kopf keeps the queue Events are posted through (a task started at startup has none). Until a job
    exists there is nothing to resync. Handlers get a shallow copy of the operator's memo: the task is
    kept in a dict they share."""
    if "resync" not in memo.background:
        memo.background["resync"] = asyncio.create_task(_resync(memo))


async def _resync(memo: kopf.Memo) -> None:
    """Reconcile every unfinished job now and then: a safety net for lost events and failed reconciliations.

    One list per kind instead of kopf timers, which would put a finalizer on every job (and deleting a
    job would then wait for the operator to be up).
    """
    gate = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def resync_one(kind: str, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        async with gate:
            try:
                await _reconcile_counted(memo, kind, meta.get("namespace"), meta["name"], job, from_watch=True)
            except Exception:  # one job's failure must not stop the others'
                log.exception("resync of %s %s/%s failed", kind, meta.get("namespace"), meta["name"])

    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        if not await _leading(memo):
            continue  # a standby replica: kopf has paused its handlers, and the resync waits too
        for kind in ("DistillationJob", "EvaluationJob"):
            for namespace in memo.namespaces or (None,):
                try:
                    jobs = await memo.kube.list(API_VERSION, PLURALS[kind], namespace, {})
                except Exception:  # the next round tries again; the loop must outlive any one failure
                    log.exception("resync of %s in %s failed", kind, namespace or "all namespaces")
                    continue
                unfinished = [j for j in jobs if (j.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
                await asyncio.gather(*(resync_one(kind, job) for job in unfinished))


NOT_STARTED = child_state({}).shown


@kopf.on.event(*PYTORCHJOBS, labels={LABEL_JOB: kopf.PRESENT, LABEL_KIND: kopf.PRESENT})
async def pytorchjob_changed(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """Reconcile the owning job when what its status reads from this PyTorchJob has changed."""
    key = (meta.get("namespace"), meta["name"])
    labels = meta["labels"]
    siblings = memo.children.setdefault((meta.get("namespace"), labels[LABEL_KIND], labels[LABEL_JOB]), {})
    if type == "DELETED":
        memo.child_states.pop(key, None)
        siblings.pop(meta["name"], None)
    else:
        siblings[meta["name"]] = dict(body)
        # The training operator's Created condition, our own spec patches: nothing the job's status shows.
        # Nor does a new PyTorchJob that has not started: the reconciliation that made it wrote that.
        shown = child_state(dict(body)).shown
        before = memo.child_states.get(key, NOT_STARTED if type == "ADDED" else None)
        memo.child_states[key] = shown
        if before == shown:
            return
    if type is None:
        return  # the initial listing is covered by the jobs' own resume handlers
    if labels[LABEL_KIND] in PLURALS:
        await _reconcile_counted(memo, labels[LABEL_KIND], meta.get("namespace"), labels[LABEL_JOB])
