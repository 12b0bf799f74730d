"""Every object the operator creates for a job, as pure functions of the job (and the operator's defaults).

`potential-meme render` prints the same objects, so what a user reviews or a GitOps tool diffs is
exactly what the operator applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ..spec import job_file_text
from ..spec.aliases import ALIASES_ENV, lookup
from ..spec.memory import DEVICE_MEMORY_ENV
from ..spec.models import API_VERSION, DistillationJob, EvaluationJob
from ..spec.plan import Stage, StageKind, model_references, plan_stages
from . import names

Job = DistillationJob | EvaluationJob

PYTORCHJOB_API = "kubeflow.org/v1"
JOB_FILE_DIR = "/etc/potential-meme"
JOB_FILE = "job.yaml"
ALIASES_FILE = "model-aliases.yaml"
CONTAINER = "pytorch"  # Kubeflow's training operator looks for this container name
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MODEL_CACHE_DIR = "/var/cache/potential-meme"
TRAINER_UID = 10001  # the trainer image's user (trainer_image/Dockerfile)
LABEL_JOB = "distill.potential-meme.io/job"
LABEL_KIND = "distill.potential-meme.io/kind"  # a DistillationJob and an EvaluationJob may share a name
LABEL_STAGE = "distill.potential-meme.io/stage"


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: ~10x faster


def _yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_DUMPER, sort_keys=False)


@dataclass(frozen=True)
class Defaults:
    """What the operator's installation decides when a job does not."""

    trainer_image: str = "ghcr.io/potential-meme/trainer:0.1.0"
    s3_endpoint: str | None = None
    credentials_secret: str | None = None
    queue_name: str | None = None
    output_uri: str | None = None  # where a job that names no output.uri writes (the local default means nothing here)


def with_defaults(job: Job, defaults: Defaults) -> Job:
    """The job as this installation runs it: a job that names no output.uri writes to the default store,
    under its namespace, so two tenants' jobs of the same name never share a prefix."""
    output = job.spec.output
    if defaults.output_uri is None or "uri" in output.model_fields_set:
        return job
    uri = defaults.output_uri.rstrip("/") + (f"/{job.metadata.namespace}" if job.metadata.namespace else "")
    spec = job.spec.model_copy(update={"output": output.model_copy(update={"uri": uri})})
    return job.model_copy(update={"spec": spec})


def configmap_name(job: Job) -> str:
    return names.configmap_name(job.kind, job.metadata.name)


def pytorchjob_name(job: Job, stage: Stage) -> str:
    """Deterministic, so a restarted operator finds the child it made instead of making another."""
    return names.pytorchjob_name(job.kind, job.metadata.name, stage.name)


def owner_reference(job: Job) -> list[dict[str, Any]]:
    uid = job.metadata.model_extra.get("uid") if job.metadata.model_extra else None
    if not uid:
        return []  # rendered offline: the API server has not given the job a uid yet
    return [
        {
            "apiVersion": API_VERSION,
            "kind": job.kind,
            "name": job.metadata.name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def child_labels(job: Job) -> dict[str, str]:
    """The labels that find a job's PyTorchJobs (and tell them from another kind's of the same name)."""
    return {LABEL_JOB: job.metadata.name, LABEL_KIND: job.kind}


def _metadata(job: Job, name: str, stage: Stage | None = None) -> dict[str, Any]:
    labels = {**child_labels(job), "app.kubernetes.io/managed-by": "potential-meme"}
    if stage is not None:
        labels[LABEL_STAGE] = stage.name
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if job.metadata.namespace:
        metadata["namespace"] = job.metadata.namespace
    owners = owner_reference(job)
    if owners:
        metadata["ownerReferences"] = owners
    return metadata


def render_configmap(job: Job) -> dict[str, Any]:
    """The job spec as the pods read it: apiVersion, kind, name and spec, nothing cluster-specific."""
    document = {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": {"name": job.metadata.name},
        "spec": job.spec.to_yaml_dict(),
    }
    data = {JOB_FILE: job_file_text(document)}
    aliases = _aliases_used(job)
    if aliases:
        data[ALIASES_FILE] = _yaml(aliases)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, configmap_name(job)),
        "data": data,
    }


def _aliases_used(job: Job) -> dict[str, Any]:
    """The alias table's entries for the job's short model names, as the operator read them: the pods resolve
    each name as the operator planned it, whatever their image's built-in table or the installation's says."""
    used = {}
    for _, reference in model_references(job):
        alias = lookup(reference)
        if alias is not None:
            used[reference.lower()] = alias.to_yaml_dict()
    return used


def _container(job: Job, stage: Stage, defaults: Defaults) -> dict[str, Any]:
    resources = job.spec.resources
    processes = max(resources.gpus_per_node, 1)
    job_file = f"{JOB_FILE_DIR}/{JOB_FILE}"
    work = (
        ["evaluate", job_file]
        if stage.kind is StageKind.EVALUATE
        else ["train", "--job", job_file, "--stage", stage.name]
    )
    # The launcher runs torchrun and exits 2/3 when a retry cannot help, 128 when it may (restartPolicy ExitCode).
    command = ["potential-meme", "launch", f"--nproc-per-node={processes}", "--", *work, "--metrics-port", "9400"]
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if resources.gpus_per_node:
        limits["nvidia.com/gpu"] = resources.gpus_per_node
    for key, value in (("cpu", resources.cpu), ("memory", resources.memory)):
        if value:
            requests[key] = limits[key] = value
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HOME", "value": f"{MODEL_CACHE_DIR}/huggingface"},
        {"name": "POTENTIAL_MEME_CACHE", "value": MODEL_CACHE_DIR},  # the rendered built-in corpus, a stage to the next
    ]
    declared = resources.gpu_memory if resources.gpus_per_node else resources.memory
    if declared and isinstance(job, DistillationJob):  # the pods choose their strategy on what was judged here
        env.append({"name": DEVICE_MEMORY_ENV, "value": declared})
    if _aliases_used(job):
        env.append({"name": ALIASES_ENV, "value": f"{JOB_FILE_DIR}/{ALIASES_FILE}"})
    endpoint = job.spec.output.endpoint or defaults.s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    from_secrets = [(item.name, item) for item in resources.secret_env]
    endpoint = job.spec.teacher.endpoint if isinstance(job, DistillationJob) else None
    if endpoint is not None and endpoint.api_key_secret is not None:
        from_secrets.append((endpoint.api_key_env, endpoint.api_key_secret))  # the API teacher's key
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": item.secret, "key": item.key}}}
        for name, item in from_secrets
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": resources.image or defaults.trainer_image,
        "command": command,
        "env": env,
        "ports": [{"name": "metrics", "containerPort": 9400}],
        "volumeMounts": [
            {"name": "job", "mountPath": JOB_FILE_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "model-cache", "mountPath": MODEL_CACHE_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    secret = job.spec.output.credentials_secret or defaults.credentials_secret
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]  # referenced, never copied
    if limits:
        container["resources"] = {"limits": limits, **({"requests": requests} if requests else {})}
    return container


def _replica(job: Job, stage: Stage, replicas: int, defaults: Defaults) -> dict[str, Any]:
    resources = job.spec.resources
    pod_spec: dict[str, Any] = {
        "containers": [_container(job, stage, defaults)],
        "volumes": [
            {"name": "job", "configMap": {"name": configmap_name(job)}},
            {"name": "shm", "emptyDir": _without_none({"medium": "Memory", "sizeLimit": resources.shared_memory})},
            _model_cache_volume(job),
        ],
        # The Kubernetes "restricted" Pod Security Standard, so a locked-down namespace admits the pods.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Trainers never call the Kubernetes API: no token in the pod unless the job names an account.
        "automountServiceAccountToken": bool(resources.service_account_name),
    }
    if resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        pod_spec["tolerations"] = list(resources.tolerations)
    if resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name
    if resources.service_account_name:
        pod_spec["serviceAccountName"] = resources.service_account_name
    return {
        "replicas": replicas,
        "restartPolicy": "ExitCode",
        "template": {"metadata": {"labels": {**child_labels(job), LABEL_STAGE: stage.name}}, "spec": pod_spec},
    }


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _model_cache_volume(job: Job) -> dict[str, Any]:
    cache = job.spec.resources.model_cache
    if cache.persistent_volume_claim:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim}}
    return {"name": "model-cache", "emptyDir": _without_none({"sizeLimit": cache.size_limit})}


def render_pytorchjob(job: Job, stage: Stage, defaults: Defaults = Defaults()) -> dict[str, Any]:
    resources = job.spec.resources
    run_policy: dict[str, Any] = {
        "backoffLimit": job.spec.run_policy.backoff_limit,
        "suspend": job.spec.suspend,
        "cleanPodPolicy": "None",
    }
    if job.spec.run_policy.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = job.spec.run_policy.active_deadline_seconds
    if job.spec.run_policy.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = job.spec.run_policy.ttl_seconds_after_finished
    replica_specs = {"Master": _replica(job, stage, 1, defaults)}
    if resources.nodes > 1:
        replica_specs["Worker"] = _replica(job, stage, resources.nodes - 1, defaults)
    metadata = _metadata(job, pytorchjob_name(job, stage), stage)
    queue = resources.queue_name or defaults.queue_name
    if queue:
        metadata["labels"][QUEUE_LABEL] = queue
    return {
        "apiVersion": PYTORCHJOB_API,
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(max(resources.gpus_per_node, 1)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def render_job(job: Job, defaults: Defaults = Defaults()) -> list[dict[str, Any]]:
    """The ConfigMap, then one PyTorchJob per planned stage, in plan order."""
    job = with_defaults(job, defaults)
    return [render_configmap(job), *(render_pytorchjob(job, stage, defaults) for stage in plan_stages(job))]


def to_yaml_stream(objects: list[dict[str, Any]]) -> str:
    return "".join("---\n" + _yaml(item) for item in objects)
