"""The generation engine on a tiny Llama: batching must not change what a model writes."""

import pytest

from potential_meme.engine.generation import Sampling, generate
from potential_meme.engine.models import load_model, load_tokenizer

PROMPTS = [
    "def add(a, b):",
    "The",
    "class Reader:\n    def read(self, size=-1):\n        '''Read up to size bytes",
    "import os\n",
    "x",
]


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    return load_model(str(tiny_teacher_dir)).eval(), load_tokenizer(str(tiny_teacher_dir))


def test_batched_left_padded_greedy_writes_what_one_prompt_at_a_time_writes(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, Sampling(max_tokens=12), batch_size=5)
    alone = [generate(model, tokenizer, [prompt], Sampling(max_tokens=12))[0] for prompt in PROMPTS]
    assert batched == alone
    assert [c.prompt_tokens for c in batched] == [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert all(c.finish_reason == "length" and c.completion_tokens == 12 for c in batched)


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    sampled = [generate(model, tokenizer, PROMPTS, Sampling(max_tokens=12, temperature=1.0, seed=s)) for s in (3, 3, 4)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]
    greedy = generate(model, tokenizer, PROMPTS, Sampling(max_tokens=12))
    assert sampled[0] != greedy


def test_a_stop_string_ends_a_completion_before_it(tiny):
    model, tokenizer = tiny
    free = generate(model, tokenizer, PROMPTS, Sampling(max_tokens=12))
    stop = next(c.text[3:5] for c in free if len(c.text) >= 5)  # text the model does write, a few characters in
    stopped = generate(model, tokenizer, PROMPTS, Sampling(max_tokens=12, stop=(stop,)), batch_size=2)
    for before, after in zip(free, stopped, strict=True):
        if stop in before.text:
            assert after.text == before.text[: before.text.index(stop)]
            assert after.finish_reason == "stop" and after.completion_tokens < 12
        else:
            assert after == before


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_bad_sampling_settings_are_named(settings, fragment):
    with pytest.raises(ValueError, match=fragment):
        Sampling(**settings)
