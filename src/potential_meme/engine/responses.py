"""Teacher responses: a teacher, local or behind an OpenAI-compatible API, answers prompts.

Every answer is appended to a JSON Lines file as soon as it exists (a local teacher's batch, an API
answer), flushed to disk, one record per prompt: id, prompt, response, finish reason, token counts and
the teacher's name. A rerun reads the file first and asks only the prompts it lacks, so a killed
generation loses nothing it wrote and nothing is answered twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..spec.models import TextSource
from ..storage import open_store
from .chat_api import ChatClient, ChatRequest
from .data import read_documents
from .generation import Completion, Sampling, chat_prompt, generate
from .losses import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    id: str  # from the text alone: the same prompt has the same id in any file, order or rerun
    text: str


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_prompts(source: TextSource) -> list[Prompt]:
    """The distinct prompts of a source, in order; a text file holds one a line."""
    prompts: dict[str, Prompt] = {}
    for document in read_documents(source, line_per_text=True):
        text = document.text.strip()
        if text:
            prompts.setdefault(prompt_id(text), Prompt(prompt_id(text), text))
    return list(prompts.values())


Answered = Callable[[list[tuple[Prompt, Completion]]], None]  # takes each group of answers as it is complete


class LocalTeacher:
    """A loaded model: batched generation with KV cache; chat models answer through their chat template."""

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size

    def answer(self, prompts: list[Prompt], sampling: Sampling, answered: Answered) -> None:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        rendered = [
            chat_prompt(self.tokenizer, [{"role": "user", "content": prompt.text}]) if chat else prompt.text
            for prompt in prompts
        ]
        generate(
            self.model,
            self.tokenizer,
            rendered,
            sampling,
            batch_size=self.batch_size,
            add_special_tokens=not chat,  # a chat template writes its own begin-of-sequence marker
            on_batch=lambda batch: answered([(prompts[index], completion) for index, completion in batch]),
        )


class ApiTeacher:
    """A model behind an OpenAI-compatible endpoint, asked `concurrency` prompts at a time."""

    def __init__(self, client: ChatClient):
        self.client, self.name = client, client.endpoint.model

    def answer(self, prompts: list[Prompt], sampling: Sampling, answered: Answered) -> None:
        requests = [
            ChatRequest(user=prompt.text, temperature=sampling.temperature, max_tokens=sampling.max_tokens)
            for prompt in prompts
        ]
        for index, completion in self.client.complete_each(requests):
            answered([(prompts[index], completion)])


def read_responses(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a responses file by prompt id; a last line cut short by a crash is left out."""
    return _records(path.read_text(encoding="utf-8")) if path.exists() else {}


def load_responses(uri: str) -> list[dict[str, Any]]:
    """The records of a responses file at a local path or an s3:// or file:// URI."""
    if uri.startswith(("s3://", "file://")):
        folder, name = uri.rsplit("/", 1)
        store = open_store(folder + "/")
        if not store.exists(name):
            raise FileNotFoundError(f"{uri} does not exist")
        text = store.read_bytes(name).decode("utf-8")
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        text = path.read_text(encoding="utf-8")
    return list(_records(text).values())


def _records(text: str) -> dict[str, dict[str, Any]]:
    """Records by prompt id; one written elsewhere needs a prompt and a response, the rest is filled in."""
    records: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if (
            isinstance(record, dict)
            and isinstance(record.get("prompt"), str)
            and isinstance(record.get("response"), str)
        ):
            record.setdefault("id", prompt_id(record["prompt"].strip()))
            record.setdefault("finish_reason", "stop")
            records[record["id"]] = record
    return records


def _drop_cut_line(path: Path) -> None:
    """A crash mid-write leaves a line without its newline: cut it, or the next record would be glued to it."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _record(prompt: Prompt, completion: Completion, teacher: str) -> dict[str, Any]:
    return {
        "id": prompt.id,
        "prompt": prompt.text,
        "response": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "teacher": teacher,
    }


def generate_responses(
    teacher: LocalTeacher | ApiTeacher,
    prompts: Iterable[Prompt],
    sampling: Sampling,
    path: Path,
    on_written: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """The teacher's record for every prompt, in the prompts' order; only prompts missing from `path` are
    asked, and each group of answers is on disk as soon as it is complete. `on_written`: called after each
    write (an upload to the artifact store keeps a pod's progress)."""
    prompts = list(prompts)
    done = read_responses(path)
    todo = [prompt for prompt in prompts if prompt.id not in done]
    if len(todo) < len(prompts):
        log.info(
            "%d of %d prompts answered before; asking the other %d", len(prompts) - len(todo), len(prompts), len(todo)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_cut_line(path)
    with (
        path.open("a", encoding="utf-8") as out,
        tqdm(total=len(todo), desc=f"{teacher.name} answers", unit="prompt") as bar,
    ):

        def write(group: list[tuple[Prompt, Completion]]) -> None:
            for prompt, completion in group:
                done[prompt.id] = _record(prompt, completion, teacher.name)
                out.write(json.dumps(done[prompt.id], ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(group))
            if on_written is not None:
                on_written()

        if todo:
            teacher.answer(todo, sampling, write)
    return [done[prompt.id] for prompt in prompts]


def exchange_tokens(tokenizer: Any, prompt: str, response: str, finished: bool) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens) of one exchange as the model reads it: through its chat template (the
    response then ends with the template's end-of-turn), else the prompt on a line and the response after it.
    `finished`: False for a response cut at max tokens, which gets no end-of-turn: it did not end."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    user = [{"role": "user", "content": prompt}]
    asked = (
        tokenizer(chat_prompt(tokenizer, user), add_special_tokens=False)["input_ids"]
        if chat
        else tokenizer(prompt + "\n")["input_ids"]
    )
    if chat and finished:
        exchange = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        whole = tokenizer(exchange, add_special_tokens=False)["input_ids"]
        if whole[: len(asked)] == asked:  # templates that rewrite earlier turns fall through to the plain form
            return asked, whole[len(asked) :]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    return asked, answer + ([tokenizer.eos_token_id] if finished and not chat else [])


def pack_exchanges(
    records: list[dict[str, Any]], tokenizer: Any, sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) [N, sequence_length]: the exchanges joined and cut into rows, as corpus text is
    packed; a position's label is the next token where that token is the teacher's, elsewhere IGNORE_INDEX
    (the student learns to answer, not to ask)."""
    stream: list[int] = []
    learned: list[bool] = []
    for record in records:
        asked, answer = exchange_tokens(
            tokenizer, record["prompt"], record["response"], record["finish_reason"] != "length"
        )
        stream += asked + answer
        learned += [False] * len(asked) + [True] * len(answer)
    rows = len(stream) // sequence_length
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens of prompts and responses make no sequence of {sequence_length}")
    size = rows * sequence_length
    labels = [stream[i + 1] if i + 1 < len(stream) and learned[i + 1] else IGNORE_INDEX for i in range(size)]
    shape = (rows, sequence_length)
    return torch.tensor(stream[:size]).view(shape), torch.tensor(labels).view(shape)
