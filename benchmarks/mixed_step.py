"""One mixed step of the throughput runs, timed by itself with each command-buffer setting:
P prompt chunks of L tokens beside D decode rows at context C, as the engine's 256-row and
1024-row runs schedule them. Per mode: the runner's enqueue time, the whole step (to its
tokens on the host), and the prompt and decode programs alone (the prompt program holds the
first $IMP_JAX_PROMPT_ROWS chunks, default 64, as the step's prompt groups do).

    python benchmarks/mixed_step.py --model random:llama3-8b --prompts 14 --decode 240
    IMP_JAX_PROMPT_ROWS=16 python benchmarks/mixed_step.py --prompts 64 --decode 960 ...
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python benchmarks/mixed_step.py ...
    IMP_JAX_FUSED_QUANT=1 python benchmarks/mixed_step.py --quantization fp8 --prompts 64 \
        --decode 0 --modes decode        # an 8192-token FP8 prompt program, fused quantization
    python benchmarks/mixed_step.py --quantization fp8 --kv-cache-dtype fp8 --prompts 0 \
        --decode 704 --context 1536      # one decode step of the FP8 1k/1k run's shape

first_call_ms is a program's first call: compile + XLA autotuning, or less where the persistent
compilation cache ($IMP_JAX_CACHE_DIR, as LLM uses it) already holds the program or its autotune
results; IMP_JAX_NO_CACHE=1 gives the cold figure.

--pool-gb sizes the KV pool as the engine does (~100 GB at 0.9 of an H200) instead of just the
step's pages; --hlo lists every copy in each compiled program that moves more than 16 MB (a
donated cache the program cannot update in place is copied whole, per step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=14, help="prompt chunks in the step (P)")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens per chunk (L)")
    ap.add_argument("--decode", type=int, default=240, help="decode rows (D)")
    ap.add_argument("--context", type=int, default=192, help="decode rows' context (C)")
    ap.add_argument("--modes", default="all,decode,none")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=None,
                    help="tokens per KV page (default: the engine's, 64 for fp8 pages, else 16)")
    ap.add_argument("--pool-gb", type=float, default=0.0, help="KV pool size (0: just enough)")
    ap.add_argument("--hlo", action="store_true", help="report large copies in the programs")
    ap.add_argument("--quantization", default=None,
                    help="fp8 / fp8-weight-only / int8 weights (default policy); with fp8, "
                    "$IMP_JAX_FUSED_QUANT=0/1 A/Bs the fused activation quantization")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="KV pages: auto (the model dtype), fp8 or int8 (with their scales)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if min(args.prompts, args.decode) < 0 or min(args.prompt_len, args.context, args.reps) < 1:
        ap.error("--prompts/--decode must be >= 0, --prompt-len/--context/--reps >= 1")
    if args.page_size is not None and (args.page_size < 1 or args.page_size & (args.page_size - 1)):
        ap.error(f"--page-size {args.page_size}: a power of two >= 1")
    import jax

    from imp_jax.llm import (KV_CACHE_DTYPES, default_page_size, enable_compilation_cache,
                             resolve_kv_cache_dtype)
    if args.kv_cache_dtype not in KV_CACHE_DTYPES:
        ap.error(f"--kv-cache-dtype {args.kv_cache_dtype!r}: allowed {KV_CACHE_DTYPES}")
    enable_compilation_cache()  # as LLM does ($IMP_JAX_CACHE_DIR; IMP_JAX_NO_CACHE=1: none)
    from imp_jax.cache import KVCache
    from imp_jax.loaders import load_model
    from imp_jax.runner import COMMAND_BUFFER_MODES, ModelRunner, StepSeq
    from imp_jax.sampling import SamplingParams, SamplingTensors

    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in COMMAND_BUFFER_MODES]:
        ap.error(f"--modes {bad}: allowed {COMMAND_BUFFER_MODES}")
    cache_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, args.dtype)
    page = args.page_size or default_page_size(cache_dtype)
    random = args.model.startswith("random:")
    m = load_model(args.model, args.dtype,
                   random_quantization=args.quantization if random else None)
    if args.quantization:  # as LLM(quantization=) does (random weights come quantized already)
        from imp_jax.quant import quantize_loaded
        m.params = quantize_loaded(m.params, m.cfg, args.quantization, m.fp8_scales)
    max_len = max(args.prompt_len, args.context) + page
    per_seq = -(-max_len // page)
    rows = args.prompts + args.decode
    page_bytes = KVCache.bytes_per_token(m.cfg, cache_dtype) * page
    num_pages = max(rows * per_seq + 1, int(args.pool_gb * 1e9 / page_bytes))
    r = ModelRunner(m.cfg, m.params, num_pages=num_pages, page_size=page,
                    max_model_len=max_len, max_num_seqs=max(rows, 4),
                    dtype=jax.numpy.dtype(args.dtype), cache_dtype=cache_dtype)
    rng = np.random.default_rng(0)
    free = iter(range(1, rows * per_seq + 1))  # page 0 is the dummy steps' page
    vocab = m.cfg.vocab_size
    seqs = [StepSeq(rng.integers(0, vocab, args.prompt_len).tolist(), 0,
                    [next(free) for _ in range(-(-args.prompt_len // page))])
            for _ in range(args.prompts)]
    seqs += [StepSeq([int(rng.integers(0, vocab))], args.context - 1,
                     [next(free) for _ in range(-(-args.context // page))])
             for _ in range(args.decode)]
    greedy = SamplingParams(temperature=0)
    prompt_rows = r.prompt_rows  # $IMP_JAX_PROMPT_ROWS: rows of a prompt program
    first_group = seqs[:min(prompt_rows, args.prompts)]

    def tensors(n):
        return SamplingTensors.from_params([greedy] * n, list(range(n)), [0] * n)

    if args.hlo:
        for name, s in (("prompt_group", first_group), ("decode_group", seqs[args.prompts:])):
            if s:
                rows_ = prompt_rows if name == "prompt_group" else None
                for mode in modes:
                    r.command_buffers = mode
                    text = r._step(s, tensors(len(s)), 0, rows_, compile_only=True) \
                        .compile().as_text()
                    print(json.dumps(dict(mode=mode, program=name, prompt_rows=prompt_rows,
                                          **large_copies(text))), flush=True)

    parts = {"step": (seqs, lambda s, t: r.step(s, t))}
    if args.prompts:
        parts["prompt_group"] = (first_group, lambda s, t: r._step(s, t, 0, prompt_rows))
    if args.decode:
        parts["decode_group"] = (seqs[args.prompts:], lambda s, t: r._step(s, t, 0))

    def timed(fn, s):
        t = tensors(len(s))
        enq, wall = [], []
        for i in range(args.reps + 1):  # the first call compiles (and autotunes, on a GPU)
            t0 = time.perf_counter()
            out = fn(s, t)
            t1 = time.perf_counter()
            np.asarray(out.sample.tokens)
            t2 = time.perf_counter()
            enq.append(t1 - t0)
            wall.append(t2 - t0)
        return 1e3 * statistics.median(enq[1:]), 1e3 * statistics.median(wall[1:]), 1e3 * wall[0]

    results = []
    for mode in modes:
        r.command_buffers = mode
        for name, (s, fn) in parts.items():
            enq, wall, first = timed(fn, s)
            row = dict(mode=mode, part=name, rows=len(s), prompt_rows=prompt_rows,
                       enqueue_ms=round(enq, 2), wall_ms=round(wall, 2),
                       first_call_ms=round(first, 1))
            results.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(model=args.model, prompts=args.prompts, prompt_len=args.prompt_len,
                decode=args.decode, context=args.context, prompt_rows=prompt_rows, page_size=page,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                fused_quant=os.environ.get("IMP_JAX_FUSED_QUANT", ""),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                device=jax.devices()[0].device_kind)
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, rows=results), f, indent=1)
    return 0


_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f8e4m3fn": 1, "s8": 1,
                "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def large_copies(hlo: str, min_bytes: float = 16e6) -> dict:
    """Copies (copy, copy-start) in compiled HLO text that move more than min_bytes."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (copy|copy-start)\(", line)
        if m and m.group(1) in _DTYPE_BYTES:
            n = math.prod(int(d) for d in m.group(2).split(",") if d) * _DTYPE_BYTES[m.group(1)]
            if n > min_bytes:
                found.append(f"{m.group(1)}[{m.group(2)}]")
    return dict(large_copies=len(found), examples=found[:4],
                custom_calls=hlo.count("custom-call("), fusions=hlo.count(" fusion("))


if __name__ == "__main__":
    raise SystemExit(main())
