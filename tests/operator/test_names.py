"""Names at Kubernetes' limits, and pods a locked-down namespace admits: what a real cluster refuses, checked."""

from __future__ import annotations

import copy

import pytest
import yaml

from potential_meme.operator import names
from potential_meme.operator.render import render_job
from potential_meme.spec import parse_job, plan_stages

from helpers import REPO
from k8s_rules import dns1035_problems, kubeflow_webhook_problems, restricted_problems

LONGEST = "a" * 20 + "-platform-team-distillation-" + "b" * 15  # 63 characters


def _progressive(name: str, nodes: int = 1, sizes=("100M", "70M"), final="40M", namespace="ml") -> dict:
    document = yaml.safe_load((REPO / "examples" / "progressive-smollm2.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": namespace, "uid": f"uid-{name}"}
    document["spec"]["method"]["progressive"].update(intermediateSizes=list(sizes), finalSize=final)
    document["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": 8}
    return document


def _writing(name: str, method: dict) -> dict:
    """A job whose teacher writes before the student trains, with every optional field of its method set."""
    document = _progressive(name, nodes=names.MAX_NODES)
    document["spec"]["student"] = {
        "fromTeacher": {"numLayers": 10, "layerSelection": "even", "calibrationSequences": 4}
    }
    document["spec"]["method"] = method
    return document


RESPONSE = {
    "response": {
        "temperature": 1.5, "alpha": 0.5, "divergence": "reverseKL", "beta": 0.3, "chunkSize": 128,
        "onPolicy": {"fraction": 0.25, "maxNewTokens": 32, "temperature": 0.9},
        "generation": {"temperature": 0.2, "topP": 0.9, "maxNewTokens": 512, "batchSize": 32},
    }
}  # fmt: skip
AUGMENTED = {
    "augmented": {
        "methods": ["back_translation"], "factor": 5, "pivotLanguage": "German", "passageCharacters": 900,
        "maxPassages": 10_000, "shortestShare": 0.3, "longestShare": 3, "nearDuplicateSimilarity": 0.7,
        "generation": {"temperature": 0.9, "maxNewTokens": 1024},
    }
}  # fmt: skip


def _knowledge(name: str) -> dict:
    document = yaml.safe_load((REPO / "examples" / "kd-smollm2.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": "ml", "uid": f"uid-{name}"}
    return document


def _problems(objects: list[dict], validator) -> list[str]:
    problems = []
    for obj in objects:
        problems += dns1035_problems(obj["metadata"]["name"], obj["kind"])
        if obj["kind"] == "PyTorchJob":
            problems += [f"{error.json_path}: {error.message}" for error in validator.iter_errors(obj)]
            problems += kubeflow_webhook_problems(obj)
            for replica in obj["spec"]["pytorchReplicaSpecs"].values():
                problems += restricted_problems(replica["template"]["spec"])
    return problems


def _child_names(objects: list[dict]) -> list[str]:
    """Every name a job's objects take in the namespace: theirs and Kubeflow's replica pods and Services."""
    result = []
    for obj in objects:
        result.append(obj["metadata"]["name"])
        if obj["kind"] == "PyTorchJob":
            nodes = sum(replica["replicas"] for replica in obj["spec"]["pytorchReplicaSpecs"].values())
            result += names.replica_names(obj["metadata"]["name"], nodes)
    return result


@pytest.mark.parametrize(
    "document",
    [
        _progressive(LONGEST, sizes=("100M", "70M")),  # 63 characters, three stages
        _progressive("8b-to-1b"),  # digit first: Kubeflow's webhook refuses a PyTorchJob named so
        _progressive("two-nodes", nodes=2),
        _progressive(LONGEST, nodes=names.MAX_NODES),  # the longest name and the longest replica index
        _progressive("0" * 63),
        _writing(LONGEST, RESPONSE),  # generate -> train, every field set
        _writing("9" * 63, AUGMENTED),  # augment -> distill
    ],
    ids=[
        "63-characters-3-stages",
        "digit-first",
        "two-nodes",
        "63-characters-max-nodes",
        "63-digits",
        "63-characters-response-max-nodes",
        "63-digits-augmented-max-nodes",
    ],
)
def test_every_rendered_object_passes_a_real_clusters_checks(document, pytorchjob_validator):
    job = parse_job(document)
    objects = render_job(job)
    assert [o["kind"] for o in objects] == ["ConfigMap"] + ["PyTorchJob"] * len(plan_stages(job))
    assert _problems(objects, pytorchjob_validator) == []
    children = _child_names(objects)
    assert len(children) == len(set(children)), "two objects of one job share a name"
    assert render_job(parse_job(copy.deepcopy(document))) == objects  # deterministic


def test_the_checks_can_fail(pytorchjob_validator):
    objects = render_job(parse_job(_progressive("fine")))
    pod = objects[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    pod["securityContext"]["runAsUser"] = 0
    pod["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    objects[1]["metadata"]["name"] = "8b-" + "x" * 60
    problems = _problems(objects, pytorchjob_validator)
    for expected in ("runAsUser is 0", "do not drop ALL", "hostPath", "PyTorchJob name '8b-", "replica Service"):
        assert any(expected in problem for problem in problems), (expected, problems)


def test_readable_names_where_they_fit():
    objects = render_job(parse_job(_progressive("kd-team", sizes=("100M",), final="70M")))
    assert [o["metadata"]["name"] for o in objects] == ["kd-team-job", "kd-team-distill-100m", "kd-team-distill-70m"]


@pytest.mark.parametrize("length", [55, 62, 63])
def test_a_job_and_its_name_with_a_stage_appended_share_nothing_in_one_namespace(length, pytorchjob_validator):
    base = ("x" * length)[: length - 8] if length > 55 else "x" * length
    jobs = [_knowledge(base), _knowledge(f"{base}-distill"[:63]), _progressive(base), _progressive(f"{base}-job"[:63])]
    evaluation = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "EvaluationJob",
        "metadata": {"name": base, "namespace": "ml"},
        "spec": {"student": "file:///models/s", "dataset": {"source": "builtin:python-stdlib"}},
    }
    seen: dict[str, str] = {}
    for document in [*jobs, evaluation]:
        job = parse_job(document)
        objects = render_job(job)
        assert _problems(objects, pytorchjob_validator) == []
        for name in _child_names(objects):
            owner = f"{job.kind}/{job.metadata.name}"
            assert seen.setdefault(name, owner) == owner, f"{name} belongs to {seen[name]} and {owner}"


@pytest.mark.parametrize(
    "sizes",
    [
        ["1T", "999B", "998B"],
        [10**15, 10**15 - 1],  # the largest size the spec accepts, and its neighbour
        [100_000_001, 100_000_000, 99_999_999],
        [3_000, 2_999, 2, 1],
        ["1.5T", "1.25T", "1.125T"],
    ],
)
def test_sizes_of_any_magnitude_make_distinct_valid_stage_names(sizes, pytorchjob_validator):
    document = _progressive("sizes", sizes=tuple(sizes[:-1]), final=sizes[-1])
    job = parse_job(document)
    stage_names = [stage.name for stage in plan_stages(job)]
    assert len(set(stage_names)) == len(sizes)
    assert all(len(name) <= 63 and name.replace("-", "").isalnum() and name.islower() for name in stage_names)
    assert _problems(render_job(job), pytorchjob_validator) == []


def test_a_size_beyond_the_limit_is_refused_with_the_field():
    from potential_meme.spec import SpecError

    with pytest.raises(SpecError) as refused:
        parse_job(_progressive("huge", sizes=(), final="2000T"))
    assert "spec.method.progressive.finalSize" in str(refused.value)


def test_secret_environment_is_referenced_never_copied():
    document = _knowledge("gated")
    document["spec"]["resources"] = {"secretEnv": [{"name": "HF_TOKEN", "secret": "hub-token", "key": "token"}]}
    configmap, pytorchjob = render_job(parse_job(document))
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}} in container[
        "env"
    ]
    assert all("value" not in item for item in container["env"] if item["name"] == "HF_TOKEN")


def test_an_api_teachers_key_reaches_both_stages_pods_from_its_secret_and_nothing_else():
    document = _knowledge("answers-from-gpt-4")
    document["spec"]["teacher"] = {
        "model": "gpt-4",
        "endpoint": {"apiKeyEnv": "TEACHER_KEY", "apiKeySecret": {"secret": "openai", "key": "api-key"}},
    }
    document["spec"]["student"] = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    document["spec"]["method"] = {"response": {"generation": {"maxNewTokens": 512}}}
    document["spec"]["resources"] = {"secretEnv": [{"name": "HF_TOKEN", "secret": "hub-token", "key": "token"}]}
    configmap, *pytorchjobs = render_job(parse_job(document))
    assert [job["metadata"]["name"] for job in pytorchjobs] == [
        "answers-from-gpt-4-generate",
        "answers-from-gpt-4-train",
    ]
    for pytorchjob in pytorchjobs:
        container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        secrets = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"] if "valueFrom" in item}
        assert secrets == {
            "HF_TOKEN": {"name": "hub-token", "key": "token"},
            "TEACHER_KEY": {"name": "openai", "key": "api-key"},
        }
        assert restricted_problems(pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]) == []
    assert "api-key" in str(configmap)  # the Secret's name and key, which say where the key is; never a value


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"method": {"knowledge": {}}}, "teacher.endpoint: a teacher behind an API only writes text"),
        ({"method": {"response": {"alpha": 0.5}}}, "method.response.alpha: must be 1 with teacher.endpoint"),
        ({"student": {"fromTeacher": {"numLayers": 4}}}, "student.fromTeacher: a teacher behind an API has no layers"),
        ({"method": {"response": {"onPolicy": {"fraction": 0.5}}}}, "method.response.onPolicy: the teacher must score"),
    ],
)
def test_an_api_teacher_is_refused_where_its_logits_or_layers_would_be_needed(change, fragment):
    from potential_meme.spec import SpecError

    document = _knowledge("api")
    document["spec"]["teacher"] = {"model": "gpt-4", "endpoint": {"baseUrl": "http://vllm:8000/v1"}}
    document["spec"]["student"] = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    document["spec"]["method"] = {"response": {}}
    document["spec"].update(change)
    with pytest.raises(SpecError, match=fragment):
        parse_job(document)
