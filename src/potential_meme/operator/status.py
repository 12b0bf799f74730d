"""From what the cluster shows (child PyTorchJobs, stage manifests) to a job's status and next step.

Pure functions: the kopf handlers feed them what they read and apply what they return, and the
tests check every transition without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec.models import Condition, DistillationJob, JobStatus, Phase, StageStatus
from ..spec.plan import Stage, final_artifacts, plan_stages, spec_hash
from .render import Job, pytorchjob_name


@dataclass(frozen=True)
class ChildState:
    phase: Phase
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    finish_time: str | None = None

    @property
    def shown(self) -> tuple:
        """What a job's status shows of this child: a change elsewhere needs no reconciliation."""
        failure = (self.reason, self.message) if self.phase == "Failed" else ()
        return (self.phase, self.start_time, self.finish_time, *failure)


def _true(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    for condition in conditions:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def child_state(pytorchjob: dict[str, Any]) -> ChildState:
    """Read a PyTorchJob the way Kubeflow's training operator writes it: terminal conditions first."""
    status = pytorchjob.get("status") or {}
    conditions = status.get("conditions") or []
    start, finish = status.get("startTime"), status.get("completionTime")
    for kind, phase in (
        ("Failed", "Failed"),
        ("Succeeded", "Succeeded"),
        ("Suspended", "Suspended"),
        ("Running", "Running"),
        ("Restarting", "Running"),
    ):
        condition = _true(conditions, kind)
        if condition is not None:
            return ChildState(
                phase,
                condition.get("reason", kind),
                condition.get("message", ""),
                start,
                finish or (condition.get("lastTransitionTime") if phase in ("Failed", "Succeeded") else None),
            )
    return ChildState("Pending", "Created" if _true(conditions, "Created") else "Waiting", "", start, None)


@dataclass(frozen=True)
class Decision:
    status: JobStatus
    create: Stage | None  # the stage whose PyTorchJob should exist now and does not


@dataclass(frozen=True)
class Problem:
    """Something the operator cannot do or verify for a job, shown as a condition with what to fix."""

    reason: str
    message: str


def decide(
    job: Job,
    children: dict[str, dict[str, Any]],
    manifests: dict[str, dict[str, Any] | None],
    previous: JobStatus | None,
    now: str,
    generation: int | None = None,
    unreadable: dict[str, Problem] | None = None,
    blocked_by: Problem | None = None,
) -> Decision:
    """The status to write and the PyTorchJob to create, from the children (by name) and stage manifests.

    A stage is done when its manifest, written for this spec, exists; the next stage starts only then,
    so a PyTorchJob that Succeeded without publishing its manifest never lets the chain run on missing
    artifacts. `unreadable`: stages whose PyTorchJob succeeded but whose manifest could not be read, and
    why. `blocked_by`: why the operator could not create what the job needs (a name taken, a refused
    create). A stage that failed stays failed when its PyTorchJob goes away (a TTL, a `kubectl delete`):
    only a retry (see `handlers.RETRY_ANNOTATION`) clears it from `previous`.
    """
    stages = plan_stages(job)
    current_hash = spec_hash(job)
    accepted = previous.spec_hash if previous is not None and previous.spec_hash else current_hash
    failed_before = {row.name: row for row in (previous.stages if previous else []) if row.phase == "Failed"}
    rows: list[StageStatus] = []
    create: Stage | None = None
    blocked = False
    stale: Problem | None = None
    for stage in stages:
        name = pytorchjob_name(job, stage)
        manifest = manifests.get(stage.name)
        child = children.get(name)
        if manifest is not None and manifest.get("specHash", accepted) != accepted:
            stale = Problem(
                "StaleArtifacts",
                f"stage {stage.name}: {stage.output_uri} holds a stage finished for another spec "
                f"(spec hash {manifest.get('specHash', '')[:12]}, this job's {accepted[:12]}); delete that prefix "
                "or give the job another name",
            )
            manifest = None
        row = StageStatus(name=stage.name, pytorch_job=name if child else None, output_uri=stage.output_uri)
        if stale is not None and manifest is None and not blocked:
            row.phase, blocked = "Failed", True
        elif manifest is not None:
            state = child_state(child) if child else ChildState("Succeeded")
            row.phase, row.metrics = "Succeeded", dict(manifest.get("metrics", {}))
            row.start_time, row.finish_time = state.start_time, state.finish_time or manifest.get("finishedAt")
        elif child is not None:
            state = child_state(child)
            # Succeeded without a manifest: the artifacts are not there (yet); not done.
            row.phase = "Running" if state.phase == "Succeeded" else state.phase
            row.start_time, row.finish_time = state.start_time, state.finish_time if state.phase == "Failed" else None
            blocked = True
        elif stage.name in failed_before:
            row, blocked = failed_before[stage.name].model_copy(update={"pytorch_job": None}), True
        elif not blocked:
            create, blocked = stage, True
        rows.append(row)

    # A stage whose student fell short of a quality gate ends the job: the chain goes no further.
    gated_out = next((r for r in rows if r.phase == "Succeeded" and r.metrics.get("gatesFailed")), None)
    if gated_out is not None and isinstance(job, DistillationJob):
        create = None
    else:
        gated_out = None
    failed = next((r for r in rows if r.phase == "Failed"), None)
    if failed is not None or gated_out is not None:
        phase: Phase = "Failed"
    elif job.spec.suspend:
        phase = "Suspended"
    elif all(r.phase == "Succeeded" for r in rows):
        phase, create = "Succeeded", None
    elif any(r.phase in ("Running", "Succeeded") for r in rows):
        phase = "Running"
    else:
        phase = "Pending"
    if phase in ("Failed", "Suspended"):
        create = None

    current = next((i for i, r in enumerate(rows) if r.phase != "Succeeded"), len(rows) - 1)
    status = JobStatus(
        phase=phase,
        observed_generation=generation,
        current_stage=f"{current + 1}/{len(rows)} {rows[current].name}",
        stages=rows,
        artifacts=final_artifacts(job) if phase == "Succeeded" else {},
    )
    # The spec the stages run is the one first seen; a change that slipped past the CRD's CEL rules
    # (an older CRD, a direct write) is reported and not acted on: the pods read the ConfigMap.
    status.spec_hash = accepted
    changed = current_hash != accepted
    failure = _failure(failed, children, previous, stale)
    if failure is None and gated_out is not None:
        failure = Problem(
            "QualityGateFailed",
            f"stage {gated_out.name}'s student fell short of a quality gate: {gated_out.metrics.get('gateFailures')}",
        )
    unverified = next(iter((unreadable or {}).values()), None)
    status.conditions = conditions(
        previous,
        now,
        generation,
        [
            ("Valid", True, "SpecValid", "the spec passed validation"),
            (
                "Running",
                phase == "Running",
                "StageRunning" if phase == "Running" else phase,
                f"stage {status.current_stage}" if phase == "Running" else "",
            ),
            ("Succeeded", phase == "Succeeded", "AllStagesSucceeded" if phase == "Succeeded" else phase, ""),
            ("Failed", phase == "Failed", failure.reason if failure else phase, failure.message if failure else ""),
            ("Suspended", phase == "Suspended", "SuspendRequested" if phase == "Suspended" else phase, ""),
            (
                "SpecChangeRefused",
                changed,
                "SpecChangeRefused" if changed else "SpecUnchanged",
                "the spec changed after the job started; it keeps running the spec it started with: "
                "create a new job to run the new one"
                if changed
                else "",
            ),
            (
                "ArtifactsVerified",
                unverified is None,
                unverified.reason if unverified else "ManifestsRead",
                unverified.message if unverified else "",
            ),
            (
                "Blocked",
                blocked_by is not None,
                blocked_by.reason if blocked_by else "NotBlocked",
                blocked_by.message if blocked_by else "",
            ),
        ],
    )
    gates = _quality_gate(job, rows)
    if gates is not None:
        status.conditions += conditions(previous, now, generation, [gates])
    return Decision(status, create)


def _quality_gate(job: Job, rows: list[StageStatus]) -> tuple[str, bool | None, str, str] | None:
    """The job's gates, as the QualityGate condition: Unknown until its gated stages are measured, then
    True, or False with the numbers that fell short."""
    if not job.spec.gates:
        return None
    every = isinstance(job, DistillationJob) and job.spec.gated_stages == "every"
    gated = rows if every else rows[-1:]
    for row in gated:
        if row.phase == "Succeeded" and row.metrics.get("gatesFailed"):
            failures = str(row.metrics.get("gateFailures", f"{row.metrics['gatesFailed']} gates failed"))
            return ("QualityGate", False, "GateFailed", (f"stage {row.name}: " if every else "") + failures)
    if all(row.phase == "Succeeded" for row in gated):
        return ("QualityGate", True, "GatesPassed", f"all {len(job.spec.gates)} gates passed")
    return ("QualityGate", None, "NotEvaluated", f"{len(job.spec.gates)} gates wait for the gated stages")


def _failure(
    failed: StageStatus | None, children: dict[str, dict[str, Any]], previous: JobStatus | None, stale: Problem | None
) -> Problem | None:
    """Why the failed stage failed: its PyTorchJob's reason, or what the status said before it went away."""
    if failed is None:
        return None
    if stale is not None:  # its PyTorchJob succeeded; what it left is another spec's
        return stale
    if failed.pytorch_job and failed.pytorch_job in children:
        state = child_state(children[failed.pytorch_job])
        return Problem(state.reason, f"stage {failed.name}: {state.message}")
    before = next((c for c in (previous.conditions if previous else []) if c.type == "Failed"), None)
    if before is not None and before.status == "True":
        return Problem(before.reason, before.message)
    return Problem("StageFailed", f"stage {failed.name} failed")


@dataclass(frozen=True)
class Blocker(Problem):
    """Why an EvaluationJob cannot start yet (or ever, when `fatal`)."""

    fatal: bool = False


def distillation_blocker(name: str, distillation: dict[str, Any] | None) -> Blocker | None:
    """None when the DistillationJob an evaluation names has Succeeded; otherwise what to report."""
    if distillation is None:
        return Blocker("DistillationJobNotFound", f"DistillationJob {name} does not exist (yet) in this namespace")
    status = distillation.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Succeeded":
        return None
    if phase == "Failed":
        return Blocker("DistillationJobFailed", f"DistillationJob {name} failed: there is no student to evaluate", True)
    progress = f" (stage {status['currentStage']})" if status.get("currentStage") else ""
    return Blocker("WaitingForDistillationJob", f"DistillationJob {name} is {phase}{progress}")


def blocked_status(previous: JobStatus | None, blocker: Blocker, now: str, generation: int | None) -> JobStatus:
    """Pending while the DistillationJob runs; Failed when it failed."""
    phase: Phase = "Failed" if blocker.fatal else "Pending"
    return JobStatus(
        phase=phase,
        observed_generation=generation,
        conditions=conditions(
            previous,
            now,
            generation,
            [
                ("Valid", True, "SpecValid", "the spec passed validation"),
                ("Running", False, blocker.reason, blocker.message),
                ("Succeeded", False, phase, ""),
                (
                    "Failed",
                    blocker.fatal,
                    blocker.reason if blocker.fatal else phase,
                    blocker.message if blocker.fatal else "",
                ),
            ],
        ),
    )


def invalid_status(
    previous: JobStatus | None, message: str, now: str, generation: int | None, reason: str = "InvalidSpec"
) -> JobStatus:
    """Valid=False with the field paths: nothing is created for a spec that does not validate (InvalidSpec) or
    asks for devices its first training stage cannot fit in (DoesNotFit)."""
    return JobStatus(
        phase="Failed",
        observed_generation=generation,
        conditions=conditions(
            previous,
            now,
            generation,
            [
                ("Valid", False, reason, message),
                ("Failed", True, reason, message),
            ],
        ),
    )


def conditions(
    previous: JobStatus | None, now: str, generation: int | None, facts: list[tuple[str, bool | None, str, str]]
) -> list[Condition]:
    """metav1.Conditions (None: Unknown); lastTransitionTime moves only when a condition's status changes."""
    before = {condition.type: condition for condition in (previous.conditions if previous else [])}
    result = []
    for kind, is_true, reason, message in facts:
        status = "Unknown" if is_true is None else "True" if is_true else "False"
        old = before.get(kind)
        changed = old is None or old.status != status
        result.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now if changed else old.last_transition_time,
                observed_generation=generation,
            )
        )
    return result
