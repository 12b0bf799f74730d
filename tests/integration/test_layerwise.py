"""LayerwiseDistiller: hidden-state pairs through hooks, projections where widths differ."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from potential_meme.distillation import LayerwiseDistiller
from potential_meme.engine import checkpoint
from potential_meme.engine.objective import HiddenStateTap
from potential_meme.engine.trainer import run_job
from potential_meme.spec import SpecError, parse_job

from helpers import save_tiny_llama


@pytest.fixture(scope="module")
def narrow_student_dir(tmp_path_factory, tiny_teacher_dir):
    """A 2-layer student half as wide as the tiny teacher, with the teacher's tokenizer."""
    root = tmp_path_factory.mktemp("narrow-student")
    save_tiny_llama(root, AutoTokenizer.from_pretrained(tiny_teacher_dir), hidden_size=32, layers=2, seed=1)
    return root


def _job(name, teacher, student, corpus, tmp_path, layerwise, steps):
    return parse_job(
        {
            "apiVersion": "distill.potential-meme.io/v1alpha1",
            "kind": "DistillationJob",
            "metadata": {"name": name},
            "spec": {
                "teacher": {"model": str(teacher)},
                "student": {"model": str(student)},
                "dataset": {"source": str(corpus), "validationFraction": 0.3},
                "method": {"layerwise": {"alpha": 0.5, **layerwise}},
                "training": {"batchSize": 4, "maxSteps": steps, "maxSeqLength": 64, "learningRate": 3e-3},
                "checkpoint": {"everySteps": 2},
                "output": {"uri": str(tmp_path / "runs")},
            },
        }
    )


def test_tap_index_0_is_the_embedding_output_and_i_the_output_of_layer_i():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    tap = HiddenStateTap(model, [0, 1, 2, 3])
    with torch.no_grad():
        reference = model(torch.randint(0, 100, (2, 7)), output_hidden_states=True).hidden_states
    states = tap.take()
    for index in (0, 1, 2):
        torch.testing.assert_close(states[index], reference[index])
    # transformers reports the last layer after the final norm; the tap keeps the layer's own output.
    torch.testing.assert_close(model.model.norm(states[3]), reference[3])
    tap.close()
    assert tap.take() == {}


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"teacher_layers": [0, 2], "student_layers": [0]}, "teacherLayers has 2 entries and studentLayers 1"),
        (
            {"teacher_layers": [0, -1], "student_layers": [0, 1]},
            "teacherLayers.1: Input should be greater than or equal to 0",
        ),
        ({"teacher_layers": [], "student_layers": []}, "teacherLayers: List should have at least 1 item"),
    ],
)
def test_pairs_are_validated_with_the_field_named(kwargs, fragment):
    with pytest.raises(SpecError, match=fragment):
        LayerwiseDistiller("teacher", 2, **kwargs)


def test_weights_must_be_one_per_pair_and_non_negative(tiny_teacher_dir, tmp_path):
    distiller = LayerwiseDistiller(str(tiny_teacher_dir), 2, [0, 4], [0, 2], output_uri=str(tmp_path))
    with pytest.raises(SpecError, match="layerLossWeights has 1 entries for 2 layer pairs"):
        distiller.distill("builtin:python-stdlib", layer_loss_weights=[1.0])
    with pytest.raises(SpecError, match=r"layerLossWeights.1: Input should be greater than or equal to 0"):
        distiller.distill("builtin:python-stdlib", layer_loss_weights=[1.0, -2.0])


def test_indices_beyond_the_models_are_refused_with_the_range(tiny_teacher_dir, corpus_dir, tmp_path):
    distiller = LayerwiseDistiller(str(tiny_teacher_dir), 2, [0, 5], [0, 2], output_uri=str(tmp_path))
    with pytest.raises(
        SpecError, match=r"spec.method.layerwise.teacherLayers: \[5\] beyond the model's 4 decoder layers"
    ):
        distiller.distill(str(corpus_dir), batch_size=4, max_steps=1, max_seq_length=64)


def test_layerwise_with_different_widths_checkpoints_projections_and_exports_a_plain_student(
    tiny_teacher_dir, narrow_student_dir, corpus_dir, tmp_path, monkeypatch
):
    saved_keys = []
    original_save = checkpoint.save

    def spy(store, step, state, training_state, keep, **sharded):
        saved_keys.append(set(state))
        original_save(store, step, state, training_state, keep, **sharded)

    monkeypatch.setattr(checkpoint, "save", spy)
    layerwise = {"teacherLayers": [0, 2, 4], "studentLayers": [0, 1, 2], "layerLossWeights": [0.5, 1.0, 1.0]}
    result = run_job(_job("lw", tiny_teacher_dir, narrow_student_dir, corpus_dir, tmp_path, layerwise, steps=6))[-1]
    result = result["metrics"]
    assert result["steps"] == 6 and result["studentPerplexityAfter"] < result["studentPerplexityBefore"]
    # 32 -> 64 projections for each pair are part of every checkpoint (resume needs them) ...
    assert saved_keys and all({"projections.0.weight", "projections.2.weight"} <= keys for keys in saved_keys)
    # ... and absent from the exported student, which stays 32 wide.
    stage = tmp_path / "runs" / "lw" / "distill"
    weights = load_file(stage / "student" / "model.safetensors")
    assert not [name for name in weights if "projection" in name]
    assert weights["model.embed_tokens.weight"].shape[1] == 32


def test_layer_loss_reaches_the_metrics_and_falls(
    tiny_teacher_dir, narrow_student_dir, corpus_dir, tmp_path, monkeypatch
):
    layerwise = {"teacherLayers": [2, 4], "studentLayers": [1, 2], "layerLoss": "cosine"}
    job = _job("lw2", tiny_teacher_dir, narrow_student_dir, corpus_dir, tmp_path, layerwise, steps=12)
    from potential_meme.metrics import trainer as metrics

    seen = []
    original = metrics.step_done

    def record(labels, step, tokens, tokens_per_second, **losses):
        seen.append(losses)
        original(labels, step, tokens, tokens_per_second, **losses)

    monkeypatch.setattr(metrics, "step_done", record)
    run_job(job)
    layer_losses = [losses["layers"] for losses in seen]
    assert all(value > 0 for value in layer_losses)
    assert sum(layer_losses[-3:]) < sum(layer_losses[:3])
    manifest = json.loads((tmp_path / "runs/lw2/distill/manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 12
