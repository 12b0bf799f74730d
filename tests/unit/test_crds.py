import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from potential_meme.spec import parse_job
from potential_meme.spec.crd import RESOURCES, crd_filename, render_crd

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_checked_in_crd_matches_a_fresh_generation(kind):
    checked_in = (REPO / "crds" / crd_filename(kind)).read_text()
    assert checked_in == render_crd(kind), "crds/ is stale: run `potential-meme crds`"


def _version(kind):
    return yaml.safe_load(render_crd(kind))["spec"]["versions"][0]


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_crd_has_status_subresource_printer_columns_and_a_structural_schema(kind):
    version = _version(kind)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Phase": ".status.phase", "Stage": ".status.currentStage", "Age": ".metadata.creationTimestamp"}
    text = json.dumps(version["schema"])
    for forbidden in ('"$ref"', '"anyOf"', '"$defs"', '"title"', '"const"'):
        assert forbidden not in text

    def check(node, path="root"):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("type") == "object", path
                assert "additionalProperties" not in node, path
            for key, value in node.items():
                check(value, f"{path}.{key}")

    check(version["schema"]["openAPIV3Schema"])


def _validator(kind):
    return jsonschema.Draft4Validator(_version(kind)["schema"]["openAPIV3Schema"])


def test_examples_validate_against_the_crd_and_the_models():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        errors = list(_validator(document["kind"]).iter_errors(document))
        assert not errors, f"{path.name}: {errors[0].message}"
        parse_job(document)


def test_crd_schema_refuses_what_the_models_refuse():
    document = yaml.safe_load((REPO / "examples" / "kd-smollm2.yaml").read_text())
    document["spec"]["method"]["knowledge"]["alpha"] = 1.5
    assert any("alpha" in list(e.path) for e in _validator("DistillationJob").iter_errors(document))
    document["spec"]["method"] = {"knowledge": {}, "response": {}}
    assert list(_validator("DistillationJob").iter_errors(document))


def test_crd_carries_cel_rule_for_student_source():
    spec = _version("DistillationJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = spec["properties"]["student"]["x-kubernetes-validations"]
    assert rules[0]["rule"] == "has(self.model) != has(self.fromTeacher)"


def test_spec_fields_other_than_suspend_and_placement_are_immutable_in_the_crd():
    spec = _version("DistillationJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("teacher", "student", "dataset", "method", "training", "checkpoint", "output"):
        assert {
            "rule": "self == oldSelf",
            "message": f"{field} cannot change once the job exists; create a new job",
        } in (spec[field]["x-kubernetes-validations"])
    for field in ("suspend", "resources", "runPolicy"):
        assert "x-kubernetes-validations" not in spec[field]
    assert len(spec["student"]["x-kubernetes-validations"]) == 2  # its own rule is kept


@pytest.mark.parametrize("kind", ["DistillationJob", "EvaluationJob"])
def test_crd_refuses_a_name_the_operator_cannot_serve_and_says_why(kind):
    """The root CEL rules, run by a real CEL interpreter: exactly the names the models accept pass."""
    import celpy

    environment = celpy.Environment()
    rules = _version(kind)["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]

    def refusals(name: str) -> list[str]:
        document = celpy.json_to_cel({"metadata": {"name": name}, "spec": {}})
        return [
            rule["message"]
            for rule in rules
            if not environment.program(environment.compile(rule["rule"])).evaluate({"self": document})
        ]

    for name in ("a", "8b-to-1b", "x" * 63, "0" * 63):
        assert refusals(name) == [], name
    (too_long,) = refusals("x" * 64)
    assert "at most 63 characters" in too_long
    (dotted,) = refusals("team.kd-smollm2")
    assert "(no '.')" in dotted


def test_evaluation_rules_in_the_crd_refuse_what_the_models_refuse():
    """The EvaluationJob spec's CEL rules, run by a real CEL interpreter, agree with the models."""
    import celpy

    environment = celpy.Environment()
    spec_schema = _version("EvaluationJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]
    gate_rules = spec_schema["properties"]["gates"]["items"]["x-kubernetes-validations"]

    def refusals(rules, value):
        cel = celpy.json_to_cel(value)
        return [
            r["message"]
            for r in rules
            if not environment.program(environment.compile(r["rule"])).evaluate({"self": cel})
        ]

    base = {"student": "s3://m/s/", "dataset": {"source": "builtin:python-stdlib"}}
    cases = [
        (base, True),
        ({"student": "s3://m/s/", "benchmarks": ["mmlu"]}, True),  # no perplexity: no dataset needed
        ({"student": "s3://m/s/", "benchmarks": ["perplexity"]}, False),
        (base | {"benchmarks": ["mt-bench"]}, False),
        (base | {"benchmarks": ["mt-bench"], "mtBench": {"source": "x", "judge": {"model": "gpt-4"}}}, True),
    ]
    for spec, accepted in cases:
        assert (refusals(spec_schema["x-kubernetes-validations"], spec) == []) == accepted, spec
        document = {"apiVersion": "distill.potential-meme.io/v1alpha1", "kind": "EvaluationJob"}
        try:
            parse_job(document | {"metadata": {"name": "e"}, "spec": spec})
            assert accepted, spec
        except Exception:
            assert not accepted, spec
    assert refusals(gate_rules, {"metric": "humaneval.pass@1", "atLeast": 0.1}) == []
    assert refusals(gate_rules, {"metric": "humaneval.pass@1", "atLeast": 0.1, "atMost": 0.5})
    assert refusals(gate_rules, {"metric": "humaneval.pass@1"})
