"""The operator under load: many DistillationJobs created at once, time from each job to its PyTorchJob.

The real operator process (kopf) runs against the test harness's emulated API server (kmock, made
stricter) with the Kubeflow stand-in acknowledging each PyTorchJob (Created, Running: no pods run)
and S3 on moto's server, as in tests/e2e. Prints p50/p95/max seconds from a job's creation to its
first PyTorchJob's creation (both stamped by the API server) and the operator's peak RSS (VmHWM).

    python benchmarks/operator_scale.py --jobs 500

Targets (issue 5): p95 <= 2 s, peak RSS <= 200 MB, on this 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "e2e")]

from cluster import Cluster, Operator  # noqa: E402 - the e2e harness
from helpers import free_port  # noqa: E402

API = "distill.potential-meme.io/v1alpha1"


def distillation_job(index: int) -> dict:
    return {
        "apiVersion": API,
        "kind": "DistillationJob",
        "metadata": {"name": f"scale-{index:04d}", "namespace": "ml"},
        "spec": {
            "teacher": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "student": {"fromTeacher": {"numLayers": 10}},
            "dataset": {"source": "builtin:python-stdlib"},
            "method": {"knowledge": {}},
            "output": {"uri": "s3://models/scale"},
            "resources": {"gpusPerNode": 1},
        },
    }


def start_s3() -> object:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line a request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
    )
    boto3.client("s3").create_bucket(Bucket="models")
    return server


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for every PyTorchJob")
    parser.add_argument("--workdir", type=Path, help="keep the operator's log here (default: a temporary folder)")
    args = parser.parse_args()

    s3 = start_s3()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="operator-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with Cluster(workdir, {}, run_pods=False) as cluster:
        operator = Operator(cluster, workdir).start()
        try:
            idle_rss = peak_rss_mib(operator.process.pid)
            jobs = [distillation_job(i) for i in range(args.jobs)]
            started = time.monotonic()
            statuses = cluster.apply_all(jobs)
            assert all(status in (200, 201) for status, _ in statuses), {status for status, _ in statuses}
            applied = time.monotonic() - started
            created = cluster.emulator.created_at
            deadline = time.monotonic() + args.timeout
            while True:
                children = {key[2] for key in list(created) if key[0] == "pytorchjobs"}
                if len(children) >= args.jobs:
                    break
                if time.monotonic() > deadline:
                    print(f"timed out: {len(children)} of {args.jobs} jobs reached a PyTorchJob")
                    return 1
                time.sleep(0.1)
            all_done = time.monotonic() - started
            operator_cpu, harness_cpu = cpu_seconds(operator.process.pid), time.process_time()
            latencies = [
                created[("pytorchjobs", "ml", f"{job['metadata']['name']}-distill")]
                - created[("distillationjobs", "ml", job["metadata"]["name"])]
                for job in jobs
            ]
            time.sleep(15)  # one timer round (10 s) over every job: steady-state memory, not just the burst
            peak = peak_rss_mib(operator.process.pid)
            metrics = operator.metrics()
        finally:
            operator.stop()
    s3.stop()
    if args.workdir is None:
        shutil.rmtree(workdir)

    created_total = next(
        line.split()[-1]
        for line in metrics.splitlines()
        if line.startswith("potential_meme_operator_pytorchjobs_created_total")
    )
    p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    print(f"\n{args.jobs} DistillationJobs created at once ({applied:.1f} s to submit), on {os.cpu_count()} cores")
    print(f"  every job had its PyTorchJob after {all_done:.1f} s; the operator created {float(created_total):.0f}")
    print(
        f"  creation -> PyTorchJob: p50 {p50:.2f} s, p95 {p95:.2f} s, max {max(latencies):.2f} s   (target p95 <= 2 s)"
    )
    print(
        f"  CPU seconds until then: operator {operator_cpu:.1f}, API server emulator + stand-in + S3 {harness_cpu:.1f}"
    )
    print(f"  operator peak RSS: {peak:.0f} MiB (idle after start-up {idle_rss:.0f} MiB)   (target <= 200 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
