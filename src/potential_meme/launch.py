"""What a trainer pod runs: torchrun around one stage, with an exit code that says whether to retry.

torchrun exits 1 whatever its workers exited with, so Kubeflow could not tell a job that cannot run
as written from a crash worth a restart. The PyTorchJob's `restartPolicy: ExitCode` restarts a pod
whose code is 128 or more and fails the stage at once on 1-127; this launcher runs torchrun's own
entry point in-process and turns the workers' codes into that contract.

A pod of one process on one node has no group to form: it runs the stage in the launcher's own
process, which saves torchrun's second interpreter (a torch import, the agent, the rendezvous) on
every start and lets SIGTERM reach the training loop directly.
"""

from __future__ import annotations

import logging
import os

EXIT_SPEC_ERROR = 2  # the job cannot run as written: a field to fix (permanent)
EXIT_STAGE_ERROR = 3  # the stage cannot run as asked: its output holds another spec's work (permanent)
EXIT_RETRYABLE = 128  # anything else: a crash, an OOM kill, a lost peer; Kubeflow restarts the pod
EXIT_PREEMPTED = 128 + 15  # stopped by SIGTERM after writing a checkpoint: a restart resumes there
PERMANENT = (EXIT_SPEC_ERROR, EXIT_STAGE_ERROR)

log = logging.getLogger(__name__)


def pod_exit_code(worker_exit_codes: list[int]) -> int:
    """A permanent failure of any worker fails the pod permanently; any other failure is worth a retry."""
    failed = [code for code in worker_exit_codes if code != 0]
    if not failed:
        return 0
    return next((code for code in PERMANENT if code in failed), EXIT_RETRYABLE)


def launch(nproc_per_node: int, command: list[str]) -> int:
    """torchrun --nproc-per-node=N --module potential_meme.cli COMMAND..., reading its PET_* environment."""
    nodes = int(os.environ.get("PET_NNODES", "1"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc_per_node == 1 and nodes == 1 and world_size == 1:
        return _run_alone(command)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [f"--nproc-per-node={nproc_per_node}", "--module", "potential_meme.cli", *command]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        code = pod_exit_code(codes)
        log.error("workers exited with %s: pod exits %d (%s)", codes, code, "retry" if code >= 128 else "permanent")
        return code
    except SignalException as exc:  # the pod is being deleted or preempted: its workers have stopped
        return 128 + int(exc.sigval)
    return 0


def _run_alone(command: list[str]) -> int:
    """The one worker of a one-process pod, in this process, with the exit codes torchrun's path gives."""
    from .cli import main

    try:
        code = main(command)
    except Exception:
        log.exception("the stage crashed: pod exits %d (retry)", EXIT_RETRYABLE)
        return EXIT_RETRYABLE
    return code if code >= EXIT_RETRYABLE else pod_exit_code([code])
