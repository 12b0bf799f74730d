"""training.compile: each decoder layer compiled with torch.compile trains what the eager layers train."""

import torch
from safetensors.torch import load_file

from potential_meme.engine.trainer import run_job
from potential_meme.spec import load_job
from potential_meme.spec.plan import spec_hash


def test_compiled_layers_train_the_weights_eager_ones_train(job_file, tmp_path):
    training = {"maxSteps": 3, "precision": "fp32"}
    eager_job = load_job(job_file("eager", training=training))
    compiled_job = load_job(job_file("compiled", training={**training, "compile": True}))
    assert spec_hash(compiled_job) == spec_hash(eager_job.model_copy(update={"metadata": compiled_job.metadata}))

    eager = run_job(eager_job)[-1]["metrics"]
    compiled = run_job(compiled_job)[-1]["metrics"]
    assert abs(compiled["finalLoss"] - eager["finalLoss"]) < 1e-3 * eager["finalLoss"]
    weights = [
        load_file(tmp_path / "runs" / name / "distill/student/model.safetensors") for name in ("eager", "compiled")
    ]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-3, atol=1e-4)
