"""Rendered PyTorchJobs, checked against the real Kubeflow CRD schema in ../shared/k8s."""

import copy
import subprocess
import sys
from pathlib import Path

import yaml

from potential_meme.operator.render import Defaults, render_job, render_pytorchjob, to_yaml_stream
from potential_meme.spec import parse_job, plan_stages

from helpers import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _job(**spec_changes):
    document = yaml.safe_load((EXAMPLES / "progressive-smollm2.yaml").read_text())
    document["metadata"].update(namespace="ml", uid="1234-abcd")
    for key, value in spec_changes.items():
        document["spec"][key] = value
    return parse_job(document)


def _assert_valid(validator, obj):
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, f"{list(errors[0].path)}: {errors[0].message}"


def test_every_stage_renders_a_valid_pytorchjob_with_deterministic_names(pytorchjob_validator):
    job = _job()
    objects = render_job(job)
    assert [o["kind"] for o in objects] == ["ConfigMap", "PyTorchJob", "PyTorchJob"]
    assert [o["metadata"]["name"] for o in objects] == [
        "progressive-smollm2-job",
        "progressive-smollm2-distill-100m",
        "progressive-smollm2-distill-70m",
    ]
    assert render_job(job) == objects
    for obj in objects[1:]:
        _assert_valid(pytorchjob_validator, obj)
        assert obj["metadata"]["ownerReferences"][0] == {
            "apiVersion": "distill.potential-meme.io/v1alpha1",
            "kind": "DistillationJob",
            "name": "progressive-smollm2",
            "uid": "1234-abcd",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["namespace"] == "ml"
    assert objects[0]["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"


def test_configmap_carries_the_spec_the_pods_read():
    job = _job()
    configmap = render_job(job)[0]
    carried = parse_job(yaml.safe_load(configmap["data"]["job.yaml"]))
    assert carried.spec == job.spec
    assert "uid" not in configmap["data"]["job.yaml"]


def test_gpus_nodes_and_placement_reach_the_pods(pytorchjob_validator):
    job = _job(
        resources={
            "nodes": 3,
            "gpusPerNode": 8,
            "image": "registry.example/trainer:1",
            "cpu": "16",
            "memory": "200Gi",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "high",
            "serviceAccountName": "trainer",
            "queueName": "team-a",
            "secretEnv": [{"name": "HF_TOKEN", "secret": "hub", "key": "token"}],
            "modelCache": {"persistentVolumeClaim": "models"},
            "sharedMemory": "32Gi",
        },
        runPolicy={"backoffLimit": 1, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600},
        output={"uri": "s3://bucket/runs", "credentialsSecret": "s3-creds", "endpoint": "http://minio:9000"},
        suspend=True,
    )
    stage = plan_stages(job)[1]
    rendered = render_pytorchjob(job, stage)
    _assert_valid(pytorchjob_validator, rendered)
    spec = rendered["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {
        "backoffLimit": 1,
        "suspend": True,
        "cleanPodPolicy": "None",
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
    }
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert rendered["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for replica in spec["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "registry.example/trainer:1"
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 8, "cpu": "16", "memory": "200Gi"}
        assert container["command"][:4] == ["potential-meme", "launch", "--nproc-per-node=8", "--"]
        assert replica["restartPolicy"] == "ExitCode"  # the launcher's 2 and 3 are not retried, 128 is
        assert container["command"][-5:-2] == ["/etc/potential-meme/job.yaml", "--stage", "distill-70m"]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio:9000"} in container["env"]
        assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
        assert pod["priorityClassName"] == "high" and pod["serviceAccountName"] == "trainer"
        assert pod["volumes"] == [
            {"name": "job", "configMap": {"name": "progressive-smollm2-job"}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}},
        ]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}} in container["env"]
        assert pod["automountServiceAccountToken"] is True  # the job named an account: it may need its token


def test_single_node_cpu_job_has_only_a_master_and_operator_defaults_fill_gaps(pytorchjob_validator):
    job = _job()
    rendered = render_pytorchjob(
        job, plan_stages(job)[0], Defaults(trainer_image="img:2", credentials_secret="default-creds", queue_name="q")
    )
    _assert_valid(pytorchjob_validator, rendered)
    assert list(rendered["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    container = rendered["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["image"] == "img:2" and "resources" not in container
    pod = rendered["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]
    assert {"name": "HF_HOME", "value": "/var/cache/potential-meme/huggingface"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "default-creds"}}]
    assert rendered["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"


def test_the_schema_check_can_fail(pytorchjob_validator):
    broken = copy.deepcopy(render_pytorchjob(_job(), plan_stages(_job())[0]))
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    assert list(pytorchjob_validator.iter_errors(broken))


def test_render_command_prints_a_yaml_stream_without_importing_torch(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text((EXAMPLES / "kd-smollm2.yaml").read_text())
    code = (
        "import sys, runpy; sys.argv = ['potential-meme', 'render', sys.argv[1], '--namespace', 'ml'];"
        "from potential_meme.cli import main; code = main();"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')], 'torch imported';"
        "sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(job_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["ConfigMap", "PyTorchJob"]
    assert all(d["metadata"]["namespace"] == "ml" for d in documents)
    assert result.stdout == to_yaml_stream(
        render_job(
            parse_job({**yaml.safe_load(job_file.read_text()), "metadata": {"name": "kd-smollm2", "namespace": "ml"}})
        )
    )


def test_the_operator_never_imports_torch():
    code = (
        "import sys; import potential_meme.operator.handlers, potential_meme.operator.status, potential_meme.cli;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _evaluation_file(tmp_path):
    path = tmp_path / "evaluation.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "distill.potential-meme.io/v1alpha1",
                "kind": "EvaluationJob",
                "metadata": {"name": "progressive-smollm2", "namespace": "ml"},
                "spec": {"distillationJob": "progressive-smollm2", "resources": {"gpusPerNode": 1}},
            }
        )
    )
    return path


def test_an_evaluation_job_renders_one_pytorchjob_running_evaluate(tmp_path, pytorchjob_validator):
    result = cli(
        "render", str(_evaluation_file(tmp_path)), "--distillation-job", str(EXAMPLES / "progressive-smollm2.yaml")
    )
    assert result.returncode == 0, result.stderr
    configmap, pytorchjob = yaml.safe_load_all(result.stdout)
    # Same name as the DistillationJob, yet no object of the two collides and each is told apart by kind.
    distillation_names = {o["metadata"]["name"] for o in render_job(_job())}
    assert {configmap["metadata"]["name"], pytorchjob["metadata"]["name"]}.isdisjoint(distillation_names)
    assert pytorchjob["metadata"]["labels"]["distill.potential-meme.io/kind"] == "EvaluationJob"
    _assert_valid(pytorchjob_validator, pytorchjob)
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["command"][4:6] == ["evaluate", "/etc/potential-meme/job.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The pod reads an evaluation that names its student: it needs no access to the cluster.
    carried = parse_job(yaml.safe_load(configmap["data"]["job.yaml"]))
    assert carried.spec.student == "file://./runs/progressive-smollm2/distill-70m/student/"


def test_the_default_store_keeps_tenants_apart():
    from potential_meme.operator.render import with_defaults

    defaults = Defaults(output_uri="s3://models/runs/")
    outputs = set()
    for namespace in ("team-a", "team-b"):
        document = yaml.safe_load((EXAMPLES / "kd-smollm2.yaml").read_text())
        document["metadata"]["namespace"] = namespace
        del document["spec"]["output"]  # the job names no store: the installation's default applies
        job = with_defaults(parse_job(document), defaults)
        assert job.spec.output.uri == f"s3://models/runs/{namespace}"
        outputs.add(plan_stages(job)[0].output_uri)
    assert outputs == {"s3://models/runs/team-a/kd-smollm2/distill/", "s3://models/runs/team-b/kd-smollm2/distill/"}
