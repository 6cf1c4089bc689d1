"""A multi-turn chat through the model's own chat template.

    python examples/chat.py [--model smollm2-135m]
"""

import argparse

import imp_jax


def main(llm: "imp_jax.LLM | None" = None, model: str = "smollm2-135m") -> list[dict]:
    llm = llm or imp_jax.LLM(model)
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of Italy?"}]
    # The template text the model actually sees:
    print(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    for follow_up in ["And of Spain?", None]:
        reply = llm.chat(messages, temperature=0, max_tokens=48)[0].text
        print("assistant:", reply)
        messages.append({"role": "assistant", "content": reply})
        if follow_up:
            print("user:", follow_up)
            messages.append({"role": "user", "content": follow_up})
    return messages


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    main(model=ap.parse_args().model)
