"""MT-Bench: 80 two-turn questions answered with the model's chat template, each turn rated 1-10 by a judge
model behind an OpenAI-compatible endpoint, with FastChat's single-answer grading prompts (reference
answers for math, reasoning and coding) and its per-category sampling temperatures.

The data is a folder or `s3://` prefix with FastChat's files: question.jsonl, judge_prompts.jsonl and
reference_answer_gpt-4.jsonl.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..engine.chat_api import ChatClient, ChatRequest
from ..engine.generation import Sampling, chat_prompt, generate
from ..storage import open_store
from .results import Score, sample_mean

log = logging.getLogger(__name__)

NEEDS_REFERENCE = {"math", "reasoning", "coding"}
TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}  # others: 0 (greedy)
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
LOOSE_RATING = re.compile(r"\[(\d+\.?\d*)\]")  # what weaker judges write instead


class MTBenchDataError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, str]


@dataclass(frozen=True)
class MTBench:
    questions: list[Question]
    judge_prompts: dict[str, dict[str, Any]]
    references: dict[int, tuple[str, str]]


def _jsonl(store: Any, name: str, source: str) -> list[dict[str, Any]]:
    if not store.exists(name):
        raise MTBenchDataError(f"{source}: no {name} (MT-Bench needs question.jsonl, judge_prompts.jsonl, {name})")
    return [json.loads(line) for line in store.read_bytes(name).decode("utf-8").splitlines() if line.strip()]


def load_mt_bench(source: str, limit: int | None = None) -> MTBench:
    store = open_store(source)
    questions = [
        Question(int(row["question_id"]), row["category"], tuple(row["turns"]))
        for row in _jsonl(store, "question.jsonl", source)
    ]
    prompts = {row["name"]: row for row in _jsonl(store, "judge_prompts.jsonl", source)}
    references = {
        int(row["question_id"]): tuple(row["choices"][0]["turns"])
        for row in _jsonl(store, "reference_answer_gpt-4.jsonl", source)
    }
    missing = {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} - set(prompts)
    if missing:
        raise MTBenchDataError(f"{source}/judge_prompts.jsonl lacks {', '.join(sorted(missing))}")
    if limit is not None:  # the first `limit` of each category, so every category is in a short run
        kept: dict[str, list[Question]] = {}
        for question in questions:
            kept.setdefault(question.category, [])
            if len(kept[question.category]) < limit:
                kept[question.category].append(question)
        questions = [question for group in kept.values() for question in group]
    return MTBench(questions, prompts, references)


def answer(
    model: Any, tokenizer: Any, questions: list[Question], max_tokens: int, batch_size: int
) -> dict[int, list[str]]:
    """Both turns of every question; the second sees the first answer, as in a conversation."""
    answers: dict[int, list[str]] = {q.question_id: [] for q in questions}
    by_temperature: dict[float, list[Question]] = {}
    for question in questions:
        by_temperature.setdefault(TEMPERATURES.get(question.category, 0.0), []).append(question)
    for turn in (0, 1):
        for temperature, group in by_temperature.items():
            prompts = []
            for question in group:
                messages = []
                for earlier in range(turn):
                    messages += [
                        {"role": "user", "content": question.turns[earlier]},
                        {"role": "assistant", "content": answers[question.question_id][earlier]},
                    ]
                prompts.append(chat_prompt(tokenizer, [*messages, {"role": "user", "content": question.turns[turn]}]))
            written = generate(
                model,
                tokenizer,
                prompts,
                Sampling(max_tokens=max_tokens, temperature=temperature, seed=turn),
                batch_size=batch_size,
                add_special_tokens=False,
                progress=f"MT-Bench turn {turn + 1}, temperature {temperature}",
            )
            for question, completion in zip(group, written, strict=True):
                answers[question.question_id].append(completion.text.strip())
    return answers


def judge_request(bench: MTBench, question: Question, answers: list[str], turn: int, max_tokens: int) -> ChatRequest:
    reference = bench.references.get(question.question_id) if question.category in NEEDS_REFERENCE else None
    name = ("single-math-v1" if reference else "single-v1") + ("-multi-turn" if turn == 1 else "")
    prompt = bench.judge_prompts[name]
    if turn == 0:
        fields = {"question": question.turns[0], "answer": answers[0]}
    else:
        fields = {f"question_{i + 1}": question.turns[i] for i in (0, 1)} | {
            f"answer_{i + 1}": answers[i] for i in (0, 1)
        }
    if reference:
        fields |= {"ref_answer_1": reference[0], "ref_answer_2": reference[1]}
    return ChatRequest(
        user=prompt["prompt_template"].format(**fields), system=prompt["system_prompt"], max_tokens=max_tokens
    )


def rating(judgment: str) -> float | None:
    """The judge's 1-10 rating, or None when it wrote none that can be read."""
    found = RATING.search(judgment) or LOOSE_RATING.search(judgment)
    if found is None:
        return None
    value = float(found.group(1))
    return value if 1 <= value <= 10 else None


def run_mt_bench(
    model: Any,
    tokenizer: Any,
    source: str,
    judge: ChatClient,
    limit: int | None = None,
    max_tokens: int = 512,
    judge_max_tokens: int = 1024,
    batch_size: int = 8,
) -> tuple[dict[str, Score], dict[str, Score], list[dict[str, Any]]]:
    """(scores: overall and per turn, with unreadable judgments counted; per category; samples). A judge that rates
    nothing leaves the count alone: an hour of answers is kept, and the count says the judge is not up to it."""
    bench = load_mt_bench(source, limit)
    answers = answer(model, tokenizer, bench.questions, max_tokens, batch_size)
    asked = [(q, turn) for q in bench.questions for turn in (0, 1)]
    judgments = judge.ask_all(
        [judge_request(bench, q, answers[q.question_id], turn, judge_max_tokens) for q, turn in asked],
        progress=f"MT-Bench judged by {judge.endpoint.model}",
    )
    ratings = [rating(text) for text in judgments]
    rated = [(q, turn, value) for (q, turn), value in zip(asked, ratings, strict=True) if value is not None]
    scores = {}
    if rated:
        scores["score"] = sample_mean([value for _, _, value in rated], unit="1-10")
    else:
        log.warning("the judge %s gave no readable [[rating]] in %d judgments", judge.endpoint.model, len(asked))
    for turn in (0, 1):
        values = [value for _, t, value in rated if t == turn]
        if values:
            scores[f"turn_{turn + 1}"] = sample_mean(values, unit="1-10")
    unreadable = len(asked) - len(rated)
    scores["unreadable_judgments"] = Score(value=unreadable, n=len(asked), unit="count", higher_is_better=False)
    categories = sorted({q.category for q in bench.questions})
    per_category = {
        category: sample_mean([value for q, _, value in rated if q.category == category], unit="1-10")
        for category in categories
        if any(q.category == category for q, _, _ in rated)
    }
    by_question = {}
    for (question, _turn), value in zip(asked, ratings, strict=True):
        by_question.setdefault(question.question_id, []).append(value)
    samples = [
        {
            "question_id": q.question_id,
            "category": q.category,
            "question": q.turns[0],
            "answer": answers[q.question_id][0],
            "score": by_question[q.question_id][0],
        }
        for q in bench.questions
    ]
    return scores, per_category, samples
