"""A small multiple-choice evaluation with `llm.score` (lm-evaluation-harness style).

Each question's context is shared by its choices, so the prefix cache computes it once.

    python examples/multiple_choice_eval.py [--model smollm2-135m]
"""

import argparse

import imp_jax

QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " Berlin", " Madrid"], 0),
    ("Water freezes at a temperature of zero degrees", [" Celsius", " Kelvin", " Newton"], 0),
    ("The largest planet in our solar system is", [" Mercury", " Jupiter", " Mars"], 1),
    ("A baby cat is called a", [" puppy", " calf", " kitten", " foal"], 2),
    ("The opposite of hot is", [" cold", " loud", " tall"], 0),
    ("Bees make", [" honey", " milk", " silk"], 0),
]


def main(llm: "imp_jax.LLM | None" = None, model: str = "smollm2-135m") -> float:
    llm = llm or imp_jax.LLM(model)
    contexts, continuations, owners = [], [], []
    for q, (context, choices, _) in enumerate(QUESTIONS):
        for choice in choices:
            contexts.append(context)
            continuations.append(choice)
            owners.append(q)
    scores = llm.score(contexts, continuations)
    correct = 0
    for q, (context, choices, answer) in enumerate(QUESTIONS):
        mine = [s for s, o in zip(scores, owners) if o == q]
        # length-normalised log-likelihood, as lm-eval's acc_norm does with characters
        best = max(range(len(choices)), key=lambda i: mine[i][0] / len(choices[i]))
        correct += best == answer
        print(f"{context!r}: picked {choices[best]!r} (answer {choices[answer]!r})")
    accuracy = correct / len(QUESTIONS)
    print(f"accuracy {accuracy:.2f} on {len(QUESTIONS)} questions; prefix-cache hit rate "
          f"{llm.engine.block_manager.prefix_cache_hit_rate:.2f}")
    return accuracy


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    main(model=ap.parse_args().model)
