"""MT-Bench judged through `potential-meme serve` over HTTP with the official openai client: a judge that
answers 429 and 500 for a while, a cache that makes a rerun free, and a server that batches."""

import json
import threading
import time

import openai
import pytest
import torch

from potential_meme.engine.chat_api import ChatClient, ChatEndpoint, ChatRequest
from potential_meme.engine.generation import chat_prompt
from potential_meme.engine.models import load_model, load_tokenizer
from potential_meme.evaluation import DistillationEvaluator
from potential_meme.evaluation.mt_bench import rating
from potential_meme.evaluation.results import Score
from potential_meme.serving import ChatServer

from helpers import SHARED, FlakyProxy, serve

MT_BENCH = SHARED / "evaldata" / "mt_bench"
VERDICT = "Rating: [7]"  # the looser form weak judges write: "[[" would repeat a token


@pytest.fixture(scope="module")
def judge_dir(chat_model_dir, tmp_path_factory):
    """A tiny Llama built to give every answer the same verdict: MT-Bench's plumbing is under test here,
    not a judge's taste (the slow test judges with the real SmolLM2). Its layers add nothing to the
    residual stream, so each next token depends on the current one alone; the embeddings and output
    rows make that a chain from the generation prompt's last token through the verdict to EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-judge")
    tokenizer = load_tokenizer(str(chat_model_dir))
    prompt = tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": "?"}]), add_special_tokens=False)
    chain = [prompt["input_ids"][-1], *tokenizer(VERDICT, add_special_tokens=False)["input_ids"]]
    assert len(set(chain)) == len(chain) <= 16, "a bigram chain needs distinct tokens, one dimension each"
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for position, (token, following) in enumerate(zip(chain, [*chain[1:], tokenizer.eos_token_id], strict=True)):
            model.model.embed_tokens.weight[token, position] = 1.0
            model.lm_head.weight[following, position] = 10.0
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_mt_bench_is_judged_through_a_flaky_endpoint_and_a_rerun_asks_nothing(
    chat_model_dir, judge_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("JUDGE_KEY", "k3y-value")
    server, url = serve(judge_dir, "--name", "judge")
    proxy = FlakyProxy(url, too_many=2, failing=2)
    try:
        endpoint = ChatEndpoint(model="judge", base_url=proxy.url, api_key_env="JUDGE_KEY", concurrency=2)
        settings = {"limit": 1, "mt_bench_source": str(MT_BENCH), "judge": endpoint, "mt_bench_max_tokens": 8}
        settings |= {"judge_max_tokens": 12, "judge_cache": tmp_path / "judgments.jsonl"}
        evaluator = DistillationEvaluator(**settings)
        results = evaluator.evaluate(None, str(chat_model_dir), ["mt-bench"], ["accuracy"])
    finally:
        server.kill()
        proxy.close()
    scores = results.models["student"].benchmarks["mt-bench"]
    assert proxy.seen[:4] == ["429", "429", "500", "500"] and len(proxy.forwarded) == 16  # 8 categories, 2 turns
    assert scores["unreadable_judgments"].value == 0 and scores["unreadable_judgments"].n == 16
    assert scores["score"].value == 7 and scores["score"].n == 16
    assert sorted(results.models["student"].details["mt-bench"]) == [
        "coding", "extraction", "humanities", "math", "reasoning", "roleplay", "stem", "writing"
    ]  # fmt: skip
    asked = [request["messages"][1]["content"] for request in proxy.forwarded]
    math_question = next(s for s in results.models["student"].samples["mt-bench"] if s["category"] == "math")
    assert any("Reference Answer" in text and math_question["question"] in text for text in asked)
    written = results.to_json() + (tmp_path / "judgments.jsonl").read_text()
    assert "JUDGE_KEY" in written and "k3y-value" not in written  # the variable's name is kept, never its value

    # The server is gone: everything the rerun needs comes from the judgment cache.
    again = evaluator.evaluate(None, str(chat_model_dir), ["mt-bench"], ["accuracy"])
    assert again.models["student"].benchmarks["mt-bench"] == scores


def test_a_judge_that_rates_nothing_leaves_the_count_and_the_answers(chat_model_dir, tmp_path):
    """Measured here: SmolLM2-135M as judge rated none of a student's 160 answers; the evaluation must not end
    there, with the student's answers lost."""
    server, url = serve(chat_model_dir, "--name", "babbler")  # a random tiny model: never a rating
    try:
        endpoint = ChatEndpoint(model="babbler", base_url=url, api_key_env="NO_KEY_NEEDED")
        settings = {"limit": 1, "mt_bench_source": str(MT_BENCH), "judge": endpoint, "mt_bench_max_tokens": 8}
        settings |= {"judge_max_tokens": 16, "judge_cache": tmp_path / "judgments.jsonl"}
        results = DistillationEvaluator(**settings).evaluate(None, str(chat_model_dir), ["mt-bench"], ["accuracy"])
    finally:
        server.kill()
    student = results.models["student"]
    assert student.benchmarks["mt-bench"] == {
        "unreadable_judgments": Score(value=16, n=16, unit="count", higher_is_better=False)
    }
    assert student.details["mt-bench"] == {} and len(student.samples["mt-bench"]) == 8
    assert all(sample["score"] is None for sample in student.samples["mt-bench"])
    assert any(sample["answer"].strip() for sample in student.samples["mt-bench"])  # what the student wrote


def test_serve_answers_the_openai_client_and_refuses_bad_requests(chat_model_dir, monkeypatch):
    monkeypatch.setenv("POTENTIAL_MEME_SERVE_API_KEY", "s3cret")
    server, url = serve(chat_model_dir, "--name", "judge", "--batch-size", "4", "--max-tokens", "16")
    try:
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["judge"]
        threads, answers = [], {}

        def ask(index):
            response = client.chat.completions.create(
                model="judge", messages=[{"role": "user", "content": f"question {index}"}], max_tokens=6, temperature=0
            )
            answers[index] = response

        for index in range(6):
            threads.append(threading.Thread(target=ask, args=(index,)))
            threads[-1].start()
        for thread in threads:
            thread.join(60)
        assert sorted(answers) == list(range(6))
        assert all(
            a.choices[0].finish_reason in ("stop", "length") and a.usage.completion_tokens <= 6
            for a in answers.values()
        )
        with pytest.raises(openai.BadRequestError, match="max_tokens: must be an integer from 1 to 16"):
            client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "x"}], max_tokens=99)
        with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
            client.chat.completions.create(model="judge", messages=[{"role": "robot", "content": "x"}])
        with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
            client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        server.kill()


def test_requests_waiting_together_are_answered_in_one_batch(chat_model_dir):
    model, tokenizer = load_model(str(chat_model_dir)).eval(), load_tokenizer(str(chat_model_dir))
    server = ChatServer(model, tokenizer, "tiny", batch_size=4)
    answers = {}

    def ask(index):
        body = {"messages": [{"role": "user", "content": f"question {index}"}], "max_tokens": 5, "temperature": 0}
        answers[index] = server.complete(body)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    while server.waiting.qsize() < 6:  # all six wait before the server starts answering
        time.sleep(0.01)
    server.start()
    for thread in threads:
        thread.join(60)
    assert server.batches == 2  # 4 + 2, not 6
    batched = answers[3]["choices"][0]
    ask(3)  # again, alone
    assert server.batches == 3
    assert answers[3]["choices"][0] == batched  # batching changes no answer


def test_judge_ratings_are_read_as_fastchat_reads_them():
    assert rating("The answer is fine. Rating: [[8]]") == 8
    assert rating("Rating: [[7.5]] and later [[2]]") == 7.5
    assert rating("I'd say [6]") == 6
    assert rating("Rating: [[0]]") is None and rating("no verdict") is None and rating("[[11]]") is None


def test_the_cache_survives_a_cut_line(tmp_path):
    cache = tmp_path / "judgments.jsonl"
    request = ChatRequest(user="hello")
    key = request.key("judge")
    cache.write_text(json.dumps({"key": key, "answer": "Rating: [[9]]"}) + "\n" + '{"key": "cut sh')
    client = ChatClient(ChatEndpoint(model="judge", base_url="http://127.0.0.1:9"), cache)
    assert client.ask(request) == "Rating: [[9]]" and client.asked == 0
