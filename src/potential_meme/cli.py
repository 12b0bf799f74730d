"""potential-meme: run | train | evaluate | render | operator | serve | crds."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path

from .launch import EXIT_PREEMPTED, EXIT_SPEC_ERROR, EXIT_STAGE_ERROR
from .spec import DistillationJob, EvaluationJob, SpecError, load_job
from .spec.errors import Preempted, StageError

DEFAULT_METRICS_PORT = 9464
EXIT_GATE_FAILED = 4  # `run`: a stage's student fell short of a quality gate, and the chain stopped there


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else os.environ.get("POTENTIAL_MEME_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Only our own progress bar: the libraries' bars for loading shards and splits are noise.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _distillation_job(path: str) -> DistillationJob:
    job = load_job(path)
    if not isinstance(job, DistillationJob):
        raise SpecError([("kind", f"got {job.kind!r}; this command runs a DistillationJob")], path)
    return job


def cmd_run(args: argparse.Namespace) -> int:
    job = _distillation_job(args.job)
    from .engine.progress import stage_summary
    from .engine.trainer import run_job
    from .spec.plan import final_artifacts

    manifests = run_job(job, metrics_port=args.metrics_port or None)
    print("\n" + stage_summary(job.metadata.name, manifests, final_artifacts(job)["student"]))
    last = manifests[-1]
    if last["metrics"].get("gatesFailed"):
        failures = last["metrics"]["gateFailures"]
        print(f"  stopped: stage {last['stage']}'s student fell short of a quality gate: {failures}")
        return EXIT_GATE_FAILED
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    job = _distillation_job(args.job)
    from .engine.trainer import find_stage, run_stage

    # In a pod, Prometheus scrapes from outside: listen on every interface.
    run_stage(job, find_stage(job, args.stage), metrics_port=args.metrics_port or None, metrics_address="0.0.0.0")
    return 0


def _finished(job: DistillationJob) -> bool:
    from .engine.finish import finished_manifest
    from .spec.plan import plan_stages

    return finished_manifest(job, plan_stages(job)[-1]) is not None


def _evaluation(
    job: DistillationJob | EvaluationJob, path: str, distillation_path: str | None, require_finished: bool = True
) -> EvaluationJob:
    """The EvaluationJob to run, from the job read from `path`: that EvaluationJob, or one of that
    DistillationJob's final student."""
    from .spec.models import EvaluationJobSpec, ObjectMeta
    from .spec.plan import resolve_evaluation

    if isinstance(job, DistillationJob):
        if distillation_path:
            raise SpecError([("--distillation-job", "JOB is a DistillationJob already; pass one or the other")], path)
        distillation = job
        evaluation = EvaluationJob(
            metadata=ObjectMeta(name=f"{job.metadata.name}-evaluation"[:63].rstrip("-")),
            spec=EvaluationJobSpec(distillation_job=job.metadata.name),
        )
    elif distillation_path:
        distillation, evaluation = _distillation_job(distillation_path), job
        wanted, given = evaluation.spec.distillation_job, distillation.metadata.name
        if wanted and wanted != given:
            raise SpecError([("spec.distillationJob", f"names {wanted!r}, but {distillation_path} is {given!r}")], path)
    else:
        return job
    if require_finished and not _finished(distillation):
        raise SpecError(
            [
                (
                    "spec.distillationJob",
                    f"{distillation.metadata.name} has not finished: run `potential-meme run` on its job file first",
                )
            ],
            path,
        )
    return resolve_evaluation(evaluation, distillation)


def cmd_evaluate(args: argparse.Namespace) -> int:
    job = _evaluation(load_job(args.job), args.job, args.distillation_job)
    from .engine.trainer import run_stage
    from .spec.plan import RESULTS, plan_stages

    # Like `train`, it is what a pod runs: metrics listen on every interface for Prometheus.
    [stage] = plan_stages(job)
    manifest = run_stage(job, stage, metrics_port=args.metrics_port or None, metrics_address="0.0.0.0")
    row = manifest["metrics"]
    if "studentPerplexity" in row:
        print(f"\n{job.metadata.name}: held-out perplexity on {job.spec.dataset.source} ({row['sequences']} sequences)")
        print(f"  {'model':<10}{'parameters':>14}{'perplexity':>14}  reference")
        for role, reference in (("student", job.spec.student), ("teacher", job.spec.teacher)):
            if f"{role}Perplexity" in row:
                print(f"  {role:<10}{row[f'{role}Parameters']:>14,}{row[f'{role}Perplexity']:>14,.3f}  {reference}")
        if "perplexityRatio" in row:
            print(
                f"  student/teacher: perplexity {row['perplexityRatio']:.3f}x, parameters {row['parameterRatio']:.3f}x"
            )
    if set(job.spec.benchmarks) - {"perplexity"} or set(job.spec.metrics) - {"accuracy"}:
        from .evaluation import EvaluationResults
        from .evaluation.report import results_table
        from .storage import open_store

        results = EvaluationResults.from_json(open_store(stage.output_uri).read_bytes(RESULTS).decode("utf-8"))
        print("\n" + "\n".join("  " + line for line in results_table(results)))
    for gate in manifest.get("gates", []):
        print(f"  quality gate {gate['gate']}: {'passed' if gate['passed'] else 'FAILED'} ({gate['message']})")
    beside = [entry["path"] for entry in manifest.get("files", []) if entry["path"] != RESULTS]
    print(f"  results: {manifest['results']}" + (f" (beside it: {', '.join(beside)})" if beside else ""))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .operator.render import Defaults, render_job, to_yaml_stream
    from .spec.memory import cache_stage_plan, fit_refusal, memory_plan

    job = load_job(args.job)
    if isinstance(job, EvaluationJob) or args.distillation_job:
        # What the operator renders once the DistillationJob has succeeded; here it need not have run.
        job = _evaluation(job, args.job, args.distillation_job, require_finished=False)
    if args.namespace:
        job.metadata.namespace = args.namespace
    defaults = Defaults(**{key: value for key, value in (("trainer_image", args.image),) if value})
    refusal = fit_refusal(job)
    if refusal is not None:
        print(f"{job.metadata.name}: not rendered, the operator would refuse it: {refusal}", file=sys.stderr)
        return 2
    if isinstance(job, DistillationJob) and (teacher_pass := cache_stage_plan(job)) is not None:
        print(
            f"{job.metadata.name}: memory estimate of the cache-teacher stage {teacher_pass.describe()}",
            file=sys.stderr,
        )
    plan = memory_plan(job) if isinstance(job, DistillationJob) else None
    if plan is not None:
        print(f"{job.metadata.name}: memory estimate {plan.describe()}", file=sys.stderr)
    sys.stdout.write(to_yaml_stream(render_job(job, defaults)))
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from .operator import handlers  # noqa: F401 - registers the handlers with kopf

    if args.metrics_port:
        os.environ["POTENTIAL_MEME_OPERATOR_METRICS_PORT"] = str(args.metrics_port)
    if not args.verbose:
        # A line per handler call ("Handler 'job_event' succeeded") buries the operator's own lines.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        memo=kopf.Memo(namespaces=tuple(args.namespace or ())),
        standalone=not args.peering,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
    )
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from .spec.crd import write_crds

    for path in write_crds(args.output_dir):
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import serve

    serve(args.model, args.host, args.port, args.batch_size, args.max_tokens, args.name)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    work = args.work[1:] if args.work[:1] == ["--"] else args.work
    if not work or work[0] not in ("train", "evaluate"):
        raise SpecError([("launch", "give the command to run: launch [--nproc-per-node N] -- train|evaluate ...")])
    return launch(args.nproc_per_node, work)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potential-meme", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage of a job in this process")
    run.add_argument("job", help="job file (YAML)")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"serve Prometheus metrics on 127.0.0.1:PORT (default {DEFAULT_METRICS_PORT}; 0: off)",
    )
    run.set_defaults(handler=cmd_run)

    train = commands.add_parser("train", help="run one stage (what a trainer pod runs, under torchrun)")
    train.add_argument("--job", required=True, help="job file (YAML)")
    train.add_argument("--stage", required=True, help="stage name from the job's plan")
    train.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on PORT (0: off)")
    train.set_defaults(handler=cmd_train)

    launch = commands.add_parser(
        "launch",
        help="torchrun around train or evaluate, exiting 2/3 when a retry cannot help and 128 when it may "
        "(what a trainer pod runs)",
    )
    launch.add_argument("--nproc-per-node", type=int, default=1, help="processes in this pod (one per GPU)")
    launch.add_argument("work", nargs=argparse.REMAINDER, help="the train or evaluate command and its arguments")
    launch.set_defaults(handler=cmd_launch)

    evaluate = commands.add_parser(
        "evaluate",
        help="a student and its teacher on perplexity, MMLU, HumanEval, MT-Bench, latency and memory, with quality "
        "gates (what an EvaluationJob's pod runs)",
    )
    evaluate.add_argument("job", help="an EvaluationJob file, or a DistillationJob file to evaluate its final student")
    evaluate.add_argument(
        "--distillation-job", help="the DistillationJob file that the EvaluationJob's spec.distillationJob names"
    )
    evaluate.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on PORT (0: off)")
    evaluate.set_defaults(handler=cmd_evaluate)

    render = commands.add_parser("render", help="print every object the operator would create for a job (YAML stream)")
    render.add_argument("job", help="job file (YAML)")
    render.add_argument("--namespace", help="namespace of the objects (default: the job's, if any)")
    render.add_argument("--image", help="trainer image when the job names none (default: the operator's)")
    render.add_argument(
        "--distillation-job", help="for an EvaluationJob: the DistillationJob file its spec.distillationJob names"
    )
    render.set_defaults(handler=cmd_render)

    operator = commands.add_parser("operator", help="reconcile DistillationJobs into PyTorchJobs (kopf)")
    operator.add_argument("--namespace", action="append", help="watch only this namespace (repeatable; default: all)")
    operator.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0: off)")
    operator.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf's liveness endpoint")
    operator.add_argument("--peering", help="kopf peering name, for more than one replica")
    operator.add_argument(
        "--priority",
        type=int,
        default=random.randint(1, 2**31 - 1),
        help="peering priority: the live replica with the highest works, the others stand by; replicas need "
        "distinct ones (default: random)",
    )
    operator.set_defaults(handler=cmd_operator)

    serve = commands.add_parser(
        "serve", help="serve a model as an OpenAI-compatible chat completions endpoint (/v1/chat/completions)"
    )
    serve.add_argument("model", help="any model reference the engine loads (hub id, folder, GGUF, package:, s3://)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    serve.add_argument("--batch-size", type=int, default=8, help="requests answered together at most (default 8)")
    serve.add_argument("--max-tokens", type=int, default=1024, help="the most tokens a request may ask for")
    serve.add_argument("--name", help="the model's name in responses and /v1/models (default: MODEL)")
    serve.set_defaults(handler=cmd_serve)

    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions generated from the spec models")
    crds.add_argument("--output-dir", default="crds", type=Path)
    crds.set_defaults(handler=cmd_crds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STAGE_ERROR
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
