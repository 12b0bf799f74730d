"""The library face: KnowledgeDistiller builds the same spec and runs the same engine."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from potential_meme.distillation import KnowledgeDistiller
from potential_meme.spec import SpecError

from helpers import free_port


def metric_samples(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_knowledge_distiller_distills_saves_and_serves_metrics(tiny_teacher_dir, corpus_dir, tmp_path):
    distiller = KnowledgeDistiller(
        teacher_model=str(tiny_teacher_dir),
        student_model=2,
        temperature=2.0,
        alpha=0.5,
        output_uri=str(tmp_path / "runs"),
        job_name="lib",
    )
    port = free_port()
    result = distiller.distill(
        dataset=str(corpus_dir),
        batch_size=4,
        epochs=1,
        learning_rate=1e-3,
        max_steps=5,
        max_seq_length=64,
        metrics_port=port,
    )
    assert result["steps"] == 5
    assert result["studentPerplexityAfter"] < result["studentPerplexityBefore"]
    assert distiller.job.spec.method.knowledge.temperature == 2.0

    saved = distiller.save_student(tmp_path / "student")
    assert AutoModelForCausalLM.from_pretrained(saved).config.num_hidden_layers == 2

    samples = metric_samples(port)
    labels = (("job", "lib"), ("stage", "distill"))
    assert samples[("potential_meme_trainer_steps_total", labels)] == 5
    assert samples[("potential_meme_trainer_tokens_total", labels)] == 5 * 4 * 64
    assert samples[("potential_meme_trainer_step", labels)] == 5
    assert samples[("potential_meme_trainer_checkpoint_writes_total", labels)] == 0  # everySteps defaults to 100
    assert samples[("potential_meme_trainer_tokens_per_second", labels)] > 0
    assert samples[("potential_meme_trainer_loss", (("component", "total"), *labels))] > 0
    assert samples[("potential_meme_trainer_stage_index", (("job", "lib"),))] == 0
    after = samples[
        (
            "potential_meme_trainer_validation_perplexity",
            (("dataset", "held-out"), ("job", "lib"), ("model", "student"), ("stage", "distill"), ("when", "after")),
        )
    ]
    assert after == pytest.approx(result["studentPerplexityAfter"])


def test_default_job_name_follows_the_spec(tiny_teacher_dir, corpus_dir, tmp_path):
    def run(steps):
        distiller = KnowledgeDistiller(str(tiny_teacher_dir), 2, output_uri=str(tmp_path / "runs"))
        distiller.distill(str(corpus_dir), batch_size=4, max_steps=steps, max_seq_length=64)
        return distiller.job.metadata.name

    first = run(1)
    assert run(1) == first  # same spec: the finished stage is found again
    assert run(2) != first  # changed spec: a new run, not a conflict


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"alpha": 2.0}, "alpha: Input should be less than or equal to 1"),
        ({"temperature": 0}, "temperature: Input should be greater than 0"),
        ({"divergence": "kl"}, "divergence: Input should be 'forwardKL', 'reverseKL' or 'jsd'"),
    ],
)
def test_bad_arguments_raise_a_value_error_before_anything_loads(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment) as caught:
        KnowledgeDistiller("./nowhere", 2, **kwargs)
    assert isinstance(caught.value, SpecError)


def test_bad_distill_arguments_name_the_field(tiny_teacher_dir, tmp_path):
    distiller = KnowledgeDistiller(str(tiny_teacher_dir), 2, output_uri=str(tmp_path))
    with pytest.raises(SpecError, match="spec.training.batchSize: Input should be greater than or equal to 1"):
        distiller.distill("builtin:python-stdlib", batch_size=0)
    with pytest.raises(SpecError, match="spec.training.warmupSteps: unknown field"):
        distiller.distill("builtin:python-stdlib", warmup_steps=3)


@pytest.mark.parametrize("verbose", [True, False])
def test_a_script_sees_progress_and_the_summary_without_configuring_logging(
    tiny_teacher_dir, corpus_dir, tmp_path, verbose
):
    import subprocess
    import sys

    from helpers import cli_env

    script = f"""
from potential_meme.distillation import KnowledgeDistiller
KnowledgeDistiller({str(tiny_teacher_dir)!r}, 2, output_uri={str(tmp_path)!r}, verbose={verbose}).distill(
    {str(corpus_dir)!r}, batch_size=4, max_steps=4, max_seq_length=64, log_every_steps=2)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    if verbose:
        assert "validation perplexity: teacher" in run.stderr and "step 2/4 loss" in run.stderr
        assert "step 4/4 loss" in run.stderr and "Traceback" not in run.stderr
        assert "1 stage(s) done; held-out perplexity, teacher" in run.stdout and "student: " in run.stdout
    else:
        assert "step" not in run.stderr and run.stdout == ""
