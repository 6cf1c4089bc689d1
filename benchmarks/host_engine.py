"""Engine host time per step at ~1000 rows, on any machine (CPU is enough): the `tiny` shape's
device work is small, so the engine's own bookkeeping (scheduler, step inputs, per-row output
handling) is what `stats["host_time"]` measures.

    PYTHONPATH=$PWD python benchmarks/host_engine.py [--rows 1024] [--output-len 32] [--profile]

1024 requests of 8 prompt tokens, 32 output tokens each, decode blocks of 8 steps, run twice
(the first pass compiles); prints the second pass's host seconds and the steps they covered.
`--profile` adds a cProfile table (which inflates every Python call).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.output_len < 1:
        ap.error(f"--rows and --output-len must be >= 1, got {args.rows}, {args.output_len}")
    from imp_jax import LLM, SamplingParams

    n = args.rows
    llm = LLM("random:tiny", max_model_len=64, max_num_seqs=n, max_num_batched_tokens=1024,
              decode_steps=8, num_pages=n * 5 + 8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, 8).tolist() for _ in range(n)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)  # compiles every program the timed pass uses
    st = llm.engine.stats
    h0, s0 = st["host_time"], st["steps"]
    prof = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    llm.generate(prompts, sp, use_tqdm=False)
    if prof:
        prof.disable()
    print(f"{n} rows x {args.output_len} tokens: wall {time.perf_counter() - t:.2f} s, engine "
          f"host time {st['host_time'] - h0:.3f} s over {st['steps'] - s0} steps")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
