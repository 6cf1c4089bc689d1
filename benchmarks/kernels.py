"""GPU benchmark + correctness check of the paged decode attention kernel.

Compares, on the same card in the same process:
  ours   pallas_kernels.paged_attention_kernel (Pallas Triton, split-K, GQA page reuse)
  peer   jax.experimental.pallas.ops.gpu.paged_attention (deprecated Triton example; needs its
         own [KVH, P, page, D] pool layout, transposed outside the timing)
  ref    pallas_kernels.reference under XLA (gathers the pages, then dense attention)

Timing: each timed jit runs N calls back to back (unrolled, each on a different page table over a
pool large enough that N calls do not fit in L2), warm-up first, then the median of `reps` runs;
time per call = median / N. Achieved bandwidth counts K+V bytes read once (the floor).

  PYTHONPATH=$PWD python benchmarks/kernels.py [--quick] [--out DIR] [--autotune [--cache F]]

--autotune: per case, also run pallas_kernels.autotune.tune over the default candidates plus the
sweep (same looped timing), and store the winner per (device kind, shape bucket) in the autotune
cache ($IMP_JAX_AUTOTUNE_CACHE or ~/.cache/imp_jax/autotune.json; --cache overrides), which the
kernel entry point then uses.

Prints a table last and writes JSON to $OUT (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import (autotune, choose_config, paged_attention_kernel,  # noqa
                            ragged_paged_attention_ref)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jax.experimental.pallas.ops.gpu import paged_attention as peer_mod  # noqa

CEIL_TBS = 2.98
KVH, D, H = 8, 128, 32


def timeit(fn, args, reps):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def rel(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bench_case(B, ctx, page, *, reps, configs, run_ref, run_peer, key, tune=False):
    dtype = jnp.bfloat16
    pages_per_seq = ctx // page
    kv_bytes = 2 * B * ctx * KVH * D * 2
    # Rotate among R page-table sets so the N timed calls stream >= ~1 GB from HBM, not L2.
    R = int(max(1, min(16, math.ceil(1.0e9 / kv_bytes))))
    n_calls = max(R, 4)
    P = R * B * pages_per_seq + 1
    k1, k2, k3, k4 = jax.random.split(key, 4)
    k_pages = jax.random.normal(k1, (P, page, KVH, D), dtype)
    v_pages = jax.random.normal(k2, (P, page, KVH, D), dtype)
    perm = jax.random.permutation(k3, jnp.arange(1, P, dtype=jnp.int32))
    pts = perm.reshape(R, B, pages_per_seq)
    # n_calls distinct page tables (identical calls would be CSE'd by XLA): set i % R, with the
    # sequences rolled by i // R so that every call reads different pages per sequence.
    pts = jnp.stack([jnp.roll(pts[i % R], i // R, axis=0) for i in range(n_calls)])
    q = jax.random.normal(k4, (B, H, D), dtype)
    # ragged: lengths in [ctx/2, ctx], one sequence at exactly ctx
    lens = jax.random.randint(jax.random.fold_in(key, 7), (B,), ctx // 2, ctx + 1).astype(jnp.int32)
    lens = lens.at[0].set(ctx)
    qs = jnp.arange(B + 1, dtype=jnp.int32)
    scale = 1.0 / math.sqrt(D)
    bytes_read = 2 * int(jnp.sum(lens)) * KVH * D * 2
    row = dict(B=B, ctx=ctx, page=page, kv_bytes_floor=bytes_read, pool_rotations=R,
               n_calls=n_calls)

    def looped(call):
        def f(q, kp, vp, pts, lens):
            acc = jnp.zeros((B, H, D), jnp.float32)
            for i in range(n_calls):
                acc = acc + call(q, kp, vp, pts[i], lens).astype(jnp.float32)
            return acc
        return jax.jit(f)

    ref_out = None
    if run_ref:
        ref_call = lambda q, kp, vp, pt, ln: ragged_paged_attention_ref(
            q, kp, vp, pt, ln, qs, max_query_len=1, scale=scale)
        ref_out = ref_call(q, k_pages, v_pages, pts[0], lens)
        t, _ = timeit(looped(ref_call), (q, k_pages, v_pages, pts, lens), reps)
        row["ref_us"] = t / n_calls * 1e6

    best = None
    for cfg_kw in configs:
        cfg = choose_config(B, KVH, H // KVH, 1, pages_per_seq, page, **cfg_kw)
        call = lambda q, kp, vp, pt, ln, cfg=cfg: paged_attention_kernel(
            q, kp, vp, pt, ln, qs, max_query_len=1, scale=scale, config=cfg)
        try:
            out = call(q, k_pages, v_pages, pts[0], lens)
            err = rel(out, ref_out) if ref_out is not None else None
            t, _ = timeit(looped(call), (q, k_pages, v_pages, pts, lens), reps)
        except Exception as e:  # noqa: BLE001 -- report and go on
            print(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        us = t / n_calls * 1e6
        rec = dict(cfg=str(cfg), us=us, tbs=bytes_read / (us * 1e-6) / 1e12, rel_err=err)
        row.setdefault("ours_all", []).append(rec)
        print(f"  B={B} ctx={ctx} page={page} {cfg}: {us:9.1f} us  "
              f"{rec['tbs']:.2f} TB/s  err={err}", flush=True)
        if best is None or us < best["us"]:
            best = dict(rec, out=out)
    if best is not None:
        row.update(ours_us=best["us"], ours_tbs=best["tbs"], ours_cfg=best["cfg"],
                   ours_err=best["rel_err"])

    if tune:
        akey = autotune.make_key(q.shape, k_pages.shape, pts[0].shape, 1, q.dtype)
        cands = autotune.default_candidates(akey)
        cands += [akey.heuristic(**kw) for kw in configs]
        jitted = {}

        def run_fn(cfg):
            if cfg not in jitted:
                jitted[cfg] = looped(lambda q, kp, vp, pt, ln, cfg=cfg: paged_attention_kernel(
                    q, kp, vp, pt, ln, qs, max_query_len=1, scale=scale, config=cfg))
            return jitted[cfg](q, k_pages, v_pages, pts, lens)

        won = autotune.tune(akey, cands, run_fn, reps=reps, calls_per_run=n_calls)
        entry = autotune.load_cache().get(akey.id, {}) if won is not None else {}
        row.update(tuned_key=akey.id, tuned_cfg=str(won), tuned_us=entry.get("us"),
                   tuned_n=len(entry.get("timings_us", {})),
                   tuned_failed=len(entry.get("failed", {})))
        print(f"  autotune {akey.id}: {won} {entry.get('us')} us "
              f"({row['tuned_n']} timed, {row['tuned_failed']} failed) -> {autotune.cache_path()}",
              flush=True)

    if run_peer:
        try:
            kt = jnp.transpose(k_pages, (2, 0, 1, 3))
            vt = jnp.transpose(v_pages, (2, 0, 1, 3))
            ks = 16 if pages_per_seq % 16 == 0 else 1
            # the deprecated kernel applies no softmax scale: fold it into q
            peer_call = lambda q, kp, vp, pt, ln: peer_mod.paged_attention(
                (q * scale).astype(q.dtype), kp, vp, pt, ln, k_splits=ks)
            pout = peer_call(q, kt, vt, pts[0], lens)
            row["peer_err"] = rel(pout, ref_out) if ref_out is not None else (
                rel(pout, best["out"]) if best is not None else None)
            t, _ = timeit(looped(peer_call), (q, kt, vt, pts, lens), reps)
            row["peer_us"] = t / n_calls * 1e6
            row["peer_tbs"] = bytes_read / (t / n_calls) / 1e12
            del kt, vt
        except Exception as e:  # noqa: BLE001
            print(f"  peer failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if "ref_us" in row:
        row["ref_tbs"] = bytes_read / (row["ref_us"] * 1e-6) / 1e12
    del k_pages, v_pages
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--autotune", action="store_true",
                    help="tune each case's shape bucket and save the winner to the autotune cache")
    ap.add_argument("--cache", default=None, help="autotune cache file (default: "
                    "$IMP_JAX_AUTOTUNE_CACHE or ~/.cache/imp_jax/autotune.json)")
    args = ap.parse_args()
    if args.cache:
        os.environ[autotune.CACHE_ENV] = args.cache
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    key = jax.random.PRNGKey(0)

    sweep = [dict(), dict(prefetch_pages=False), dict(num_stages=3),
             dict(num_stages=3, prefetch_pages=False), dict(target_programs=1056)]
    sweep_small = [dict(), dict(prefetch_pages=False), dict(num_stages=3),
                   dict(num_stages=3, prefetch_pages=False),
                   dict(target_programs=1056, num_stages=3),
                   dict(target_programs=2112, block_k_tokens=32)]
    if args.quick:
        cases = [(8, 2048, 16), (1, 4096, 16)]
        sweep = sweep[:2]
    else:
        cases = [(B, ctx, 16) for ctx in (1024, 4096, 16384, 32768) for B in (1, 8, 64, 256)]
        cases += [(8, 4096, 32), (8, 4096, 64), (64, 4096, 32), (64, 4096, 64), (1, 32768, 64)]
        cases = [(1, 64, 16)] + cases          # fixed per-call overhead (KV is 256 KB)
    rows = []
    for (B, ctx, page) in cases:
        kv = 2 * B * ctx * KVH * D * 2
        if kv > 20e9:
            print(f"skip B={B} ctx={ctx}: KV {kv/1e9:.0f} GB", flush=True)
            continue
        key, sub = jax.random.split(key)
        t0 = time.time()
        small = B * KVH < 132
        configs = sweep_small if (small and not args.quick) else sweep
        row = bench_case(B, ctx, page, reps=args.reps, configs=configs,
                         run_ref=kv <= 2.2e9, run_peer=kv <= 9e9, key=sub, tune=args.autotune)
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "kernels_bench.json"), "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)

    if args.autotune:
        print(f"\nautotune cache: {autotune.cache_path()}")
        for r in rows:
            print(f"  {r.get('tuned_key')}: {r.get('tuned_cfg')} {r.get('tuned_us')} us")
    print("\n| B | ctx | page | KV MB | ours us | ours TB/s | %ceil | peer us | peer TB/s | "
          "ref us | ref TB/s | err ours | best cfg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x, p=1: "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))
    for r in rows:
        print(f"| {r['B']} | {r['ctx']} | {r['page']} | {r['kv_bytes_floor']/1e6:.0f} | "
              f"{f(r.get('ours_us'))} | {f(r.get('ours_tbs'), 2)} | "
              f"{f(None if r.get('ours_tbs') is None else 100 * r['ours_tbs'] / CEIL_TBS, 0)} | "
              f"{f(r.get('peer_us'))} | {f(r.get('peer_tbs'), 2)} | {f(r.get('ref_us'))} | "
              f"{f(r.get('ref_tbs'), 2)} | {f(r.get('ours_err'), 4)} | "
              f"{(r.get('ours_cfg') or '-').replace('KernelConfig', '')} |")


if __name__ == "__main__":
    main()
