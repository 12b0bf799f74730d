"""DistillationEvaluator end to end on tiny models: MMLU (both formulations, from a folder and from S3),
HumanEval through the sandbox, latency and memory, results JSON, the PNG and the PDF."""

import boto3
import pytest
import torch
from PIL import Image
from pypdf import PdfReader

from potential_meme.engine.models import load_model, load_tokenizer
from potential_meme.evaluation import DistillationEvaluator, EvaluationResults
from potential_meme.evaluation.mmlu import MMLUDataError, load_subjects, run_mmlu
from potential_meme.spec import SpecError

from helpers import SHARED, save_tiny_llama

MMLU = SHARED / "evaldata" / "mmlu"
SUBJECTS = ["virology", "high_school_mathematics"]


@pytest.fixture(scope="module")
def tiny_student_dir(tiny_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-student")
    save_tiny_llama(root, load_tokenizer(str(tiny_teacher_dir)), hidden_size=32, layers=2, seed=1)
    return root


def test_teacher_and_student_on_every_benchmark_then_plot_and_report(tiny_teacher_dir, tiny_student_dir, tmp_path):
    evaluator = DistillationEvaluator(
        limit=3, mmlu_source=str(MMLU), mmlu_subjects=SUBJECTS, max_new_tokens=24, latency_runs=2, latency_tokens=6
    )
    results = evaluator.evaluate(
        str(tiny_teacher_dir), str(tiny_student_dir), evaluation_datasets=["mmlu", "humaneval"]
    )
    student, teacher = results.models["student"], results.models["teacher"]
    assert student.parameters < teacher.parameters
    for measured in (student, teacher):
        for formulation in ("letter", "cloze"):
            accuracy = measured.benchmarks[f"mmlu_{formulation}"]["accuracy"]
            assert accuracy.n == 6 and 0 <= accuracy.low <= accuracy.value <= accuracy.high <= 1
            assert sorted(measured.details[f"mmlu_{formulation}"]) == sorted(SUBJECTS)
        assert measured.benchmarks["humaneval"]["pass@1"].n == 3
        assert [s["task_id"] for s in measured.samples["humaneval"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
        latency = measured.benchmarks["latency"]
        assert 0 < latency["per_token_p50_ms"].value <= latency["per_token_p95_ms"].value
        assert latency["per_token_p50_ms"].n == 2 * 5  # 2 runs of 6 tokens: 5 decoding steps each
        memory = measured.benchmarks["memory"]
        assert memory["parameter_bytes"].value == measured.parameters * 4  # float32
        assert memory["peak_rss_bytes"].value > memory["parameter_bytes"].value
    assert results.setup["settings"]["limit"] == 3 and results.setup["versions"]["lm-eval"]

    saved = EvaluationResults.load(results.save(tmp_path / "results.json"))
    assert saved == results
    png = evaluator.visualize_comparison(saved, output_file=str(tmp_path / "comparison.png"))
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 400
    pdf = evaluator.generate_report(saved, output_file=str(tmp_path / "report.pdf"))
    pages = [page.extract_text() for page in PdfReader(pdf).pages]
    assert len(pages) == 5
    assert "setup" in pages[0] and str(tiny_student_dir) in pages[0] and "180,800 parameters" in pages[0]
    assert "MMLU, cloze" in pages[1] and "pass@1" in pages[1] and "per_token_p50_ms" in pages[1]
    assert "student as a share of the teacher" in pages[2]
    assert "MMLU by subject" in pages[3] and "virology" in pages[3]
    assert "HumanEval/0" in pages[4] and "teacher" in pages[4]


def _cloze_by_hand(model, tokenizer, subject_rows, topic):
    """Zero-shot cloze accuracy computed directly: the choice whose text the model finds likeliest."""
    correct = 0
    for doc in subject_rows:
        context = (
            f"The following are questions (with answers) about {topic}.\n\nQuestion: {doc['question'].strip()}\nAnswer:"
        )
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(context + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logits[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole))))
        correct += max(range(4), key=scores.__getitem__) == doc["answer"]
    return correct / len(subject_rows)


def test_cloze_accuracy_is_the_likeliest_answer_text(tiny_teacher_dir):
    model, tokenizer = load_model(str(tiny_teacher_dir)).eval(), load_tokenizer(str(tiny_teacher_dir))
    rows = load_subjects(str(MMLU), ["virology"])["virology"]["test"][:8]
    _, subjects = run_mmlu(model, tokenizer, str(MMLU), "cloze", ["virology"], limit=8, num_fewshot=0)
    assert subjects["virology"].value == pytest.approx(_cloze_by_hand(model, tokenizer, rows, "virology"))


def test_mmlu_reads_the_same_data_from_s3(s3_endpoint, tiny_teacher_dir):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in MMLU.rglob("*.csv"):
        if path.stem.rsplit("_", 1)[0] in SUBJECTS:
            client.upload_file(str(path), "models", f"evaldata/mmlu/{path.parent.name}/{path.name}")
    model, tokenizer = load_model(str(tiny_teacher_dir)).eval(), load_tokenizer(str(tiny_teacher_dir))
    from_s3 = run_mmlu(model, tokenizer, "s3://models/evaldata/mmlu", subjects=SUBJECTS, limit=4)
    from_folder = run_mmlu(model, tokenizer, str(MMLU), subjects=SUBJECTS, limit=4)
    assert from_s3 == from_folder and from_s3[0].n == 8


def test_bad_evaluation_input_names_what_to_fix(tmp_path, tiny_teacher_dir):
    evaluator = DistillationEvaluator(mmlu_source=str(MMLU))
    with pytest.raises(SpecError, match="evaluation_datasets.*'mmlu-pro'.*accepted: mmlu, humaneval"):
        evaluator.evaluate(None, str(tiny_teacher_dir), evaluation_datasets=["mmlu-pro"])
    with pytest.raises(SpecError, match="metrics.*'speed'"):
        evaluator.evaluate(None, str(tiny_teacher_dir), evaluation_datasets=["mmlu"], metrics=["speed"])
    with pytest.raises(MMLUDataError, match="unknown MMLU subjects astrology; .* has: abstract_algebra"):
        load_subjects(str(MMLU), ["astrology"])
    broken = tmp_path / "mmlu"
    (broken / "test").mkdir(parents=True)
    (broken / "dev").mkdir()
    (broken / "test" / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,E\n")
    (broken / "dev" / "x_dev.csv").write_text("question,choice0,choice1,choice2,choice3,answer\n")
    with pytest.raises(MMLUDataError, match=r"test/x line 2: .*answer \(0-3\); answer is 'E'"):
        load_subjects(str(broken))
    with pytest.raises(MMLUDataError, match="no test/<subject>_test.csv"):
        load_subjects(str(tmp_path))
