"""Where a decode step's time goes, on the GPU: host + dispatch, device step, matmul floor.

    python benchmarks/decode_breakdown.py --shape llama3-8b --batch 1,64 --context 1024

Prints, per batch size: the engine's single-step time, the multi-step (decode_steps) per-token
time, the device-only step time (steps chained without host syncs), the same with the jnp
reference attention, and the weight-matmul floor (the same GEMVs alone).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.presets import SHAPES
from imp_jax.cache import KVCache
from imp_jax.runner import ModelRunner, StepSeq
from imp_jax.sampling import SamplingParams, SamplingTensors
from imp_jax.spec import init_params, param_bytes


def median_time(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    wbytes = param_bytes(cfg, 2)
    rows = []
    for impl in ("pallas", "reference"):
        for b in [int(x) for x in args.batch.split(",")]:
            page = 16
            pages_per_seq = -(-(args.context + args.steps * 4 + 8) // page)
            runner = ModelRunner(cfg, params, num_pages=b * pages_per_seq + 1, page_size=page,
                                 max_model_len=pages_per_seq * page, dtype=jnp.bfloat16,
                                 attn_impl=impl, max_num_seqs=max(b, 4))
            seqs = [StepSeq([1], args.context, list(range(1 + i * pages_per_seq,
                                                          1 + (i + 1) * pages_per_seq)))
                    for i in range(b)]
            st = SamplingTensors.from_params([SamplingParams(temperature=0)] * b, [0] * b,
                                             [0] * b)

            def single():
                np.asarray(runner.step(seqs, st).sample.tokens)

            t_single = median_time(single)
            row = dict(impl=impl, batch=b, context=args.context, single_step_ms=t_single * 1e3)
            if impl == "pallas":
                def block():
                    np.asarray(runner.decode_steps(seqs, st, args.steps).tokens)

                row["multi_step_ms_per_token"] = median_time(block, iters=10) / args.steps * 1e3

            # device-only: chain steps on the device, sync once at the end
            res = [None]

            def chained(n=10):
                for _ in range(n):
                    res[0] = runner.step(seqs, st)
                jax.block_until_ready(res[0].sample.tokens)

            row["chained_step_ms"] = median_time(chained, iters=5) / 10 * 1e3
            kv = b * args.context * KVCache.bytes_per_token(cfg, jnp.bfloat16)
            row["bytes_per_step_GB"] = (wbytes + kv) / 1e9
            row["chained_TB_s"] = (wbytes + kv) / (row["chained_step_ms"] / 1e3) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
            del runner

    # matmul floor: every weight matrix once, as in a decode step, M = batch
    from imp_jax.spec import map_specs, param_specs

    mats = []
    map_specs(lambda path, spec: mats.append((path, spec)) if spec.contract else None,
              param_specs(cfg))
    ws = []
    for path, spec in mats:
        w = params
        for k in path:
            w = w[k]
        k = len(spec.contract)
        ws.append(w.reshape(int(np.prod(w.shape[:k])), -1))
    floor_bytes = sum(w.size * 2 for w in ws)
    for b in [int(x) for x in args.batch.split(",")]:
        xs = {n: jax.random.normal(jax.random.key(n), (b, n), jnp.bfloat16)
              for n in {w.shape[0] for w in ws}}

        @jax.jit
        def gemvs(xs, ws):
            return sum(jnp.sum(jnp.dot(xs[w.shape[0]], w, preferred_element_type=jnp.float32))
                       for w in ws)

        t = median_time(lambda: gemvs(xs, ws).block_until_ready())
        row = dict(impl="matmul-floor", batch=b, ms=t * 1e3, TB_s=floor_bytes / t / 1e12)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
