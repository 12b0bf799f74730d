"""What an API server answers that kubectl needs and kmock does not serve, built from the generated CRDs.

- `/openapi/v3`: kubectl's `apply` asks whether the server validates fields itself (the
  `fieldValidation` query parameter on a PATCH of the kind); when it does, kubectl sends
  `fieldValidation=Strict` and the server refuses unknown fields and wrong types (422).
- Tables: `kubectl get` asks for `as=Table` and prints the CRD's additionalPrinterColumns.
- Lists carry their kind (`DistillationJobList`), and honour `fieldSelector` (`kubectl wait`,
  `kubectl describe`'s events).
"""

from __future__ import annotations

import datetime
from typing import Any

from potential_meme.spec.crd import RESOURCES, custom_resource_definition
from potential_meme.spec.models import API_GROUP

from k8s_rules import crd_validator, schema_problems

VERSION = "v1alpha1"
GROUP_VERSION = f"apis/{API_GROUP}/{VERSION}"
KINDS_BY_PLURAL = {plural: kind for kind, (plural, _, _) in RESOURCES.items()}
_VALIDATORS = {kind: crd_validator(custom_resource_definition(kind)) for kind in RESOURCES}


def openapi_index() -> dict[str, Any]:
    return {"paths": {GROUP_VERSION: {"serverRelativeURL": f"/openapi/v3/{GROUP_VERSION}?hash=potential-meme"}}}


def openapi_group() -> dict[str, Any]:
    paths = {}
    for kind, (plural, _, _) in RESOURCES.items():
        gvk = {"group": API_GROUP, "version": VERSION, "kind": kind}
        validation = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}]
        operation = {"x-kubernetes-group-version-kind": gvk, "parameters": validation, "responses": {}}
        paths[f"/{GROUP_VERSION}/namespaces/{{namespace}}/{plural}/{{name}}"] = {"patch": operation}
        paths[f"/{GROUP_VERSION}/namespaces/{{namespace}}/{plural}"] = {"post": operation}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths}


def strict_problems(plural: str, obj: dict[str, Any]) -> list[str]:
    """What `fieldValidation=Strict` refuses in a create of one of our kinds."""
    kind = KINDS_BY_PLURAL.get(plural)
    return schema_problems(_VALIDATORS[kind], obj) if kind else []


def _field(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def field_selected(obj: dict[str, Any], selector: str | None) -> bool:
    """`a.b=value` and `a.b!=value` terms, comma-separated, as the API server reads a fieldSelector."""
    for term in filter(None, (selector or "").split(",")):
        negate = "!=" in term
        path, value = term.split("!=" if negate else "=", 1)
        value = value.lstrip("=")  # `==` is `=`
        if (str(_field(obj, path) or "") == value) == negate:
            return False
    return True


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    seconds = int(
        (
            datetime.datetime.now(datetime.timezone.utc)
            - datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        ).total_seconds()
    )
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(plural: str, items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A meta.k8s.io/v1 Table of our kind's printer columns, or None for a resource that is not ours."""
    kind = KINDS_BY_PLURAL.get(plural)
    if kind is None:
        return None
    columns = custom_resource_definition(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    definitions += [
        {"name": c["name"], "type": c["type"], "format": "", "description": c["name"], "priority": 0} for c in columns
    ]
    rows = []
    for item in items:
        cells: list[Any] = [item["metadata"]["name"]]
        for column in columns:
            value = _field(item, column["jsonPath"].lstrip("."))
            cells.append(_age(value) if column["type"] == "date" else ("" if value is None else value))
        metadata = {key: item["metadata"][key] for key in ("name", "namespace", "uid", "creationTimestamp")}
        rows.append(
            {
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata},
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": "1"},
        "columnDefinitions": definitions,
        "rows": rows,
    }
