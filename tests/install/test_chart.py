"""The Helm chart, rendered by Helm's own engine (helm-python-sdk: Helm's Go SDK, no binary), linted,
and every object validated against the Kubernetes API schemas; its RBAC is the operator's recorded calls."""

import filecmp
import json

import pytest
import yaml

from helpers import REPO, SHARED
from k8s_rules import crd_validator, schema_problems

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = REPO / "charts" / "potential-meme"
KUBERNETES = "1.30.0"
MODES = {
    "default": {},
    "namespaced": {"watch": {"namespaces": ["team-a", "team-b"]}},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}, "podMonitor": {"enabled": True}}
    },
    "peering": {"replicaCount": 2, "peering": {"enabled": True}},
    "peering-namespaced": {"replicaCount": 2, "peering": {"enabled": True}, "watch": {"namespaces": ["team-a"]}},
    "s3-and-kueue": {
        "s3": {"endpoint": "http://minio.storage:9000", "bucket": "models/runs", "credentialsSecret": "s3-credentials"},
        "kueue": {"defaultQueue": "gpu-queue"},
        "logLevel": "DEBUG",
    },
    "model-aliases": {
        "modelAliases": {
            "ours": {
                "model": "s3://models/ours/",
                "architecture": {"hiddenSize": 64, "numLayers": 4, "intermediateSize": 176, "numHeads": 4}
                | {"numKvHeads": 2, "vocabSize": 512},
            }
        }
    },
}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        rendered = chart.render(values, name="pm", namespace="ml-system", is_install=True)
    finally:
        chart.close()
    return [
        document
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def granted(objects: list[dict]) -> set[tuple[str, str, str]]:
    """(verb, group, resource) of every rule of every Role and ClusterRole, each verb on each resource."""
    return {
        (verb, group, resource)
        for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


RECORDED = json.loads((REPO / "tests" / "e2e" / "operator_api_calls.json").read_text())


def operator_calls() -> set[tuple[str, str, str]]:
    return {tuple(call) for call in RECORDED["operator"]}


def peering_calls(resource: str) -> set[tuple[str, str, str]]:
    """The recorded cluster-wide peering calls; a namespaced operator makes the same on KopfPeerings."""
    return {(verb, group, resource) for verb, group, _ in RECORDED["clusterPeering"]}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_lints_and_every_object_is_valid_kubernetes(mode):
    report = helm.lint(CHART, MODES[mode], strict=True, kube_version=f"v{KUBERNETES}")
    assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
    objects = render(MODES[mode])
    for obj in objects:
        if obj["apiVersion"].startswith(("monitoring.coreos.com/", "kopf.dev/")):
            continue  # CRs of CRDs the chart does not own: checked field by field below
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    assert not [o for o in objects if "*" in json.dumps(o.get("rules", []))], "no wildcard in RBAC"


def test_rbac_grants_exactly_the_calls_the_operator_makes():
    objects = render({})
    assert len(by_kind(objects, "ClusterRole")) == 1 and not by_kind(objects, "Role")
    assert granted(objects) == operator_calls()
    [binding] = by_kind(objects, "ClusterRoleBinding")
    [account] = by_kind(objects, "ServiceAccount")
    [deployment] = by_kind(objects, "Deployment")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "ml-system"}
    ]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_mode_grants_per_namespace_and_nothing_cluster_wide():
    objects = render(MODES["namespaced"])
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    for role in roles:
        assert granted([role]) == operator_calls()
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")) == ["team-a", "team-b"]
    args = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_peering_adds_only_the_peering_objects_and_their_rules():
    for mode, resource, kind in (
        ("peering", "clusterkopfpeerings", "ClusterKopfPeering"),
        ("peering-namespaced", "kopfpeerings", "KopfPeering"),
    ):
        objects = render(MODES[mode])
        assert granted(objects) - operator_calls() == peering_calls(resource)
        [peering] = by_kind(objects, kind)
        deployment = by_kind(objects, "Deployment")[0]
        assert deployment["spec"]["replicas"] == 2
        assert (
            f"--peering={peering['metadata']['name']}"
            in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        )


def test_more_replicas_without_peering_is_refused_with_the_fix():
    with pytest.raises(helm.HelmRenderError, match="replicaCount > 1 needs peering.enabled=true"):
        render({"replicaCount": 3})


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"image": {"tag": 3}}, "at '/image/tag': got number, want string"),
        ({"logLevel": "LOUD"}, "/logLevel"),
        ({"watch": {"namespace": ["a"]}}, "additional properties 'namespace' not allowed"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"metrics": {"port": "9090"}}, "at '/metrics/port': got string, want integer"),
        (
            {"modelAliases": {"ours": {"model": "s3://m/ours/"}}},
            "at '/modelAliases/ours': missing property 'architecture'",
        ),
    ],
)
def test_values_schema_refuses_wrong_types_and_unknown_keys(values, fragment):
    chart = helm.Chart.load(CHART)
    try:
        with pytest.raises(helm.HelmValuesError) as refused:
            chart.validate_schema(values)
    finally:
        chart.close()
    assert fragment in str(refused.value)


def test_the_operator_pod_is_locked_down_and_probed_on_kopfs_health_endpoint():
    [deployment] = by_kind(render({}), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    liveness_port = next(p for p in container["ports"] if p["name"] == "health")["containerPort"]
    assert f"--liveness=http://0.0.0.0:{liveness_port}/healthz" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_values_reach_the_operator_as_its_defaults(monkeypatch):
    from potential_meme.operator.handlers import defaults_from_environment
    from potential_meme.operator.render import Defaults

    [deployment] = by_kind(render(MODES["s3-and-kueue"]), "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for variable in container["env"]:
        monkeypatch.setenv(variable["name"], variable["value"])
    assert defaults_from_environment() == Defaults(
        trainer_image="ghcr.io/potential-meme/trainer:0.1.0",
        s3_endpoint="http://minio.storage:9000",
        credentials_secret="s3-credentials",
        queue_name="gpu-queue",
        output_uri="s3://models/runs",
    )
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]  # the operator reads manifests too


def test_model_aliases_reach_the_operator_and_the_schema_is_the_specs(monkeypatch, tmp_path):
    from potential_meme.spec.aliases import ModelAlias, alias_table
    from potential_meme.spec.crd import openapi_schema

    ours = MODES["model-aliases"]["modelAliases"]["ours"]
    objects = render(MODES["model-aliases"])
    [deployment] = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [variable] = [v for v in container["env"] if v["name"] == "POTENTIAL_MEME_MODEL_ALIASES"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "model-aliases"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "model-aliases"]
    [configmap] = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    filename = variable["value"].removeprefix(mount["mountPath"] + "/")
    (tmp_path / filename).write_text(configmap["data"][filename])
    monkeypatch.setenv(variable["name"], str(tmp_path / filename))
    assert alias_table()["ours"] == ModelAlias.model_validate(ours)  # what the operator reads from the mount
    assert "POTENTIAL_MEME_MODEL_ALIASES" not in str(render({}))  # nothing without the value
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["modelAliases"]["additionalProperties"] == openapi_schema(ModelAlias)


def test_monitors_select_what_serves_metrics():
    objects = render(MODES["monitoring"])
    [service] = by_kind(objects, "Service")
    [monitor] = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    [pod_monitor] = by_kind(objects, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"  # the trainer container's port name
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert not by_kind(render({}), "ServiceMonitor") and not by_kind(render({}), "PodMonitor")


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_monitors_pass_the_prometheus_operators_own_crds(kind):
    crd = SHARED / "k8s" / f"monitoring.coreos.com_{kind.lower()}s.yaml"
    if not crd.exists():
        pytest.skip(f"{crd} is absent (a checkout outside the workplace)")
    [monitor] = by_kind(render(MODES["monitoring"]), kind)
    validator = crd_validator(crd, version=monitor["apiVersion"].split("/")[1])
    assert schema_problems(validator, monitor) == []
    monitor["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"][0]["interval"] = 30
    assert schema_problems(validator, monitor)  # the check can fail: an interval is a duration string


def test_chart_crds_are_valid_kubernetes():
    for path in sorted((CHART / "crds").glob("*.yaml")):
        kubernetes_validate.validate(yaml.safe_load(path.read_text()), KUBERNETES, strict=True)


def test_chart_crds_are_the_generated_crds():
    generated = sorted(path.name for path in (REPO / "crds").glob("*.yaml"))
    assert generated == sorted(path.name for path in (CHART / "crds").glob("*.yaml"))
    match, mismatch, errors = filecmp.cmpfiles(REPO / "crds", CHART / "crds", generated, shallow=False)
    assert not mismatch and not errors, f"run `make crds`: {mismatch or errors} differ"
