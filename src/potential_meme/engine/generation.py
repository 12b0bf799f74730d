"""The one generation engine: everything that makes a model write text goes through `generate`.

Prompts are tokenized once, sorted by length so a batch holds prompts of similar length (little
padding), left-padded (every row's next token is at the same position, so one KV-cached decode step
serves the batch), and decoded by `model.generate` with greedy or seeded top-p sampling. Each
completion is cut at the first end-of-sequence token or stop string, and says why it ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0  # sampling is reproducible for the same prompts, batch size and seed
    min_tokens: int = 0  # end-of-sequence is not allowed before this many (timing needs full-length runs)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop": end of sequence or a stop string; "length": max_tokens reached
    prompt_tokens: int
    completion_tokens: int


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation rendered by the model's own chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has no chat template; "
            "multi-turn benchmarks need a chat (instruction-tuned) model"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    ends = [index for index in (text.find(s) for s in stop) if index >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    add_special_tokens: bool = True,
    progress: str | None = None,
    on_step: Callable[[], None] | None = None,
    on_batch: Callable[[list[tuple[int, Completion]]], None] | None = None,
) -> list[Completion]:
    """Completions of `prompts`, in their order. `add_special_tokens`: False for text that a chat template
    rendered (it has its own begin-of-sequence marker). `progress`: a label for a progress bar.
    `on_step`: called as each batch's prompt is read and after every decoding step (latency is timed so).
    `on_batch`: called with each finished batch's (prompt index, completion) pairs (to keep them as they come)."""
    encoded = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    device = next(model.parameters()).device
    results: list[Completion | None] = [None] * len(prompts)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for number, batch in enumerate(tqdm(batches, desc=progress, unit="batch", disable=progress is None)):
        width = max(len(encoded[index]) for index in batch)
        input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
        attention_mask = torch.tensor(
            [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch], device=device
        )
        options: dict[str, Any] = {"do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed + number)
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:  # a model's generation config may ask for sampling; greedy means greedy
            options.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            options.update(stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer, sampling.stop, width)]))
        if on_step is not None:
            options.update(streamer=_StepCallback(on_step))
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=sampling.min_tokens or None,
            pad_token_id=pad,
            eos_token_id=sorted(eos),
            **options,
        )
        finished = []
        for row, index in enumerate(batch):
            tokens = output[row, width:].tolist()
            # A row that ended early is filled with padding while the others go on.
            ended = next((position for position, token in enumerate(tokens) if token in eos or token == pad), None)
            kept = tokens if ended is None else tokens[:ended]
            text, stopped = _cut(tokenizer.decode(kept, skip_special_tokens=True), sampling.stop)
            results[index] = completion = Completion(
                text=text,
                finish_reason="stop" if ended is not None or stopped else "length",
                prompt_tokens=len(encoded[index]),
                completion_tokens=len(kept) + (ended is not None),
            )
            finished.append((index, completion))
        if on_batch is not None:
            on_batch(finished)
    return [completion for completion in results if completion is not None]


class _StopStrings(StoppingCriteria):
    """Ends a row once its completion holds a stop string. transformers' own `stop_strings` also matches
    across the prompt's end (a prompt ending in ":" and a first token ":" would stop at "::"); a stop
    sequence, as OpenAI's API defines it, is about the generated text alone."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, tuple(stop), prompt_width
        self.window = max(len(s) for s in stop) + 4  # tokens: enough to hold the longest stop string

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :][:, -self.window :], skip_special_tokens=True
        )
        return torch.tensor([any(s in tail for s in self.stop) for tail in tails], device=input_ids.device)


class _StepCallback:
    """A generate() streamer that only says when tokens arrive: first the prompt, then one a step."""

    def __init__(self, callback: Callable[[], None]):
        self.callback = callback

    def put(self, _: torch.Tensor) -> None:
        self.callback()

    def end(self) -> None:
        pass


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
