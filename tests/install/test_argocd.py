"""The Argo CD health check, run by a real Lua runtime (lupa) on statuses the operator's own code writes."""

import pytest
import yaml

from potential_meme.operator.status import blocked_status, decide, distillation_blocker, invalid_status
from potential_meme.spec import parse_job

from helpers import REPO, SHARED
from k8s_rules import crd_validator, schema_problems

lupa = pytest.importorskip("lupa")

ARGOCD = REPO / "examples" / "argocd"
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


def health(obj: dict) -> dict:
    lua = lupa.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((ARGOCD / "health.lua").read_text())
    return dict(result)


def job_with(status, generation=1, suspend=False):
    document = yaml.safe_load((REPO / "examples" / "progressive-smollm2.yaml").read_text())
    document["metadata"]["generation"] = generation
    document["spec"]["suspend"] = suspend
    if status is not None:
        document["status"] = status.to_yaml_dict()
    return document


def pytorchjob(kind, reason="r", message=""):
    return {"status": {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}]}}


def test_every_phase_maps_to_its_argo_cd_health():
    job = parse_job(job_with(None))
    running_child = {"progressive-smollm2-distill-100m": pytorchjob("Running")}
    cases = {
        "no status yet": (None, 1, "Progressing", "waiting for the operator"),
        "pending": (decide(job, {}, {}, None, T0, 1).status, 1, "Progressing", "Pending 1/2 distill-100m"),
        "running": (decide(job, running_child, {}, None, T0, 1).status, 1, "Progressing", "Running 1/2 distill-100m"),
        "succeeded": (
            decide(
                job,
                {
                    "progressive-smollm2-distill-100m": pytorchjob("Succeeded"),
                    "progressive-smollm2-distill-70m": pytorchjob("Succeeded"),
                },
                {"distill-100m": {"metrics": {}}, "distill-70m": {"metrics": {}}},
                None,
                T1,
                1,
            ).status,
            1,
            "Healthy",
            "succeeded file://./runs/progressive-smollm2/distill-70m/student/",
        ),
        "failed": (
            decide(
                job,
                {"progressive-smollm2-distill-100m": pytorchjob("Failed", "PyTorchJobFailed", "OOMKilled")},
                {},
                None,
                T1,
                1,
            ).status,
            1,
            "Degraded",
            "PyTorchJobFailed: stage distill-100m: OOMKilled",
        ),
        "invalid": (
            invalid_status(None, "spec.method: set one", T0, 1),
            1,
            "Degraded",
            "invalid spec: spec.method: set one",
        ),
        "spec not yet seen": (
            decide(job, running_child, {}, None, T0, 1).status,
            2,
            "Progressing",
            "the operator has not reconciled generation 2 yet",
        ),
        "waiting evaluation": (
            blocked_status(
                None, distillation_blocker("d", {"status": {"phase": "Running", "currentStage": "1/2 x"}}), T0, 1
            ),
            1,
            "Progressing",
            "Pending (DistillationJob d is Running (stage 1/2 x))",
        ),
    }
    for name, (status, generation, expected, message) in cases.items():
        assert health(job_with(status, generation)) == {"status": expected, "message": message}, name
    suspended_job = parse_job(job_with(None, suspend=True))
    suspended = decide(suspended_job, running_child, {}, None, T1, 1).status
    assert health(job_with(suspended, 1, suspend=True)) == {
        "status": "Suspended",
        "message": "suspended at stage 1/2 distill-100m",
    }


def test_argocd_cm_carries_the_script_verbatim_for_both_kinds():
    configmap = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    script = (ARGOCD / "health.lua").read_text()
    for kind in ("DistillationJob", "EvaluationJob"):
        assert configmap["data"][f"resource.customizations.health.distill.potential-meme.io_{kind}"] == script


def test_the_applications_point_at_what_exists_here():
    operator = yaml.safe_load((ARGOCD / "application-operator.yaml").read_text())
    jobs = yaml.safe_load((ARGOCD / "application-jobs.yaml").read_text())
    assert (REPO / operator["spec"]["source"]["path"] / "Chart.yaml").exists()
    assert list((REPO / jobs["spec"]["source"]["path"]).glob("*.yaml"))
    helm = pytest.importorskip("helm_python")
    chart = helm.Chart.load(REPO / operator["spec"]["source"]["path"])
    try:
        chart.validate_schema(operator["spec"]["source"]["helm"]["valuesObject"])  # the values it passes are valid
    finally:
        chart.close()


def test_the_chart_docs_carry_the_same_script():
    assert (ARGOCD / "health.lua").read_text() in (REPO / "charts" / "potential-meme" / "README.md").read_text()


@pytest.mark.parametrize("name", ["application-operator.yaml", "application-jobs.yaml"])
def test_the_applications_pass_argo_cds_own_crd(name):
    crd = SHARED / "k8s" / "argoproj.io_applications.yaml"
    if not crd.exists():
        pytest.skip(f"{crd} is absent (a checkout outside the workplace)")
    application = yaml.safe_load((ARGOCD / name).read_text())
    validator = crd_validator(crd, version=application["apiVersion"].split("/")[1])
    assert schema_problems(validator, application) == []
    application["spec"]["syncPolicy"] = {"automated": {"prune": "yes"}}
    assert schema_problems(validator, application)  # the check can fail


def test_an_evaluation_whose_student_fails_a_gate_is_degraded_with_the_numbers():
    document = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "EvaluationJob",
        "metadata": {"name": "gated", "generation": 1},
        "spec": {
            "student": "s3://models/runs/kd/distill/student/",
            "benchmarks": ["humaneval"],
            "gates": [{"metric": "humaneval.pass@1", "atLeast": 0.1}],
        },
    }
    job = parse_job(document)
    child = {"gated-evaluate": pytorchjob("Succeeded")}
    failing = {"gatesPassed": 0, "gatesFailed": 1, "gateFailures": "humaneval.pass@1 0.03 not >= 0.1"}
    failed = decide(job, child, {"evaluate": {"metrics": failing}}, None, T1, 1).status
    assert health(document | {"status": failed.to_yaml_dict()}) == {
        "status": "Degraded",
        "message": "quality gate failed: humaneval.pass@1 0.03 not >= 0.1",
    }
    passed = decide(job, child, {"evaluate": {"metrics": {"gatesPassed": 1, "gatesFailed": 0}}}, None, T1, 1).status
    assert health(document | {"status": passed.to_yaml_dict()}) == {
        "status": "Healthy",
        "message": "succeeded file://./runs/gated/evaluate/results.json",
    }
