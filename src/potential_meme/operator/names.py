"""The names of everything the operator creates for a job, with Kubernetes' limits enforced here.

Each name is a DNS-1035 label (a letter first, then lowercase letters, digits and '-', at most 63
characters), deterministic (a restarted operator finds what it made) and distinct for every stage
of every job. Kubeflow's training operator names each replica's pod and Service
`<pytorchjob>-<role>-<index>`, and a Service name is a DNS-1035 label too, so a PyTorchJob's name
leaves room for the longest replica suffix. A name that fits as written is kept readable,
`<job>-<stage>`; one that does not (too long, or a job name starting with a digit, which Kubeflow's
admission webhook refuses) is shortened and ends with a hash of the whole identity, so two jobs
never share a child however alike their names are.
"""

from __future__ import annotations

import base64
import hashlib
import re

from ..spec.models import MAX_NODES

MAX_LABEL = 63

REPLICA_SUFFIX = f"-worker-{MAX_NODES - 2}"  # the longest name Kubeflow appends for a replica
MAX_PYTORCHJOB_NAME = MAX_LABEL - len(REPLICA_SUFFIX)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_HASH_LENGTH = 8


def is_dns1035_label(name: str, limit: int = MAX_LABEL) -> bool:
    return len(name) <= limit and _DNS1035.match(name) is not None


def _digest(identity: str) -> str:
    """Lowercase base32 (letters and 2-7): DNS-safe, 40 bits in 8 characters."""
    raw = hashlib.sha256(identity.encode()).digest()
    return base64.b32encode(raw).decode().lower()[:_HASH_LENGTH]


def derived_name(kind: str, job_name: str, suffix: str, limit: int) -> str:
    """`<job>-<suffix>` when that is a valid label within `limit`; else the job name shortened,
    a letter first, then the suffix and a hash of (kind, job, suffix)."""
    readable = f"{job_name}-{suffix}"
    if is_dns1035_label(readable, limit):
        return readable
    tail = f"-{suffix}-{_digest(f'{kind}/{job_name}/{suffix}')}"
    if len(tail) >= limit:  # a suffix too long to show: the hash alone identifies it
        tail = f"-{_digest(f'{kind}/{job_name}/{suffix}')}"
    head = job_name if job_name[:1].isalpha() else f"j{job_name}"
    head = head[: limit - len(tail)].rstrip("-")
    return head + tail


def configmap_name(kind: str, job_name: str) -> str:
    return derived_name(kind, job_name, "job" if kind == "DistillationJob" else "evaluation", MAX_LABEL)


def pytorchjob_name(kind: str, job_name: str, stage_name: str) -> str:
    return derived_name(kind, job_name, stage_name, MAX_PYTORCHJOB_NAME)


def replica_names(pytorchjob: str, nodes: int) -> list[str]:
    """The pod and Service names Kubeflow derives for a PyTorchJob of `nodes` pods."""
    return [f"{pytorchjob}-master-0", *(f"{pytorchjob}-worker-{index}" for index in range(nodes - 1))]
