"""ProgressiveDistiller: prune-then-distill chains, one resumable stage per size."""

import json
import signal
import time

import pytest
import torch
import yaml

from potential_meme.distillation import ProgressiveDistiller
from potential_meme.engine.data import load_documents, pack
from potential_meme.engine.loop import EarlyStopping
from potential_meme.engine.models import keep_layers, load_model, load_tokenizer, parameter_count
from potential_meme.engine.pruning import choose_layers, layer_influence, prune_to, pruned_size
from potential_meme.engine.sharding import shape_of
from potential_meme.spec import SpecError, parse_job, plan_stages
from potential_meme.spec.models import DatasetSpec, format_parameter_count, parse_parameter_count

from helpers import cli, start_cli


def test_sizes_parse_from_every_accepted_form():
    assert [parse_parameter_count(v) for v in ("30B", "13b", "60M", "1.5B", 7e9, 125_000_000, "2k")] == [
        30_000_000_000,
        13_000_000_000,
        60_000_000,
        1_500_000_000,
        7_000_000_000,
        125_000_000,
        2000,
    ]
    assert [format_parameter_count(v) for v in (13_000_000_000, 1_500_000_000, 100_000_000, 150_000)] == [
        "13b",
        "1p5b",
        "100m",
        "150k",
    ]


@pytest.mark.parametrize(
    "sizes,final,fragment",
    [
        (["13B", "30B"], "7B", "sizes must strictly decrease, got 13b then 30b"),
        (["13B"], "13B", "got 13b then 13b"),
        (["big"], "7B", "'big' is not a parameter count; write e.g. 7e9, '13B'"),
        ([], -5, "finalSize: Input should be greater than 0"),
    ],
)
def test_bad_sizes_are_refused_before_anything_loads(sizes, final, fragment):
    with pytest.raises(SpecError, match=fragment):
        ProgressiveDistiller("teacher", sizes, final)


def _document(tiny_teacher_dir, corpus_dir, tmp_path, **training):
    return {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "prog"},
        "spec": {
            "teacher": {"model": str(tiny_teacher_dir)},
            "dataset": {"source": str(corpus_dir), "validationFraction": 0.3, "maxValidationSequences": 8},
            "method": {"progressive": {"intermediateSizes": [150_000], "finalSize": "100k", "chunkSize": 64}},
            "training": {
                "batchSize": 4,
                "maxSteps": 6,
                "maxSeqLength": 64,
                "learningRate": 1e-3,
                "evalEverySteps": 2,
                "earlyStoppingPatience": 2,
                "logEverySteps": 1,
                **training,
            },
            "checkpoint": {"everySteps": 2},
            "output": {"uri": str(tmp_path / "runs")},
        },
    }


def test_plan_has_one_stage_per_size_each_reading_the_one_before(tiny_teacher_dir, corpus_dir, tmp_path):
    stages = plan_stages(parse_job(_document(tiny_teacher_dir, corpus_dir, tmp_path)))
    assert [(s.name, s.kind, s.target_parameters, s.inputs) for s in stages] == [
        ("distill-150k", "progressive", 150_000, ()),
        ("distill-100k", "progressive", 100_000, ("distill-150k",)),
    ]
    assert stages[1].output_uri.endswith("/prog/distill-100k/")
    document = _document(tiny_teacher_dir, corpus_dir, tmp_path)
    document["spec"]["student"] = {"fromTeacher": {"numLayers": 2}}
    with pytest.raises(SpecError, match="leave it out for progressive"):
        parse_job(document)


@pytest.fixture(scope="module")
def calibration(tiny_teacher_dir, corpus_dir):
    train, _ = load_documents(DatasetSpec(source=str(corpus_dir), validation_fraction=0.3))
    return pack(train, load_tokenizer(str(tiny_teacher_dir)), 64)[:8]


def test_pruning_drops_the_layer_that_changes_least_then_narrows_the_mlp(tiny_teacher_dir, calibration):
    teacher = load_model(str(tiny_teacher_dir))
    with torch.no_grad():  # make layer 1 a no-op: its output is its input
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    influence = layer_influence(teacher, calibration)
    assert influence[1] == pytest.approx(0.0, abs=1e-6) and min(influence[0], influence[2], influence[3]) > 1e-3

    total = parameter_count(teacher)
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    target = total - per_layer - 10_000  # one layer is not enough: then MLP channels go
    student, report = prune_to(teacher, target, calibration)
    assert report.layers.kept == [0, 2, 3] and report.layers.dropped[0][0] == 1
    assert target - 3 * 64 * 3 < parameter_count(student) <= target  # within one channel of every layer
    assert student.config.intermediate_size < teacher.config.intermediate_size == report.intermediate_size_before
    with torch.no_grad():  # the pruned model is still a working language model
        assert torch.isfinite(student(calibration[:2]).logits).all()
    with pytest.raises(ValueError, match="not below the model's"):
        prune_to(teacher, total, calibration)
    with pytest.raises(ValueError, match="below the smallest prunable model"):
        prune_to(teacher, 1000, calibration)


def test_the_pruned_shape_follows_from_the_config_before_any_weight_is_read(tiny_teacher_dir, calibration):
    teacher = load_model(str(tiny_teacher_dir))
    shape = shape_of(teacher.config)
    counts = (shape.parameters, shape.layer_parameters, shape.num_layers, shape.hidden_size, shape.intermediate_size)
    assert counts[:2] == (parameter_count(teacher), sum(p.numel() for p in teacher.model.layers[0].parameters()))
    per_layer = shape.layer_parameters
    for target in (shape.parameters - 1, shape.parameters - per_layer, shape.parameters - per_layer - 10_000, 100_000):
        student, report = prune_to(teacher, target, calibration)
        assert pruned_size(*counts, target) == (student.config.num_hidden_layers, student.config.intermediate_size)
        assert report.parameters_after <= target


def test_a_derived_student_keeps_the_layers_that_matter_or_evenly_spaced_ones(tiny_teacher_dir, calibration):
    teacher = load_model(str(tiny_teacher_dir))
    with torch.no_grad():  # layer 2 becomes a no-op: the first to go
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    chosen = choose_layers(teacher, 2, "importance", calibration)
    assert len(chosen.kept) == 2 and 2 not in chosen.kept
    assert chosen.dropped[0] == (2, pytest.approx(0.0, abs=1e-6))
    assert [layer for layer, _ in chosen.dropped] + chosen.kept != [0, 1, 2, 3]  # measured, not positional
    assert all(torch.equal(value, before[name]) for name, value in teacher.state_dict().items())  # teacher intact
    assert choose_layers(teacher, 2, "even", calibration).kept == [0, 3]
    # Each drop is measured on the teacher seen without the layers gone before, not on a copy: the same numbers.
    copy = keep_layers(teacher, [layer for layer in range(4) if layer != chosen.dropped[0][0]])
    assert chosen.dropped[1][1] == pytest.approx(min(layer_influence(copy, calibration)), rel=1e-5)
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 4  # and left whole
    with pytest.raises(ValueError, match="choose 1 to 4"):
        choose_layers(teacher, 5, "importance", calibration)


def test_early_stopping_keeps_the_best_and_counts_misses():
    model = torch.nn.Linear(2, 2)
    early = EarlyStopping(patience=2)
    assert not early.observe(0, 10.0, model)
    best_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    assert not early.observe(2, 11.0, model)
    assert early.observe(4, 12.0, model)  # second miss: stop
    assert early.best_step == 0 and torch.equal(early.best_state["weight"], best_weight)


def test_two_stage_chain_runs_and_each_stage_learns_from_the_one_before(tiny_teacher_dir, corpus_dir, tmp_path):
    distiller = ProgressiveDistiller(
        str(tiny_teacher_dir), [150_000], "100k", output_uri=str(tmp_path / "runs"), job_name="chain"
    )
    results = distiller.distill_progressively(
        str(corpus_dir),
        steps_per_stage=6,
        patience=3,
        batch_size=4,
        max_seq_length=64,
        learning_rate=1e-3,
        eval_every_steps=2,
    )
    first, second = results
    assert first["studentParameters"] <= 150_000 < first["teacherParameters"]
    assert second["teacherParameters"] == first["studentParameters"]  # stage 2's teacher is stage 1's student
    assert second["studentParameters"] <= 100_000
    assert second["keptLayers"] and second["layersBefore"] == 4
    for metrics in results:
        assert metrics["studentPerplexityAfter"] <= metrics["studentPerplexityBefore"]  # best kept, start included
        assert {"stoppedEarly", "bestStep", "steps"} <= set(metrics)
    saved = load_model(distiller.save_student(tmp_path / "final"))
    assert parameter_count(saved) == second["studentParameters"]


def test_divergent_training_stops_early_and_keeps_the_pruned_start(tiny_teacher_dir, corpus_dir, tmp_path):
    from potential_meme.engine.trainer import run_job

    document = _document(
        tiny_teacher_dir,
        corpus_dir,
        tmp_path,
        learningRate=5.0,
        warmupRatio=0,
        maxSteps=20,
        evalEverySteps=1,
        earlyStoppingPatience=2,
    )
    first = run_job(parse_job(document))[0]["metrics"]
    assert first["stoppedEarly"] and first["steps"] < 20
    assert first["bestStep"] == 0
    assert first["studentPerplexityAfter"] == pytest.approx(first["studentPerplexityBefore"], rel=1e-4)


def test_a_killed_chain_keeps_finished_stages_and_continues_with_the_next(tiny_teacher_dir, corpus_dir, tmp_path):
    import yaml

    document = _document(
        tiny_teacher_dir,
        corpus_dir,
        tmp_path,
        maxSteps=80,
        evalEverySteps=20,
        earlyStoppingPatience=None,
    )
    path = tmp_path / "prog.yaml"
    path.write_text(yaml.safe_dump(document))
    command = ("run", str(path), "--metrics-port", "0")
    runs = tmp_path / "runs" / "prog"
    process = start_cli(*command)
    deadline = time.monotonic() + 300
    while not list((runs / "distill-100k").glob("checkpoints/step-*/COMPLETE")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_manifest = (runs / "distill-150k" / "manifest.json").read_text()
    assert not (runs / "distill-100k" / "manifest.json").exists()

    rerun = cli(*command, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage distill-150k of prog is done (manifest.json exists): skipped" in rerun.stderr
    assert "resuming prog/distill-100k from checkpoint" in rerun.stderr
    assert (runs / "distill-150k" / "manifest.json").read_text() == first_manifest
    assert json.loads((runs / "distill-100k" / "manifest.json").read_text())["metrics"]["steps"] == 80


def test_each_stage_runs_alone_once_the_one_before_is_done(tiny_teacher_dir, corpus_dir, tmp_path):
    import yaml

    path = tmp_path / "prog.yaml"
    path.write_text(yaml.safe_dump(_document(tiny_teacher_dir, corpus_dir, tmp_path, maxSteps=2)))

    def train(stage):
        return cli("train", "--job", str(path), "--stage", stage)

    early = train("distill-100k")
    assert early.returncode == 3 and "Traceback" not in early.stderr
    assert "distill-150k, which has not finished" in early.stderr
    assert train("distill-150k").returncode == 0
    assert train("distill-100k").returncode == 0
    assert (tmp_path / "runs" / "prog" / "distill-100k" / "manifest.json").exists()


def test_a_chain_stops_at_the_first_stage_that_falls_short_of_its_gates(tiny_teacher_dir, corpus_dir, tmp_path):
    document = _document(tiny_teacher_dir, corpus_dir, tmp_path, maxSteps=2)
    # A pruned student two steps in does not halve its teacher's perplexity.
    document["spec"]["gates"] = [
        {"metric": "parameters.count", "atMost": 1_000_000},
        {"metric": "perplexity.perplexity", "atMost": 0.5, "relativeToTeacher": True},
    ]
    document["spec"]["gatedStages"] = "every"
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(document))
    result = cli("run", str(path), "--metrics-port", "0")
    assert result.returncode == 4, result.stderr
    assert "stopped: stage distill-150k's student fell short of a quality gate: perplexity.perplexity" in result.stdout
    runs = tmp_path / "runs" / "prog"
    manifest = json.loads((runs / "distill-150k" / "manifest.json").read_text())
    assert [g["passed"] for g in manifest["gates"]] == [True, False]
    assert manifest["metrics"]["gatesFailed"] == 1 and manifest["gates"][1]["required"] == pytest.approx(
        0.5 * manifest["metrics"]["teacherPerplexity"]
    )
    assert not (runs / "distill-100k").exists()  # the chain went no further

    # Gates only on the final stage: the first stage is not held to them, the chain runs to its end.
    document["spec"]["gatedStages"] = "final"
    document["metadata"]["name"] = "final-gated"
    document["spec"]["gates"] = [{"metric": "parameters.count", "atMost": 100_000}]
    path.write_text(yaml.safe_dump(document))
    result = cli("run", str(path), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    final = json.loads((tmp_path / "runs" / "final-gated" / "distill-100k" / "manifest.json").read_text())
    first = json.loads((tmp_path / "runs" / "final-gated" / "distill-150k" / "manifest.json").read_text())
    assert "gates" not in first and final["metrics"]["gatesPassed"] == 1
