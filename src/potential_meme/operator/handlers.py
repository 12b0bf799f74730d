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
from datetime import datetime, timezone
from typing import Any

import kopf
import yaml
from pydantic import ValidationError

from ..metrics import operator as metrics
from ..spec import SpecError, parse_job
from ..spec.models import API_GROUP, API_VERSION, EvaluationJob, JobStatus
from ..spec.plan import MANIFEST, Stage, plan_stages, resolve_evaluation, resolve_evaluation_as_recorded
from ..storage import open_store, read_json_if_exists
from .kube import PLURALS, Kube
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
from .status import Blocker, blocked_status, child_state, decide, distillation_blocker, invalid_status

DISTILLATION_JOBS = (API_GROUP, "v1alpha1", "distillationjobs")
EVALUATION_JOBS = (API_GROUP, "v1alpha1", "evaluationjobs")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
# Events drive the work; the resync only catches what a lost event or a failed reconciliation left
# behind, and costs a reconciliation per unfinished job each round.
RESYNC_SECONDS = 60

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


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.PermanentError("no Kubernetes credentials: neither a service account nor KUBECONFIG")
    memo.kube = Kube(info)
    memo.defaults = defaults_from_environment()
    memo.locks = collections.defaultdict(asyncio.Lock)
    memo.waiting = collections.defaultdict(set)  # (namespace, DistillationJob) -> EvaluationJobs waiting on it
    memo.child_states = {}  # (namespace, PyTorchJob) -> what the job's status showed of it, last seen
    memo.distillation_progress = {}  # (namespace, DistillationJob) -> (phase, currentStage) last seen
    memo.resync = asyncio.create_task(_resync(memo))
    port = os.environ.get("POTENTIAL_MEME_OPERATOR_METRICS_PORT")
    if port:
        metrics.serve(int(port))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    await memo.kube.close()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _previous_status(body: dict[str, Any]) -> JobStatus | None:
    try:
        return JobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None  # written by someone else: start afresh


def _manifests(
    job: Job, previous: JobStatus | None, children: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], list[Stage]]:
    """The manifests the status already holds, and the stages whose manifest must be read.

    Only a stage whose PyTorchJob has Succeeded is read: a stage with no PyTorchJob yet gets one,
    and its pod skips the work when the manifest is there already (a stage run before by
    `potential-meme run`); a stage the status shows as Succeeded was read before.
    """
    known = {
        row.name: {"metrics": row.metrics, "finishedAt": row.finish_time}
        for row in (previous.stages if previous else [])
        if row.phase == "Succeeded"
    }
    unread = [
        stage
        for stage in plan_stages(job)
        if stage.name not in known
        and (child := children.get(pytorchjob_name(job, stage))) is not None
        and child_state(child).phase == "Succeeded"
    ]
    return known, unread


def _read_manifests(stages: list[Stage]) -> dict[str, dict[str, Any] | None]:
    """Blocking I/O: run in a thread."""
    return {stage.name: read_json_if_exists(open_store(stage.output_uri), MANIFEST) for stage in stages}


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
        recorded = parse_job(yaml.safe_load(configmap["data"][JOB_FILE]), source=configmap_name(job))
        return resolve_evaluation_as_recorded(job, recorded), None
    body = await kube.get(API_VERSION, "distillationjobs", namespace, name)
    blocker = distillation_blocker(name, body)
    if blocker is not None:
        return None, blocker
    distillation = parse_job({k: v for k, v in body.items() if k != "status"}, source=name)
    return resolve_evaluation(job, with_defaults(distillation, defaults)), None


async def reconcile(kube: Kube, defaults: Defaults, body: dict[str, Any], new: bool = False) -> JobStatus:
    """One reconciliation. `new`: the job has just appeared (its ADDED event) and has no status, so
    nothing was made for it yet and there are no children to look up; a name clash with a deleted
    namesake's leftovers shows as a conflict on create and is put right by the child's next event."""
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
    except SpecError as exc:
        # The API server's schema is not the only gate: refuse to act and say why, field by field.
        status = invalid_status(previous, "; ".join(f"{p}: {m}" for p, m in exc.problems), now, generation)
        await _write_status(kube, body, status)
        return status
    listed = (
        []
        if new and not body.get("status")
        else await kube.list(PYTORCHJOB_API, "pytorchjobs", job.metadata.namespace, child_labels(job))
    )
    children = {child["metadata"]["name"]: child for child in listed}
    manifests, unread = _manifests(job, previous, children)
    if unread:
        manifests.update(await asyncio.to_thread(_read_manifests, unread))
    decision = decide(job, children, manifests, previous, now, generation)
    if decision.create is not None:
        await kube.create(render_configmap(job))  # the pods mount it: it comes first
        child = render_pytorchjob(job, decision.create, defaults)
        if await kube.create(child):
            metrics.PYTORCHJOBS_CREATED.inc()
            log.info(
                "%s/%s: created PyTorchJob %s", job.metadata.namespace, job.metadata.name, child["metadata"]["name"]
            )
        children[child["metadata"]["name"]] = child
        decision = decide(job, children, manifests, previous, now, generation)
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
    memo: kopf.Memo, kind: str, namespace: str | None, name: str, body: dict[str, Any] | None = None, new: bool = False
) -> None:
    """Reconcile one job, one reconciliation at a time per job.

    `body`, the object as the triggering event or list carried it, is used when no other
    reconciliation of the job was under way; otherwise it may be stale once the lock is ours, and
    the job is read again.
    """
    lock = memo.locks[(kind, namespace, name)]
    if lock.locked():
        body = None
    async with lock:
        fresh = body or await memo.kube.get(API_VERSION, PLURALS[kind], namespace, name)
        if fresh is None:
            return
        try:
            status = await reconcile(memo.kube, memo.defaults, fresh, new=new and body is fresh)
        except Exception:
            metrics.RECONCILIATIONS.labels(kind=kind, result="error").inc()
            raise
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


def _needs_reconcile(event: str | None, body: kopf.Body) -> bool:
    """A job seen for the first time, or whose spec changed since its status was written.

    Our own status writes come back as events too; they need no work. A status that has not
    caught up with the spec (observedGeneration) always does, so nothing is lost between events.
    """
    if event in (None, "ADDED"):  # the operator's first listing (a restart), or a new job
        return True
    return (body.get("status") or {}).get("observedGeneration") != body["metadata"].get("generation")


@kopf.on.event(*DISTILLATION_JOBS)
@kopf.on.event(*EVALUATION_JOBS)
async def job_event(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """Every job event: level-triggered, so kopf keeps no bookkeeping on the users' objects."""
    kind, namespace, name = body["kind"], meta.get("namespace"), meta["name"]
    if type == "DELETED":
        # Children go with the job through their owner references; only our own bookkeeping is left.
        metrics.job_phase(kind, namespace, name, None)
        memo.locks.pop((kind, namespace, name), None)
        if kind == "EvaluationJob":
            _track_waiting(memo, dict(body), waiting=False)
    elif _needs_reconcile(type, body):
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


async def _resync(memo: kopf.Memo) -> None:
    """Reconcile every unfinished job now and then: a safety net for lost events and failed reconciliations.

    One list per kind instead of kopf timers, which would put a finalizer on every job (and deleting a
    job would then wait for the operator to be up).
    """
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        for kind in ("DistillationJob", "EvaluationJob"):
            for namespace in memo.namespaces or (None,):
                try:
                    jobs = await memo.kube.list(API_VERSION, PLURALS[kind], namespace, {})
                    for job in jobs:
                        if (job.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                            meta = job["metadata"]
                            await _reconcile_counted(memo, kind, meta.get("namespace"), meta["name"], job)
                except Exception:  # the next round tries again; the loop must outlive any one failure
                    log.exception("resync of %s in %s failed", kind, namespace or "all namespaces")


NOT_STARTED = child_state({}).shown


@kopf.on.event(*PYTORCHJOBS, labels={LABEL_JOB: kopf.PRESENT, LABEL_KIND: kopf.PRESENT})
async def pytorchjob_changed(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """Reconcile the owning job when what its status reads from this PyTorchJob has changed."""
    key = (meta.get("namespace"), meta["name"])
    if type == "DELETED":
        memo.child_states.pop(key, None)
    else:
        # The training operator's Created condition, our own spec patches: nothing the job's status shows.
        # Nor does a new PyTorchJob that has not started: the reconciliation that made it wrote that.
        shown = child_state(dict(body)).shown
        before = memo.child_states.get(key, NOT_STARTED if type == "ADDED" else None)
        memo.child_states[key] = shown
        if before == shown:
            return
    if type is None:
        return  # the initial listing is covered by the jobs' own resume handlers
    labels = meta["labels"]
    if labels[LABEL_KIND] in PLURALS:
        await _reconcile_counted(memo, labels[LABEL_KIND], meta.get("namespace"), labels[LABEL_JOB])
