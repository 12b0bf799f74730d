"""Rules a real cluster applies that no schema expresses, written out from their sources so tests can check them.

- Kubeflow's PyTorchJob admission webhook (training-operator release-1.9, pkg/webhooks/pytorch):
  the name is a DNS-1035 label, Master has exactly one replica, and every replica has a container
  named `pytorch` with an image. The training operator names each replica's pod and Service
  `<job>-<role>-<index>`, and a Service name is a DNS-1035 label too.
- The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards),
  baseline rules included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation) refuses them."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def _int_or_string(validator, value, instance, schema_node):
    if value and not isinstance(instance, (int, str)):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


# Kubernetes' int-or-string fields (quantities, ports) carry no `type`: jsonschema learns the rule.
_VALIDATOR = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-int-or-string": _int_or_string})


def crd_validator(crd: dict[str, Any] | Path, version: str | None = None) -> jsonschema.Validator:
    """Validates objects against a CustomResourceDefinition's schema (a file or the CRD itself), unknown fields
    refused; `version`: the served version's name (default: the first)."""
    if isinstance(crd, Path):
        crd = yaml.safe_load(crd.read_text())
    versions = crd["spec"]["versions"]
    chosen = next(v for v in versions if v["name"] == version) if version else versions[0]
    return _VALIDATOR(strict(chosen["schema"]["openAPIV3Schema"]))


def schema_problems(validator: jsonschema.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(obj)]


def dns1035_problems(name: str, what: str) -> list[str]:
    if len(name) > 63 or not DNS1035.match(name):
        return [f"{what} {name!r} ({len(name)} characters) is not a DNS-1035 label"]
    return []


def kubeflow_webhook_problems(pytorchjob: dict[str, Any]) -> list[str]:
    name = pytorchjob["metadata"]["name"]
    problems = dns1035_problems(name, "PyTorchJob name")
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    if replicas.get("Master", {}).get("replicas", 1) != 1:
        problems.append("Master must have exactly 1 replica")
    for role, replica in replicas.items():
        containers = replica["template"]["spec"]["containers"]
        if not any(c.get("name") == "pytorch" and c.get("image") for c in containers):
            problems.append(f"{role}: no container named pytorch with an image")
        for index in range(replica.get("replicas", 1)):
            problems += dns1035_problems(f"{name}-{role.lower()}-{index}", "replica Service")
    return problems


def restricted_problems(pod: dict[str, Any]) -> list[str]:
    """What the restricted profile refuses in a pod spec (empty: admitted)."""
    problems = []
    pod_context = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} is set")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} of type {sorted(kinds - RESTRICTED_VOLUMES)}")
    if (pod_context.get("seccompProfile") or {}).get("type") == "Unconfined":
        problems.append("pod seccompProfile is Unconfined")
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        name = container["name"]
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        run_as_non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if run_as_non_root is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser is 0")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems
