"""Generate the CustomResourceDefinitions from the pydantic models.

Kubernetes wants a structural OpenAPI v3.0 schema: no $ref, no anyOf-with-null, no
`additionalProperties` beside `properties`, and `exclusiveMinimum` as a boolean. This module
rewrites pydantic's JSON Schema into that dialect.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .models import API_GROUP, DistillationJobSpec, EvaluationJobSpec, JobStatus

CRD_VERSION = "v1alpha1"
CEL = "x-kubernetes-validations"

# kind -> (plural, short names, spec model)
RESOURCES: dict[str, tuple[str, list[str], type[BaseModel]]] = {
    "DistillationJob": ("distillationjobs", ["dj", "distill"], DistillationJobSpec),
    "EvaluationJob": ("evaluationjobs", ["ej"], EvaluationJobSpec),
}


# The job's name is a label value on every object the operator makes for it (at most 63 characters, no
# dots), and the operator derives valid child names from any such name (operator/names.py).
NAME_RULES = [
    {
        "rule": "self.metadata.name.size() <= 63",
        "message": "metadata.name must be at most 63 characters: it labels the job's PyTorchJobs; shorten it",
    },
    {
        "rule": "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be lowercase letters, digits and '-' (no '.'): it labels the job's PyTorchJobs",
    },
]


def _merge(type_schema: dict[str, Any], field_schema: dict[str, Any]) -> dict[str, Any]:
    """A field's schema over its type's; the CEL rules of both apply."""
    rules = type_schema.get(CEL, []) + field_schema.get(CEL, [])
    return {**type_schema, **field_schema, **({CEL: rules} if rules else {})}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return _inline(_merge(target, rest), defs)
    return {key: _inline(value, defs) for key, value in node.items() if key != "$defs"}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if isinstance(node.get("description"), str):
        node["description"] = " ".join(node["description"].split())
    variants = node.pop("anyOf", None)
    if variants is not None:
        concrete = [variant for variant in variants if variant.get("type") != "null"]
        if len(concrete) != 1:
            raise ValueError(f"cannot express a union of {concrete} in a structural schema")
        node = _merge(concrete[0], node)
        if len(concrete) < len(variants):
            node["nullable"] = True
    node.pop("title", None)
    if "prefixItems" in node:
        raise ValueError(f"a tuple ({node.get('description', node)}) has no structural schema: use a list or fields")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    if node.get("default") is None:
        node.pop("default", None)
    extra = node.get("additionalProperties")
    if "properties" in node:
        node.pop("additionalProperties", None)
    elif extra is True or extra == {}:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    return {key: _structural(value) for key, value in node.items()}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_inline(raw, raw.get("$defs", {})))


def custom_resource_definition(kind: str) -> dict[str, Any]:
    plural, short_names, spec_model = RESOURCES[kind]
    status = openapi_schema(JobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["potential-meme"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": CRD_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (spec_model.__doc__ or kind).strip().splitlines()[0],
                            "required": ["spec"],
                            CEL: NAME_RULES,
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": openapi_schema(spec_model),
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_filename(kind: str) -> str:
    return f"{API_GROUP}_{RESOURCES[kind][0]}.yaml"


def render_crd(kind: str) -> str:
    header = "# Generated by `potential-meme crds` from potential_meme.spec.models; do not edit.\n"
    return header + yaml.safe_dump(custom_resource_definition(kind), sort_keys=False, width=100)


def write_crds(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in RESOURCES:
        path = directory / crd_filename(kind)
        path.write_text(render_crd(kind))
        written.append(path)
    return written
