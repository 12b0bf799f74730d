"""Which precision each model runs in: the frozen teacher in bf16 where the device multiplies bf16 in hardware,
the trained student in fp32 unless bf16 autocast is asked for (or chosen on a GPU)."""

import pytest
import torch

from potential_meme.engine.loop import accumulate_gradients
from potential_meme.engine.models import load_model
from potential_meme.engine.preflight import check_distillation
from potential_meme.engine.runtime import BF16_CPU_FEATURES, Runtime, start_runtime
from potential_meme.engine.stage_setup import set_up
from potential_meme.spec import load_job
from potential_meme.spec.plan import plan_stages


@pytest.mark.parametrize(
    "precision,features,autocast,teacher",
    [
        ("auto", {"amx_bf16"}, None, torch.bfloat16),
        ("auto", {"avx512_bf16"}, None, torch.bfloat16),
        ("auto", set(), None, torch.float32),
        ("fp32", {"amx_bf16", "avx512_bf16"}, None, torch.float32),
        ("bf16", set(), torch.bfloat16, torch.bfloat16),
    ],
)
def test_a_cpu_runs_the_teacher_in_bf16_only_where_it_multiplies_bf16_in_hardware(
    monkeypatch, precision, features, autocast, teacher
):
    # the machine CI runs on may have either instruction set, or neither
    capabilities = {**torch.cpu.get_capabilities(), **{feature: feature in features for feature in BF16_CPU_FEATURES}}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runtime = start_runtime(precision)
    assert (runtime.autocast_dtype, runtime.teacher_dtype) == (autocast, teacher)


def test_a_bf16_teacher_teaches_a_student_derived_from_its_unrounded_weights(job_file, tiny_teacher_dir):
    job = load_job(job_file(student={"fromTeacher": {"numLayers": 2, "layerSelection": "even"}}))
    stage = plan_stages(job)[0]
    runtime = Runtime(0, 1, torch.device("cpu"), autocast_dtype=None, teacher_dtype=torch.bfloat16)
    setup = set_up(job, stage, runtime, 1, check_distillation(job, stage))

    assert {p.dtype for p in setup.teacher_model.parameters()} == {torch.bfloat16}
    assert setup.teacher_model.model.rotary_emb.inv_freq.dtype == torch.float32  # loaded so, not cast
    assert {p.dtype for p in setup.student.parameters()} == {torch.float32}
    original = load_model(str(tiny_teacher_dir))  # fp32, as saved
    kept = setup.facts["keptLayers"]
    for new, old in enumerate(kept):
        student_layer = setup.student.model.layers[new].mlp.down_proj.weight
        assert torch.equal(student_layer, original.model.layers[old].mlp.down_proj.weight)  # not rounded to bf16

    losses = accumulate_gradients(
        setup.model, setup.teacher, setup.teacher_weight, setup.batches.step_batches(0, runtime), runtime
    )
    assert 0 < losses["kd"] < 50 and losses["ce"] > 0
    gradients = [p.grad for p in setup.student.parameters() if p.grad is not None]
    assert gradients and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gradients)
