"""Per-token logprobs of a generation and teacher-forced logits for analysis.

    python examples/logprobs_analysis.py [--model smollm2-135m]
"""

import argparse

import numpy as np

import imp_jax
from imp_jax import SamplingParams


def main(llm: "imp_jax.LLM | None" = None, model: str = "smollm2-135m") -> dict:
    llm = llm or imp_jax.LLM(model)
    tok = llm.tokenizer
    out = llm.generate(["The three primary colors are"],
                       SamplingParams(temperature=0, max_tokens=10, logprobs=3,
                                      prompt_logprobs=1), use_tqdm=False)[0]
    print("generated:", repr(out.text))
    for token, alternatives in zip(out.token_ids, out.logprobs):
        alts = ", ".join(f"{tok.decode([t])!r}:{lp:.2f}" for t, lp in
                         sorted(alternatives.items(), key=lambda kv: -kv[1]))
        print(f"  {tok.decode([token])!r:>12}  top: {alts}")

    # Teacher-forced logits of the whole sequence: row i predicts token i+1.
    ids = out.prompt_token_ids + out.token_ids
    logits = llm.logits(ids)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    token_lp = logp[np.arange(len(ids) - 1), ids[1:]]
    entropy = -(np.exp(logp) * logp).sum(-1)
    print("surprisal per token (nats):", np.round(-token_lp, 2).tolist())
    print("mean entropy (nats):", float(entropy.mean()))
    return {"token_logprobs": token_lp, "entropy": entropy, "output": out}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    main(model=ap.parse_args().model)
