"""How much of this machine's dense matmul rate the student's forward + backward reaches during KD training.

A KD job on the real teacher (its layers halved for the student) trains a few steps; its step time
once warm (the difference of a run of 2 steps and one of 2 + --steps steps, in fresh folders), less
the time the teacher's forward takes on the same batch, is the student's forward + backward (its
lm-head and the chunked loss included). Its FLOPs are those of its matrix products: 2 per
multiply-add of every linear layer and of the lm-head, forward, and twice that backward (the input's
gradient and the weight's). The machine's rate is torch.mm timed at exactly those products' shapes
(forward, and both backward ones), weighed by their FLOPs. Attention's own products (about 4 % of
the FLOPs at 256 tokens, causal) and every elementwise operation count as time, not as FLOPs.

    python benchmarks/compute_efficiency.py [--steps 8] [--precision fp32 bf16] [--compile]

--compile adds rows with `training.compile` (decoder layers and the closed-form loss compiled), after an
untimed step that fills inductor's cache, so that both timed runs load the same kernels.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.nn import Linear

from potential_meme.engine.models import load_model, resolve
from potential_meme.engine.objective import decoder, hidden_states
from potential_meme.engine.trainer import run_job

from common import arguments, job

LAYERS = 15
WARM_UP_STEPS = 2  # the first steps allocate the optimizer's state and the allocator's pools


def linear_shapes(model: torch.nn.Module, layers: int, tokens: int, chunk: int) -> list[tuple[int, int, int]]:
    """(rows, inner, columns) of each forward matrix product of one micro-batch of a student with `layers` of
    `model`'s decoder layers (all alike): every linear layer over all tokens, and the lm-head over each chunk."""
    layer = [
        (tokens, m.in_features, m.out_features) for m in decoder(model).layers[0].modules() if isinstance(m, Linear)
    ]
    head = model.get_output_embeddings().weight
    return layer * layers + [(chunk, head.shape[1], head.shape[0])] * (tokens // chunk)


def fastest_seconds(work, repeats: int = 5) -> float:
    """The shortest of `repeats` timings of `work` after one untimed call: the machine's rate, not its noise."""
    work()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings)


def matmul_seconds(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return fastest_seconds(lambda: torch.mm(a, b))


def dense_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, backward: bool) -> tuple[float, float]:
    """(FLOPs, seconds) of `shapes` as plain torch.mm at `dtype`: forward, and with `backward` both backward
    products too (grad input [m, n] x [n, k]; grad weight [k, m] x [m, n]). Equal shapes are timed once."""
    flops = seconds = 0.0
    timed: dict[tuple[int, int, int], float] = {}
    for m, k, n in shapes:
        products = [(m, k, n), (m, n, k), (k, m, n)] if backward else [(m, k, n)]
        for shape in products:
            if shape not in timed:
                timed[shape] = matmul_seconds(*shape, dtype)
            flops += 2 * m * k * n
            seconds += timed[shape]
    return flops, seconds


def teacher_forward_seconds(teacher: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype | None) -> float:
    """The teacher's share of a step: its decoder over the batch and its lm-head over every token."""
    weight = teacher.get_output_embeddings().weight
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

    def once() -> None:
        with torch.inference_mode(), autocast:
            hidden = hidden_states(teacher, batch)
            for chunk in hidden.reshape(-1, hidden.shape[-1]).split(256):
                chunk @ weight.T

    return fastest_seconds(once)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], steps=8)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also with training.compile")
    args = parser.parse_args()
    args.other_text, args.validation_sequences = [], 4
    reference = resolve(args.teacher)
    tokens = args.batch_size * args.seq_length
    batch = torch.randint(0, 49_152, (args.batch_size, args.seq_length))
    rows = []
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else None
        teacher = load_model(reference, dtype=dtype or torch.float32).eval().requires_grad_(False)
        for compiled in [False, True] if args.compile else [False]:
            if compiled:  # as the job compiles it: its share of a step is timed as the job runs it (eager first)
                for layer in decoder(teacher).layers:
                    layer.compile()
            seconds = {}
            for steps in ([1] if compiled else []) + [WARM_UP_STEPS, WARM_UP_STEPS + args.steps]:
                with tempfile.TemporaryDirectory() as output:
                    planned = job(
                        f"efficiency-{precision}",
                        {"knowledge": {}},
                        argparse.Namespace(**{**vars(args), "steps": steps, "output": output}),
                        {"fromTeacher": {"numLayers": LAYERS, "layerSelection": "even"}},
                        precision=precision,
                        compile=compiled,
                    )
                    seconds[steps] = run_job(planned)[-1]["metrics"]["trainSeconds"]
            chunk = planned.spec.method.knowledge.chunk_size
            step = (seconds[WARM_UP_STEPS + args.steps] - seconds[WARM_UP_STEPS]) / args.steps
            teacher_seconds = teacher_forward_seconds(teacher, batch, dtype)
            student_flops, student_dense = dense_rate(
                linear_shapes(teacher, LAYERS, tokens, chunk), dtype or torch.float32, True
            )
            rate = student_flops / (step - teacher_seconds)
            label = f"{precision}{' compiled' if compiled else ''}"
            rows.append((label, step, teacher_seconds, student_flops, rate, student_flops / student_dense))
    print(
        f"\nstudent {LAYERS} layers; {args.batch_size} x {args.seq_length} tokens a step; "
        f"mean of {args.steps} steps after {WARM_UP_STEPS}"
    )
    print(
        f"{'precision':15}{'step s':>8}{'teacher s':>10}{'student GFLOP':>15}"
        f"{'GFLOP/s':>9}{'dense GFLOP/s':>15}{'share':>7}"
    )
    for precision, step, teacher_seconds, flops, rate, dense in rows:
        print(
            f"{precision:15}{step:>8.2f}{teacher_seconds:>10.2f}{flops / 1e9:>15.1f}"
            f"{rate / 1e9:>9.1f}{dense / 1e9:>15.1f}{rate / dense:>7.1%}"
        )


if __name__ == "__main__":
    main()
