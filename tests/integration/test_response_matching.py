"""Response matching end to end: a job planned as generate → train runs through `potential-meme run`, and the
library's ResponseMatcher drives the same stages."""

import hashlib
import json
import time

import pytest
import yaml

from potential_meme.distillation import ResponseMatcher
from potential_meme.engine.responses import load_responses
from potential_meme.spec import SpecError

from helpers import FlakyProxy, cli, serve, start_cli

TOPICS = [
    "lists",
    "dicts",
    "sets",
    "tuples",
    "strings",
    "bytes",
    "files",
    "paths",
    "threads",
    "sockets",
    "dates",
    "json",
]
PROMPTS = [f"{verb} {topic} in Python." for verb in ("Explain", "Show", "Compare", "Summarize") for topic in TOPICS]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _response_job(tmp_path, teacher, prompts, student=None, generation=None, **method):
    document = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "answers"},
        "spec": {
            "teacher": teacher if isinstance(teacher, dict) else {"model": str(teacher)},
            "student": student or {"fromTeacher": {"numLayers": 1}},
            "dataset": {"source": str(prompts), "validationFraction": 0.25},
            "method": {"response": {"generation": generation or {"maxNewTokens": 24, "batchSize": 8}, **method}},
            "training": {"batchSize": 4, "maxSteps": 8, "maxSeqLength": 64, "learningRate": 3e-3, "logEverySteps": 1},
            "output": {"uri": str(tmp_path / "runs")},
        },
    }
    path = tmp_path / "answers.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_response_job_generates_then_trains_the_student_on_the_teachers_answers(
    chat_model_dir, prompts_file, tmp_path
):
    job = _response_job(tmp_path, chat_model_dir, prompts_file)
    result = cli("run", str(job), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    generate = json.loads((tmp_path / "runs/answers/generate/manifest.json").read_text())
    responses = tmp_path / "runs/answers/generate/responses.jsonl"
    assert generate["metrics"]["prompts"] == len(PROMPTS) and generate["metrics"]["completionTokens"] > 0
    assert generate["files"] == [
        {
            "path": "responses.jsonl",
            "sha256": hashlib.sha256(responses.read_bytes()).hexdigest(),
            "bytes": responses.stat().st_size,
        }
    ]
    records = load_responses(str(responses))
    assert sorted(r["prompt"] for r in records) == sorted(PROMPTS)
    assert all(r["teacher"] == str(chat_model_dir) for r in records)
    assert not (tmp_path / "runs/answers/generate/partial").exists()  # the copy kept while generating is gone

    train = json.loads((tmp_path / "runs/answers/train/manifest.json").read_text())["metrics"]
    assert train["trainExchanges"] + train["heldOutExchanges"] == len(PROMPTS) and train["heldOutExchanges"] > 0
    # Held out: the teacher's answers to prompts the student never trained on.
    assert train["studentPerplexityAfter"] < train["studentPerplexityBefore"]
    assert f"{len(PROMPTS)} prompts answered" in result.stdout

    again = cli("run", str(job), "--metrics-port", "0")
    assert again.returncode == 0 and again.stderr.count("skipped") == 2


def test_response_matcher_generates_trains_on_its_answers_and_on_answers_written_elsewhere(
    chat_model_dir, prompts_file, tmp_path
):
    matcher = ResponseMatcher(str(chat_model_dir), 1, alpha=0.5, output_uri=str(tmp_path / "runs"), verbose=False)
    answers = matcher.generate_teacher_responses(str(prompts_file), temperature=0.0, max_tokens=16)
    assert answers.endswith("/generate/responses.jsonl") and len(load_responses(answers)) == len(PROMPTS)
    metrics = matcher.train_student(answers, batch_size=4, learning_rate=3e-3, max_steps=4, max_seq_length=64)
    assert metrics["trainExchanges"] + metrics["heldOutExchanges"] == len(PROMPTS)
    assert metrics["studentPerplexityAfter"] < metrics["studentPerplexityBefore"]

    elsewhere = tmp_path / "written-elsewhere.jsonl"
    elsewhere.write_text("".join(json.dumps({"prompt": p, "response": f"{p} Here is how."}) + "\n" for p in PROMPTS))
    other = ResponseMatcher(str(chat_model_dir), 1, output_uri=str(tmp_path / "runs"), verbose=False)
    metrics = other.train_student(str(elsewhere), batch_size=4, learning_rate=3e-3, max_steps=4, max_seq_length=64)
    assert metrics["trainExchanges"] + metrics["heldOutExchanges"] == len(PROMPTS)

    with pytest.raises(SpecError, match="spec.method.response.responses: .*nothing.jsonl does not exist"):
        other.train_student(str(tmp_path / "nothing.jsonl"), max_steps=1, max_seq_length=64)


def test_a_response_job_with_an_api_teacher_keeps_its_key_out_of_every_output(
    chat_model_dir, prompts_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("TEACHER_KEY", "sk-never-written-anywhere")
    server, url = serve(chat_model_dir, "--name", "tiny-chat", "--max-tokens", "32")
    proxy = FlakyProxy(url, too_many=1, failing=1)
    endpoint = {"baseUrl": proxy.url, "apiKeyEnv": "TEACHER_KEY", "concurrency": 4}
    job = _response_job(
        tmp_path, {"model": "tiny-chat", "endpoint": endpoint}, prompts_file, student={"model": str(chat_model_dir)}
    )
    try:
        result = cli("run", str(job), "--metrics-port", "0")
    finally:
        server.kill()
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.seen[:2] == ["429", "500"] and len(proxy.forwarded) == len(PROMPTS)  # each prompt asked once
    records = load_responses(str(tmp_path / "runs/answers/generate/responses.jsonl"))
    assert {r["teacher"] for r in records} == {"tiny-chat"} and all(r["completion_tokens"] > 0 for r in records)
    train = json.loads((tmp_path / "runs/answers/train/manifest.json").read_text())["metrics"]
    assert train["teacherPerplexity"] is None and train["teacherParameters"] is None  # an API shows neither
    assert train["studentPerplexityAfter"] < train["studentPerplexityBefore"]
    assert "teacher behind an API" in result.stdout
    written = (
        result.stdout
        + result.stderr
        + "".join(path.read_text(errors="replace") for path in (tmp_path / "runs").rglob("*") if path.is_file())
    )
    assert "sk-never-written-anywhere" not in written


def test_a_generate_stage_killed_mid_run_keeps_its_answers_in_the_store_and_the_next_asks_only_the_rest(
    chat_model_dir, tmp_path
):
    prompts = PROMPTS[:16]
    prompts_file = tmp_path / "sixteen.txt"
    prompts_file.write_text("\n".join(prompts))
    job = _response_job(tmp_path, chat_model_dir, prompts_file, generation={"maxNewTokens": 64, "batchSize": 2})
    partial = tmp_path / "runs/answers/generate/partial/responses.jsonl"
    process = start_cli("train", "--job", str(job), "--stage", "generate")
    deadline = time.monotonic() + 300
    while not partial.exists() and time.monotonic() < deadline:  # copied after the first batch, then every 10 s
        time.sleep(0.05)
    process.kill()
    process.wait(30)
    kept = load_responses(str(partial))
    assert 2 <= len(kept) < len(prompts)

    rerun = cli("train", "--job", str(job), "--stage", "generate")
    assert rerun.returncode == 0, rerun.stderr
    left = len(prompts) - len(kept)
    assert f"{len(kept)} of {len(prompts)} prompts answered before; asking the other {left}" in rerun.stderr
    records = {r["id"]: r for r in load_responses(str(tmp_path / "runs/answers/generate/responses.jsonl"))}
    assert len(records) == len(prompts) and all(records[r["id"]] == r for r in kept)
    assert not partial.exists()
