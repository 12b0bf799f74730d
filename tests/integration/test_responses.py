"""Teacher responses: a local teacher batched with KV cache, an API teacher over HTTP through `potential-meme
serve` (a proxy answering 429 and 500 for a while, a server killed mid-run), and a generation killed mid-run:
every prompt answered exactly once, each answer on disk as soon as it exists."""

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from potential_meme.engine.chat_api import ChatClient, ChatEndpoint
from potential_meme.engine.generation import Sampling
from potential_meme.engine.losses import IGNORE_INDEX
from potential_meme.engine.models import load_model, load_tokenizer
from potential_meme.engine.responses import (
    ApiTeacher,
    LocalTeacher,
    generate_responses,
    pack_exchanges,
    prompt_id,
    read_prompts,
    read_responses,
)
from potential_meme.spec.models import TextSource

from helpers import FlakyProxy, serve

QUESTIONS = [f"Question {n}: what does module {name} do?" for n, name in enumerate("abcdefghijklmnop")]
GREEDY = Sampling(max_tokens=8)


@pytest.fixture
def prompts_dir(tmp_path):
    """The seed's `path/to/prompts`: a folder of prompt files, one per line in text, a column in CSV."""
    root = tmp_path / "prompts"
    root.mkdir()
    (root / "a.txt").write_text("\n".join(QUESTIONS[:10]) + "\n\n" + QUESTIONS[0] + "\n")  # a blank and a repeat
    rows = "".join(f'"{question}"\n' for question in QUESTIONS[10:])
    (root / "b.csv").write_text("text\n" + rows)
    return root


@pytest.fixture(scope="module")
def chat_teacher(chat_model_dir):
    return load_model(str(chat_model_dir)).eval(), load_tokenizer(str(chat_model_dir))


def test_prompts_come_from_text_and_csv_files_once_each(prompts_dir):
    prompts = read_prompts(TextSource(source=str(prompts_dir)))
    assert [p.text for p in prompts] == QUESTIONS
    assert all(p.id == prompt_id(p.text) for p in prompts)


def test_a_local_teacher_answers_batched_as_alone_and_a_rerun_asks_nothing(chat_teacher, prompts_dir, tmp_path):
    model, tokenizer = chat_teacher
    prompts = read_prompts(TextSource(source=str(prompts_dir)))
    path = tmp_path / "responses.jsonl"
    records = generate_responses(LocalTeacher(model, tokenizer, "tiny-chat", batch_size=4), prompts, GREEDY, path)
    alone = generate_responses(
        LocalTeacher(model, tokenizer, "tiny-chat", batch_size=1), prompts, GREEDY, tmp_path / "alone.jsonl"
    )
    assert [r["response"] for r in records] == [r["response"] for r in alone]
    assert [r["id"] for r in records] == [p.id for p in prompts]
    for record, prompt in zip(records, prompts, strict=True):
        assert record["prompt"] == prompt.text and record["teacher"] == "tiny-chat"
        assert record["finish_reason"] in ("stop", "length") and 1 <= record["completion_tokens"] <= 8
        assert record["prompt_tokens"] > len(tokenizer(prompt.text)["input_ids"])  # the chat template's tokens too
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] != [] and len(lines) == len(prompts)

    # A teacher without a model would fail on its first prompt: the rerun asks it nothing.
    again = generate_responses(LocalTeacher(None, tokenizer, "tiny-chat"), prompts, GREEDY, path)
    assert again == records and path.read_text().splitlines() == lines


KILLED_RUN = """
import sys
from pathlib import Path
from potential_meme.engine.generation import Sampling
from potential_meme.engine.losses import IGNORE_INDEX
from potential_meme.engine.models import load_model, load_tokenizer
from potential_meme.engine.responses import LocalTeacher, Prompt, generate_responses, prompt_id
model_dir, path = sys.argv[1], Path(sys.argv[2])
prompts = [Prompt(prompt_id(t), t) for t in sys.argv[3:]]
teacher = LocalTeacher(load_model(model_dir).eval(), load_tokenizer(model_dir), "tiny-chat", batch_size=2)
generate_responses(teacher, prompts, Sampling(max_tokens=200, min_tokens=200), path)
"""


def test_a_generation_killed_mid_run_keeps_what_it_wrote_and_the_rerun_asks_only_the_rest(
    chat_model_dir, chat_teacher, tmp_path
):
    path = tmp_path / "responses.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(chat_model_dir), str(path), *QUESTIONS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(read_responses(path)) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = path.read_bytes()
    kept = read_responses(path)
    assert 4 <= len(kept) < len(QUESTIONS)
    with path.open("ab") as file:
        file.write(b'{"id": "cut short by a cra')  # as a kill in the middle of a write leaves it

    model, tokenizer = chat_teacher
    teacher = CountingTeacher(model, tokenizer, "tiny-chat", batch_size=2)
    prompts = read_prompts(TextSource(source=str(_lines(tmp_path, QUESTIONS))))
    records = generate_responses(teacher, prompts, Sampling(max_tokens=200, min_tokens=200), path)
    assert sorted(p.text for p in teacher.asked) == sorted(q for q in QUESTIONS if prompt_id(q) not in kept)
    assert [r["prompt"] for r in records] == QUESTIONS
    assert path.read_bytes().startswith(written[: written.rfind(b"\n") + 1])  # what was written stays
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(prompt_id(q) for q in QUESTIONS)  # each exactly once
    for record in lines:
        if record["id"] in kept:
            assert record == kept[record["id"]]


class CountingTeacher(LocalTeacher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def answer(self, prompts, sampling, answered):
        self.asked.extend(prompts)
        super().answer(prompts, sampling, answered)


def _lines(tmp_path, texts):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(texts))
    return path


def test_an_api_teacher_is_retried_through_429_and_500_and_answers_as_the_same_model_does_locally(
    chat_model_dir, chat_teacher, tmp_path
):
    server, url = serve(chat_model_dir, "--name", "tiny-chat", "--batch-size", "4", "--max-tokens", "16")
    proxy = FlakyProxy(url, too_many=2, failing=2)
    prompts = read_prompts(TextSource(source=str(_lines(tmp_path, QUESTIONS[:8]))))
    path = tmp_path / "api.jsonl"
    try:
        client = ChatClient(ChatEndpoint(model="tiny-chat", base_url=proxy.url, api_key_env="NO_KEY", concurrency=3))
        records = generate_responses(ApiTeacher(client), prompts, GREEDY, path)
    finally:
        server.kill()
        proxy.close()
    assert proxy.seen[:4] == ["429", "429", "500", "500"] and len(proxy.forwarded) == 8  # each prompt once
    model, tokenizer = chat_teacher
    local = generate_responses(LocalTeacher(model, tokenizer, "tiny-chat"), prompts, GREEDY, tmp_path / "local.jsonl")
    assert [r["response"] for r in records] == [r["response"] for r in local]
    assert [r["completion_tokens"] for r in records] == [r["completion_tokens"] for r in local]
    assert all(r["teacher"] == "tiny-chat" and r["prompt_tokens"] > 0 for r in records)


def test_an_api_teacher_killed_mid_run_is_asked_only_what_is_missing_when_it_is_back(chat_model_dir, tmp_path):
    prompts = read_prompts(TextSource(source=str(_lines(tmp_path, QUESTIONS))))
    path = tmp_path / "api.jsonl"
    server, url = serve(chat_model_dir, "--name", "tiny-chat", "--batch-size", "1", "--max-tokens", "16")
    endpoint = ChatEndpoint(model="tiny-chat", base_url=url, api_key_env="NO_KEY", concurrency=2, max_retries=0)

    def kill_after_four():
        if len(read_responses(path)) >= 4:
            server.kill()

    try:
        with pytest.raises(openai.APIConnectionError):
            generate_responses(ApiTeacher(ChatClient(endpoint)), prompts, GREEDY, path, on_written=kill_after_four)
    finally:
        server.kill()
    kept = read_responses(path)
    assert 4 <= len(kept) < len(prompts)

    server, url = serve(chat_model_dir, "--name", "tiny-chat", "--max-tokens", "16")
    proxy = FlakyProxy(url, too_many=0, failing=0)
    try:
        client = ChatClient(ChatEndpoint(model="tiny-chat", base_url=proxy.url, api_key_env="NO_KEY"))
        records = generate_responses(ApiTeacher(client), prompts, GREEDY, path)
    finally:
        server.kill()
        proxy.close()
    asked = sorted(request["messages"][-1]["content"] for request in proxy.forwarded)
    assert asked == sorted(p.text for p in prompts if p.id not in kept)
    assert [r["prompt"] for r in records] == QUESTIONS
    assert len(path.read_text().splitlines()) == len(QUESTIONS)  # nothing answered twice


def test_exchanges_are_packed_with_only_the_teachers_tokens_learned(chat_teacher, tiny_teacher_dir):
    _, chat = chat_teacher
    plain = load_tokenizer(str(tiny_teacher_dir))  # no chat template
    records = [
        {"prompt": f"Say {word}.", "response": f"{word} it is", "finish_reason": reason}
        for word, reason in (("alpha", "stop"), ("beta", "length"), ("gamma", "stop"))
    ] * 4
    for tokenizer, end in ((chat, "<|im_end|>\n"), (plain, "<|endoftext|>")):
        rows, labels = pack_exchanges(records, tokenizer, 16)
        stream, targets = rows.reshape(-1).tolist(), labels.reshape(-1).tolist()
        assert all(t == IGNORE_INDEX or t == stream[i + 1] for i, t in enumerate(targets[:-1]))
        learned = tokenizer.decode([t for t in targets if t != IGNORE_INDEX], skip_special_tokens=False)
        whole = tokenizer.decode(stream, skip_special_tokens=False)
        # What is learned is each response in turn (an unfinished one without its end), never a prompt.
        assert "Say" not in learned and learned.startswith(f"alpha it is{end}beta it is")
        assert f"beta it is{end}" not in learned and "Say beta." in whole
    with pytest.raises(ValueError, match="make no sequence of 4096"):
        pack_exchanges(records[:1], chat, 4096)
