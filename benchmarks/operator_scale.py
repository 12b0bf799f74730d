"""The operator under load: many DistillationJobs created at once, time from each job to its PyTorchJob.

The real operator process (kopf) runs against the test harness's emulated API server (kmock, made
stricter) with the Kubeflow stand-in acknowledging each PyTorchJob (Created; its pods never start, as
on a cluster without a free GPU for 500 jobs)
and S3 on moto's server, as in tests/e2e. Prints p50/p95/max seconds from a job's creation to its
first PyTorchJob's creation (both stamped by the API server), the operator's peak RSS (VmHWM) and
the CPU the operator and the emulated API server each used, for two submissions side by side: every
creation in flight at once (a burst the API server queues), and 8 at a time.

    python benchmarks/operator_scale.py --jobs 500 --steady-jobs 2000

Then a steady state: 2,000 unfinished jobs, the operator's CPU per resync and API requests per minute
while nothing changes (each resync reads every unfinished job's children from its watch, not a LIST).

Targets (issue 5): p95 <= 2 s, peak RSS <= 200 MB, on this 2-core machine.
"""

from __future__ import annotations

import argparse
import collections
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


def run_scenario(jobs: int, parallel: int, timeout: float, workdir: Path) -> dict:
    """A fresh API server and operator; `jobs` DistillationJobs with `parallel` creations in flight."""
    with Cluster(workdir, {}, run_pods=False) as cluster:
        operator = Operator(cluster, workdir).start()
        try:
            idle_rss = peak_rss_mib(operator.process.pid)
            documents = [distillation_job(i) for i in range(jobs)]
            started, cpu_before = time.monotonic(), (cpu_seconds(operator.process.pid), time.process_time())
            statuses = cluster.apply_all(documents, parallel=parallel)
            assert all(status in (200, 201) for status, _ in statuses), {status for status, _ in statuses}
            submitted = time.monotonic() - started
            created = cluster.emulator.created_at
            while len({key[2] for key in list(created) if key[0] == "pytorchjobs"}) < jobs:
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"timed out: not every job reached a PyTorchJob in {timeout:.0f} s")
                time.sleep(0.1)
            done = time.monotonic() - started
            operator_cpu = cpu_seconds(operator.process.pid) - cpu_before[0]
            harness_cpu = time.process_time() - cpu_before[1]
            latencies = [
                created[("pytorchjobs", "ml", f"{doc['metadata']['name']}-distill")]
                - created[("distillationjobs", "ml", doc["metadata"]["name"])]
                for doc in documents
            ]
            time.sleep(5)  # the PyTorchJobs' Running events settle: the peak covers all of it
            peak = peak_rss_mib(operator.process.pid)
            exposition = operator.metrics().splitlines()
            created_total = next(
                float(line.split()[-1])
                for line in exposition
                if line.startswith("potential_meme_operator_pytorchjobs_created_total")
            )
            api_calls = {
                line.split("{", 1)[1].split("}", 1)[0]: float(line.split()[-1])
                for line in exposition
                if line.startswith("potential_meme_operator_api_requests_total{")
            }
        finally:
            operator.stop()
    return {
        "submitted": submitted,
        "done": done,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "max": max(latencies),
        "operator_cpu": operator_cpu,
        "harness_cpu": harness_cpu,
        "peak": peak,
        "idle": idle_rss,
        "created": created_total,
        "api_calls": api_calls,
    }


def run_steady_state(jobs: int, window: float, timeout: float, workdir: Path) -> dict:
    """`jobs` unfinished jobs (each with a Created PyTorchJob whose pods wait); what the operator costs
    while nothing changes: its CPU per resync and its API requests per minute, over `window` seconds."""
    from potential_meme.operator.handlers import RESYNC_SECONDS

    with Cluster(workdir, {}, run_pods=False) as cluster:
        operator = Operator(cluster, workdir).start()
        try:
            statuses = cluster.apply_all([distillation_job(i) for i in range(jobs)], timeout=timeout, parallel=8)
            assert all(status in (200, 201) for status, _ in statuses), {status for status, _ in statuses}
            started = time.monotonic()
            while len({key[2] for key in list(cluster.emulator.created_at) if key[0] == "pytorchjobs"}) < jobs:
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"timed out: not every job reached a PyTorchJob in {timeout:.0f} s")
                time.sleep(0.5)
            time.sleep(10)  # the last events settle
            requests, cpu = cluster.emulator.operator_requests, cpu_seconds(operator.process.pid)
            calls = collections.Counter(cluster.emulator.operator_call_counts)
            time.sleep(window)
            requests = cluster.emulator.operator_requests - requests
            calls = cluster.emulator.operator_call_counts - calls
            cpu = cpu_seconds(operator.process.pid) - cpu
            peak = peak_rss_mib(operator.process.pid)
        finally:
            operator.stop()
    resyncs = window / RESYNC_SECONDS
    per_minute = {f"{verb} {resource}": count * 60 / window for (verb, _, resource), count in calls.most_common()}
    return {
        "cpu_per_resync": cpu / resyncs,
        "requests_per_minute": requests * 60 / window,
        "calls_per_minute": per_minute,
        "peak": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for every PyTorchJob")
    parser.add_argument("--workdir", type=Path, help="keep the operator's logs here (default: a temporary folder)")
    parser.add_argument(
        "--steady-jobs", type=int, default=2000, help="unfinished jobs in the steady-state run (0: skip)"
    )
    parser.add_argument("--window", type=float, default=180, help="seconds the steady state is measured over")
    args = parser.parse_args()

    s3 = start_s3()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="operator-scale-"))
    scenarios = {
        f"all {args.jobs} POSTs in flight at once": args.jobs,
        "8 in flight (a client that paces itself)": 8,
    }
    results = {}
    for name, parallel in scenarios.items():
        folder = workdir / f"parallel-{parallel}"
        folder.mkdir(parents=True, exist_ok=True)
        results[name] = run_scenario(args.jobs, parallel, args.timeout, folder)
    steady = None
    if args.steady_jobs:
        folder = workdir / "steady"
        folder.mkdir(parents=True, exist_ok=True)
        steady = run_steady_state(args.steady_jobs, args.window, max(args.timeout, 1800), folder)
    s3.stop()
    if args.workdir is None:
        shutil.rmtree(workdir)

    print(f"\n{args.jobs} DistillationJobs, creation -> PyTorchJob (stamped by the API server), {os.cpu_count()} cores")
    print(
        f"  {'submission':<44}{'submit s':>9}{'all s':>7}{'p50 s':>7}{'p95 s':>7}{'max s':>7}"
        f"{'op CPU s':>9}{'API CPU s':>10}{'op RSS MiB':>11}"
    )
    for name, row in results.items():
        assert row["created"] == args.jobs, row
        print(
            f"  {name:<44}{row['submitted']:>9.1f}{row['done']:>7.1f}{row['p50']:>7.2f}{row['p95']:>7.2f}"
            f"{row['max']:>7.2f}{row['operator_cpu']:>9.1f}{row['harness_cpu']:>10.1f}{row['peak']:>11.0f}"
        )
    for name, row in results.items():
        print(f"  {name}: operator API requests {row['api_calls']}")
    print("  targets: p95 <= 2 s, operator RSS <= 200 MB; 'API CPU' is the emulated API server, stand-in and S3,")
    print(f"  sharing the cores with the operator (operator RSS idle after start-up: {results[name]['idle']:.0f} MiB)")
    if steady is not None:
        print(
            f"\nsteady state, {args.steady_jobs} unfinished jobs, {args.window:.0f} s: operator CPU per resync "
            f"{steady['cpu_per_resync']:.2f} s, API requests {steady['requests_per_minute']:.0f}/min, "
            f"operator RSS {steady['peak']:.0f} MiB"
        )
        print("  per minute: " + ", ".join(f"{call} {count:.0f}" for call, count in steady["calls_per_minute"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
