"""Call an `imp-jax serve` server with the official `openai` client.

    imp-jax serve smollm2-135m --port 8000 --api-key secret      # or: python -m imp_jax.server ...
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key secret
"""

from __future__ import annotations

import argparse
import asyncio

import openai


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print("model:", model)

    # Completions, greedy, with the logprobs of the top 2 tokens.
    r = client.completions.create(model=model, prompt="The capital of France is",
                                  max_tokens=min(16, args.max_tokens),
                                  temperature=0, logprobs=2)
    print("completion:", repr(r.choices[0].text), r.usage)

    # lm-evaluation-harness style loglikelihood: echo the prompt with its logprobs.
    r = client.completions.create(model=model, prompt="The capital of France is Paris",
                                  max_tokens=1, echo=True, logprobs=1, temperature=0)
    lps = r.choices[0].logprobs
    print("prompt logprobs:", list(zip(lps.tokens, lps.token_logprobs))[:8])

    # Chat, streamed, with a seed and vLLM's extra sampling knobs.
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a haiku about JAX."}],
        max_completion_tokens=args.max_tokens, temperature=0.7, top_p=0.95, seed=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"top_k": 50, "min_p": 0.05})
    print("chat: ", end="")
    for chunk in stream:
        for ch in chunk.choices:
            print(ch.delta.content or "", end="", flush=True)
        if chunk.usage:
            print("\nusage:", chunk.usage)

    # Many concurrent requests (continuous batching on the server).
    async def many():
        async with openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key) as ac:
            outs = await asyncio.gather(*(
                ac.completions.create(model=model, prompt=f"Number {i}:",
                                      max_tokens=min(8, args.max_tokens))
                for i in range(args.concurrency)))
            return [o.choices[0].text for o in outs]

    for i, text in enumerate(asyncio.run(many())):
        print(f"{i}: {text!r}")


if __name__ == "__main__":
    main()
