"""Per-process memory of DDP and FSDP for the same job at 2 and 4 processes (gloo on the CPU here).

Each run is the same KD job on the real teacher (its layers halved for the student), a few steps under
torchrun; its manifest records what rank 0 held after its first optimizer step (parameters, gradients
and optimizer state of student and teacher: its shards only, under FSDP) and each process's peak memory
(the peak resident set on the CPU). Under FSDP rank 0 alone reads the teacher and derives the student,
so its peak counts whole models; the other processes' peaks count their shards.

    python benchmarks/fsdp_memory.py [--processes 2 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import arguments, job, student_arguments

MIB = 2**20


def _run(name: str, strategy: str, processes: int, args: argparse.Namespace, output: Path) -> dict:
    """Train the job under torchrun and return its manifest's metrics (skipped when already done)."""
    planned = job(
        name,
        {"knowledge": {}},
        args,
        {"fromTeacher": {"numLayers": args.layers}},
        strategy=strategy,
        batchSize=1,
        gradientAccumulationSteps=4 // processes,
    )
    manifest = output / planned.metadata.name / "distill" / "manifest.json"
    if not manifest.exists():
        document = planned.model_dump(by_alias=True, exclude_none=True, mode="json")
        document["spec"]["output"]["uri"] = str(output)
        document["spec"]["resources"] = {"gpusPerNode": processes}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
            yaml.safe_dump(document, file)
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--standalone"]
            + ["-m", "potential_meme.cli", "train", "--job", file.name, "--stage", "distill"],
            check=True,
        )
    return json.loads(manifest.read_text())["metrics"]


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=2)
    student_arguments(parser)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    output = Path(args.output).resolve()
    rows = {}
    for processes in args.processes:
        for strategy in ("ddp", "fsdp"):
            rows[(strategy, processes)] = _run(f"memory-{strategy}-{processes}", strategy, processes, args, output)
    print(f"\nper process; student = {args.layers} layers of the teacher; {args.steps} steps")
    header = f"{'strategy':10}{'processes':>10}{'held MiB':>12}{'x ddp':>8}"
    print(header + f"{'rank 0 peak MiB':>17}{'x ddp':>8}{'others peak MiB':>17}{'x ddp':>8}")
    for (strategy, processes), metrics in rows.items():
        whole = rows[("ddp", processes)]
        held = metrics["heldBytesPerProcess"]
        peaks = [_peaks(metrics), _peaks(whole)]
        print(
            f"{strategy:10}{processes:>10}{held / MIB:>12,.1f}{held / whole['heldBytesPerProcess']:>8.2f}"
            f"{peaks[0][0] / MIB:>17,.1f}{peaks[0][0] / peaks[1][0]:>8.2f}"
            f"{peaks[0][1] / MIB:>17,.1f}{peaks[0][1] / peaks[1][1]:>8.2f}"
        )


def _peaks(metrics: dict) -> tuple[int, int]:
    """(rank 0's peak, the largest of the other processes' peaks)."""
    by_rank = metrics["peakMemoryBytesByRank"]
    return by_rank[0], max(by_rank[1:])


if __name__ == "__main__":
    main()
