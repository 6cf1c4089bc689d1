"""Batch generation with per-prompt sampling parameters.

    python examples/batch_generation.py [--model smollm2-135m]
"""

import argparse

import imp_jax
from imp_jax import SamplingParams


def main(llm: "imp_jax.LLM | None" = None, model: str = "smollm2-135m") -> list:
    llm = llm or imp_jax.LLM(model)
    prompts = ["The capital of France is", "Write a haiku about the sea:",
               "List three prime numbers:", "def fibonacci(n):"]
    params = [
        SamplingParams(temperature=0, max_tokens=16),  # greedy
        SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=24),
        SamplingParams(temperature=0.7, top_k=20, seed=1, max_tokens=16, stop=["\n\n"]),
        SamplingParams(temperature=0.2, repetition_penalty=1.1, seed=2, max_tokens=32),
    ]
    outs = llm.generate(prompts, params)  # one continuous batch; results in input order
    for prompt, out in zip(prompts, outs):
        print(f"{prompt!r} -> {out.text!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")
    return outs


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    main(model=ap.parse_args().model)
