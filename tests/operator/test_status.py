"""Stage tracking: child PyTorchJobs and stage manifests decide the job's status and next PyTorchJob."""

from pathlib import Path

import jsonschema
import yaml

from potential_meme.operator.status import blocked_status, child_state, decide, distillation_blocker, invalid_status
from potential_meme.spec import parse_job
from potential_meme.spec.plan import resolve_evaluation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "progressive-smollm2.yaml"
T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z", "2026-01-01T00:09:00Z"


def _job(suspend=False):
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["suspend"] = suspend
    return parse_job(document)


def _pytorchjob(*conditions, start=T0, completion=None):
    status = {
        "conditions": [
            {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": T1}
            for kind, reason, message in conditions
        ],
        "startTime": start,
    }
    if completion:
        status["completionTime"] = completion
    return {"status": status}


def _conditions(status):
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_child_state_reads_kubeflow_conditions_terminal_first():
    assert child_state({}).phase == "Pending"
    assert child_state(_pytorchjob(("Created", "PyTorchJobCreated", ""))).reason == "Created"
    assert child_state(_pytorchjob(("Created", "c", ""), ("Running", "PyTorchJobRunning", ""))).phase == "Running"
    failed = child_state(
        _pytorchjob(("Created", "c", ""), ("Running", "r", ""), ("Failed", "PyTorchJobFailed", "pod OOMKilled"))
    )
    assert (failed.phase, failed.reason, failed.message, failed.finish_time) == (
        "Failed",
        "PyTorchJobFailed",
        "pod OOMKilled",
        T1,
    )
    assert child_state(_pytorchjob(("Succeeded", "s", ""), completion=T2)).finish_time == T2
    assert child_state(_pytorchjob(("Suspended", "PyTorchJobSuspended", ""))).phase == "Suspended"


def test_a_new_job_creates_its_first_stage_only():
    decision = decide(_job(), {}, {}, None, T0, generation=1)
    assert decision.create.name == "distill-100m"
    assert decision.status.phase == "Pending" and decision.status.current_stage == "1/2 distill-100m"
    assert decision.status.observed_generation == 1
    assert _conditions(decision.status)["Valid"] == ("True", "SpecValid")


def test_the_next_stage_waits_for_the_manifest_not_just_the_pytorchjob():
    job = _job()
    succeeded = _pytorchjob(("Created", "c", ""), ("Succeeded", "PyTorchJobSucceeded", ""), completion=T1)
    children = {"progressive-smollm2-distill-100m": succeeded}
    waiting = decide(job, children, {}, None, T1)
    assert waiting.create is None and waiting.status.phase == "Running"
    assert waiting.status.stages[0].phase == "Running"

    manifest = {"metrics": {"studentPerplexityAfter": 30.5, "steps": 30}, "finishedAt": T1}
    moving = decide(job, children, {"distill-100m": manifest}, waiting.status, T2)
    assert moving.create.name == "distill-70m"
    assert moving.status.current_stage == "2/2 distill-70m"
    first = moving.status.stages[0]
    assert (first.phase, first.pytorch_job, first.metrics["studentPerplexityAfter"]) == (
        "Succeeded",
        "progressive-smollm2-distill-100m",
        30.5,
    )
    assert first.output_uri.endswith("/progressive-smollm2/distill-100m/")


def test_all_stages_done_is_succeeded_with_the_student_artifact():
    job = _job()
    children = {
        f"progressive-smollm2-{name}": _pytorchjob(("Succeeded", "s", ""), completion=T2)
        for name in ("distill-100m", "distill-70m")
    }
    manifests = {"distill-100m": {"metrics": {}}, "distill-70m": {"metrics": {"steps": 30}}}
    done = decide(job, children, manifests, None, T2)
    assert done.create is None and done.status.phase == "Succeeded"
    assert done.status.current_stage == "2/2 distill-70m"
    assert done.status.artifacts == {"student": "file://./runs/progressive-smollm2/distill-70m/student/"}
    assert _conditions(done.status)["Succeeded"] == ("True", "AllStagesSucceeded")
    assert _conditions(done.status)["Running"][0] == "False"


def test_a_failed_pod_fails_the_stage_and_the_job_with_its_reason():
    job = _job()
    children = {
        "progressive-smollm2-distill-100m": _pytorchjob(
            ("Created", "c", ""), ("Failed", "PyTorchJobFailed", "pytorch-master-0 exited with code 1")
        )
    }
    failed = decide(job, children, {}, None, T1)
    assert failed.create is None and failed.status.phase == "Failed"
    condition = next(c for c in failed.status.conditions if c.type == "Failed")
    assert condition.status == "True" and condition.reason == "PyTorchJobFailed"
    assert "distill-100m: pytorch-master-0 exited with code 1" in condition.message


def test_suspended_job_creates_nothing_and_says_so():
    decision = decide(_job(suspend=True), {}, {}, None, T0)
    assert decision.create is None and decision.status.phase == "Suspended"
    assert _conditions(decision.status)["Suspended"] == ("True", "SuspendRequested")


def test_transition_times_move_only_when_a_condition_changes():
    job = _job()
    first = decide(job, {}, {}, None, T0).status
    running = {"progressive-smollm2-distill-100m": _pytorchjob(("Running", "r", ""))}
    second = decide(job, running, {}, first, T1).status
    times = {c.type: c.last_transition_time for c in second.conditions}
    assert times["Valid"] == T0 and times["Running"] == T1 and times["Succeeded"] == T0


def test_invalid_spec_is_valid_false_with_the_message():
    status = invalid_status(None, "spec.method.knowledge.alpha: Input should be less than or equal to 1", T0, 3)
    assert status.phase == "Failed" and status.observed_generation == 3
    valid = next(c for c in status.conditions if c.type == "Valid")
    assert valid.status == "False" and valid.reason == "InvalidSpec" and "alpha" in valid.message


def test_every_status_fits_the_crd_status_schema():
    from potential_meme.spec.crd import custom_resource_definition

    crd = custom_resource_definition("DistillationJob")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    validator = jsonschema.Draft4Validator(schema)
    job = _job()
    statuses = [
        decide(job, {}, {}, None, T0, generation=1).status,
        decide(job, {"progressive-smollm2-distill-100m": _pytorchjob(("Failed", "F", "x"))}, {}, None, T1).status,
        invalid_status(None, "bad", T0, 1),
    ]
    for status in statuses:
        errors = list(validator.iter_errors(status.to_yaml_dict()))
        assert not errors, errors[0].message
    assert statuses[0].to_yaml_dict()["currentStage"] == "1/2 distill-100m"


def test_a_spec_change_after_the_start_is_reported_and_not_acted_on():
    started = decide(_job(), {}, {}, None, T0).status
    assert started.spec_hash and _conditions(started)["SpecChangeRefused"] == ("False", "SpecUnchanged")
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["training"]["learningRate"] = 1.0
    changed = decide(parse_job(document), {}, {}, started, T1).status
    assert changed.spec_hash == started.spec_hash  # still the spec it started with
    assert _conditions(changed)["SpecChangeRefused"] == ("True", "SpecChangeRefused")
    # Placement and suspension are not spec changes.
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["resources"] = {"gpusPerNode": 8}
    assert _conditions(decide(parse_job(document), {}, {}, started, T1).status)["SpecChangeRefused"][0] == "False"


def _evaluation(**spec):
    return parse_job(
        {
            "apiVersion": "distill.potential-meme.io/v1alpha1",
            "kind": "EvaluationJob",
            "metadata": {"name": "progressive-smollm2"},  # the same name as the DistillationJob: allowed
            "spec": {"distillationJob": "progressive-smollm2", **spec},
        }
    )


def test_an_evaluation_waits_for_its_distillation_job_and_fails_with_it():
    assert distillation_blocker("d", None).reason == "DistillationJobNotFound"
    running = {"status": {"phase": "Running", "currentStage": "1/2 distill-100m"}}
    waiting = distillation_blocker("d", running)
    assert (waiting.reason, waiting.fatal) == ("WaitingForDistillationJob", False)
    assert waiting.message == "DistillationJob d is Running (stage 1/2 distill-100m)"
    assert distillation_blocker("d", {"status": {"phase": "Succeeded"}}) is None
    failed = distillation_blocker("d", {"status": {"phase": "Failed"}})
    assert failed.fatal

    pending = blocked_status(None, waiting, T0, 1)
    assert pending.phase == "Pending" and _conditions(pending)["Running"] == ("False", "WaitingForDistillationJob")
    gone = blocked_status(pending, failed, T1, 1)
    assert gone.phase == "Failed" and _conditions(gone)["Failed"] == ("True", "DistillationJobFailed")


def test_an_evaluation_runs_one_pytorchjob_and_ends_with_its_results_uri():
    evaluation = resolve_evaluation(_evaluation(), _job())
    first = decide(evaluation, {}, {}, None, T0, generation=1)
    assert first.create.name == "evaluate" and first.status.current_stage == "1/1 evaluate"
    child = {"progressive-smollm2-evaluate": _pytorchjob(("Succeeded", "s", ""), completion=T2)}
    done = decide(evaluation, child, {"evaluate": {"metrics": {"studentPerplexity": 21.5}}}, first.status, T2)
    assert done.status.phase == "Succeeded" and done.create is None
    assert done.status.artifacts == {
        "results": "file://./runs/progressive-smollm2/evaluate/results.json",
        "plot": "file://./runs/progressive-smollm2/evaluate/comparison.png",
        "report": "file://./runs/progressive-smollm2/evaluate/report.pdf",
    }
    assert "QualityGate" not in _conditions(done.status)  # no gates, no such condition
    assert done.status.stages[0].metrics == {"studentPerplexity": 21.5}

    from potential_meme.spec.crd import custom_resource_definition

    schema = custom_resource_definition("EvaluationJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(schema["properties"]["status"])
    for status in (first.status, done.status, blocked_status(None, distillation_blocker("d", None), T0, 1)):
        assert not list(validator.iter_errors(status.to_yaml_dict()))


GATES = [
    {"metric": "mmlu_cloze.accuracy", "atLeast": 0.9, "relativeToTeacher": True},
    {"metric": "humaneval.pass@1", "atLeast": 0.1},
]


def test_an_evaluations_gates_become_its_quality_gate_condition():
    evaluation = resolve_evaluation(_evaluation(benchmarks=["mmlu", "humaneval"], gates=GATES), _job())
    first = decide(evaluation, {}, {}, None, T0, generation=1)
    assert _conditions(first.status)["QualityGate"] == ("Unknown", "NotEvaluated")
    child = {"progressive-smollm2-evaluate": _pytorchjob(("Succeeded", "s", ""), completion=T2)}
    failing = {"gatesPassed": 1, "gatesFailed": 1, "gateFailures": "humaneval.pass@1 0.03 not >= 0.1"}
    done = decide(evaluation, child, {"evaluate": {"metrics": failing}}, first.status, T2)
    gate = next(c for c in done.status.conditions if c.type == "QualityGate")
    assert done.status.phase == "Succeeded"  # the evaluation ran; its student fell short
    assert (gate.status, gate.reason, gate.message) == ("False", "GateFailed", "humaneval.pass@1 0.03 not >= 0.1")
    assert gate.last_transition_time == T2
    passing = decide(evaluation, child, {"evaluate": {"metrics": {"gatesPassed": 2, "gatesFailed": 0}}}, None, T2)
    assert _conditions(passing.status)["QualityGate"] == ("True", "GatesPassed")


def test_a_stage_below_its_gates_ends_the_chain_as_failed():
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["gates"] = [{"metric": "perplexity.perplexity", "atMost": 3, "relativeToTeacher": True}]
    document["spec"]["gatedStages"] = "every"
    job = parse_job(document)
    child = {"progressive-smollm2-distill-100m": _pytorchjob(("Succeeded", "s", ""), completion=T1)}
    short = {"gatesPassed": 0, "gatesFailed": 1, "gateFailures": "perplexity.perplexity 80.1 not <= 45.3"}
    decision = decide(job, child, {"distill-100m": {"metrics": short}}, None, T1, 1)
    assert decision.create is None and decision.status.phase == "Failed"
    conditions = {c.type: c for c in decision.status.conditions}
    assert (conditions["Failed"].reason, conditions["QualityGate"].status) == ("QualityGateFailed", "False")
    assert conditions["QualityGate"].message == "stage distill-100m: perplexity.perplexity 80.1 not <= 45.3"
    assert "distill-100m's student fell short" in conditions["Failed"].message
    passed = decide(job, child, {"distill-100m": {"metrics": {"gatesPassed": 1, "gatesFailed": 0}}}, None, T1, 1)
    assert passed.create.name == "distill-70m" and passed.status.phase == "Running"
    assert {c.type: c.status for c in passed.status.conditions}["QualityGate"] == "Unknown"


def test_what_a_job_shows_of_a_child_ignores_what_it_does_not_show():
    waiting, created = child_state({}), child_state(_pytorchjob(("Created", "PyTorchJobCreated", ""), start=None))
    assert waiting.reason != created.reason and waiting.shown == created.shown
    running = child_state(_pytorchjob(("Running", "r", "")))
    assert running.shown != created.shown  # started: the stage shows Running and its start time
    one, other = (child_state(_pytorchjob(("Failed", "F", message))) for message in ("OOMKilled", "exit 1"))
    assert one.shown != other.shown  # the failure's message is in the job's Failed condition


def test_a_failed_stage_stays_failed_when_its_pytorchjob_goes_away():
    job = _job()
    children = {
        "progressive-smollm2-distill-100m": _pytorchjob(("Failed", "PyTorchJobFailed", "master-0 exited with code 2"))
    }
    failed = decide(job, children, {}, None, T1).status
    gone = decide(job, {}, {}, failed, T2)  # a TTL after finish, or `kubectl delete pytorchjob`
    assert gone.create is None and gone.status.phase == "Failed"
    assert [row.phase for row in gone.status.stages] == ["Failed", "Pending"]
    condition = next(c for c in gone.status.conditions if c.type == "Failed")
    assert (condition.reason, condition.last_transition_time) == ("PyTorchJobFailed", T1)
    assert "distill-100m: master-0 exited with code 2" in condition.message
    # What a retry hands decide: the status without its failed rows. The stage runs again.
    cleared = failed.model_copy(update={"stages": [r for r in failed.stages if r.phase != "Failed"]})
    assert decide(job, {}, {}, cleared, T2).create.name == "distill-100m"


def test_a_manifest_of_another_spec_is_not_taken_as_done():
    job = _job()
    children = {"progressive-smollm2-distill-100m": _pytorchjob(("Succeeded", "s", ""), completion=T2)}
    stale = decide(job, children, {"distill-100m": {"specHash": "0" * 64, "metrics": {}}}, None, T2)
    assert stale.create is None and stale.status.phase == "Failed"
    failed = next(c for c in stale.status.conditions if c.type == "Failed")
    assert failed.reason == "StaleArtifacts" and "another spec" in failed.message
    assert "file://./runs/progressive-smollm2/distill-100m/" in failed.message


def test_what_the_operator_cannot_read_or_create_is_a_condition_that_says_what_to_fix():
    from potential_meme.operator.status import Problem

    job = _job()
    children = {"progressive-smollm2-distill-100m": _pytorchjob(("Succeeded", "s", ""), completion=T2)}
    unreadable = {"distill-100m": Problem("StoreUnreachable", "cannot read s3://b/manifest.json: timeout")}
    decision = decide(job, children, {}, None, T2, unreadable=unreadable)
    assert decision.create is None and decision.status.phase == "Running"
    assert _conditions(decision.status)["ArtifactsVerified"] == ("False", "StoreUnreachable")
    blocked = decide(job, {}, {}, None, T0, blocked_by=Problem("NameConflict", "PyTorchJob x is not this job's"))
    assert _conditions(blocked.status)["Blocked"] == ("True", "NameConflict")
    assert _conditions(decide(job, {}, {}, None, T0).status)["Blocked"] == ("False", "NotBlocked")
