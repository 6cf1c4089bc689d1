"""GPU benchmark + correctness check of the paged decode attention kernel.

Compares, on the same card in the same process:
  ours   pallas_kernels.paged_attention_kernel (Pallas Triton, split-K, GQA page reuse)
  mgpu   pallas_kernels.decode_mgpu.paged_decode_mgpu (Pallas Mosaic GPU: TMA page gathers into a
         deep SMEM ring by a producer warpgroup, wgmma; bf16 pages only)
  peer   jax.experimental.pallas.ops.gpu.paged_attention (deprecated Triton example; needs its
         own [KVH, P, page, D] pool layout, transposed outside the timing; it also takes
         per-token scales, as [KVH, P, page])
  ref    pallas_kernels.reference under XLA (gathers the pages, then dense attention)

KV page dtypes (`--kv`, default all three): bf16; fp8 (float8_e4m3fn) and int8 pages with one
float32 scale per token and KV head (imp_jax/cache.py's layout). Bytes counted per token and KV
head: D * 2 for bf16, D * 1 + 4 for the 8-bit pools (values + scale), K and V.

Timing: each timed jit runs N calls back to back (unrolled, each on a different page table over a
pool large enough that N calls do not fit in L2), warm-up first, then the median of `reps` runs;
time per call = median / N. N = enough calls to stream ~32 GB, at least 4 and at most 64 (30 at
64 x 4096, 64 at 8 x 2048): per-call figures fall as N grows (session 16, H200: 64 x 4096
295.4 -> 243.8 us from 4 to 16 calls, 8 x 2048 37.3 -> 30.1 us from 15 to 64; the peer's
likewise): a per-run cost outside the kernels (session 17's profiles show them back to back,
with no gaps), i.e. the run's host side. Small shapes capped at 64 calls still carry some of it;
--trace DIR adds the kernel-only figure (device time per call from one profiled run). Achieved
bandwidth counts K+V bytes read once (the floor).

  PYTHONPATH=$PWD python benchmarks/kernels.py [--reps 10] [--full | --quick] [--kv bf16,fp8]
      [--budget-s S] [--out DIR] [--autotune [--cache F]] [--smoke]
      [--shapes 1024x256,64x1024] [--mgpu-sweep] [--mgpu-only]
      [--mgpu-configs '[{}, {"block_kv": 64, "num_stages": 3}]'] [--rounds 5]

--quick: bf16 only, B in {1, 8, 64} x ctx {1k, 2k, 4k, 16k} (B=8 x 2k first, with the whole
mgpu config sweep), each kernel's default config plus one alternative for mgpu, the reference as
a correctness check only (not timed); 150 s budget by default. --mgpu-only: skip the Triton
kernel ("ours") and time mgpu against the peer. --mgpu-configs: these decode_mgpu.choose_config
overrides instead of the mode's list. --rounds N: each mgpu config timed N times, interleaved
with the others, reported as its median round (single passes disagreed by 30-50%).

Default: a sweep sized to finish in under ~3 minutes on an H100 (B=8 x ctx 2048 vs the
deprecated kernel first, then the small-batch rows, then the rest), guarded by --budget-s
(150 s by default: cases left when it runs out are listed as skipped). --full: the whole table
of docs/kernels_notes.md x 3 dtypes and the full config sweep (no budget unless given).
--smoke (automatic without a GPU): tiny shapes in Pallas interpret mode on CPU, to check the
harness and the numerics, not speed.

--autotune: per case, also run pallas_kernels.autotune.tune over the default candidates plus the
sweep (same looped timing), for the Triton kernel and (bf16 pages) decode_mgpu, and store each
winner per (kernel, device kind, shape bucket, KV dtype) in the autotune cache ($IMP_JAX_AUTOTUNE_CACHE or ~/.cache/imp_jax/autotune.json; --cache overrides).

Prints a table last and writes JSON to $OUT (or --out) after every case.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# GPU interpret mode (--smoke's mgpu rows) runs each warpgroup on the XLA CPU client's thread
# pool; on a small machine that pool starves and the kernel hangs (tests/test_flash_prefill.py).
os.environ.setdefault("NPROC", str(max(16, os.cpu_count() or 1)))
from pallas_kernels import decode_mgpu  # noqa: E402
from pallas_kernels import (autotune, choose_config, paged_attention_kernel,  # noqa
                            ragged_paged_attention_ref)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jax.experimental.pallas.ops.gpu import paged_attention as peer_mod  # noqa

CEIL_TBS = 2.98
KVH, D, H = 8, 128, 32
KV_DTYPES = {"bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn, "int8": jnp.int8}


def peer_kwargs(pages_per_seq: int, page: int, kv: str = "bf16") -> dict:
    """The deprecated kernel's launch options, as every benchmark here runs it: 16 k-splits
    where the pages divide, and at most 64 KB of K per compute block. Its default block (8
    pages, capped at a split's pages) is 512 keys for pages of 64 once a split holds 8 of them
    (1 x 32k, 64 x 16k), which overflows SMEM on an H200 with bf16 pages (session 17); 256 bf16
    keys is the largest block that ran at pages of 64, and 8-bit pages and pages of 16 keep the
    default."""
    itemsize = 2 if kv == "bf16" else 1
    return dict(k_splits=16 if pages_per_seq % 16 == 0 else 1,
                pages_per_compute_block=min(8, max(1, 65536 // (page * D * itemsize))))


def kv_bytes_per_token_head(kv: str) -> int:
    """Bytes of one token's K (or V) for one KV head: values, plus the f32 scale if 8-bit."""
    return D * jnp.dtype(KV_DTYPES[kv]).itemsize + (0 if kv == "bf16" else 4)


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


def make_pools(key, P, page, kv):
    """K/V pools [P, page, KVH, D] (+ f32 scales [P, KVH, page] for 8-bit pools).

    8-bit pools repeat a random block of <= 4096 pages (the timing reads addresses, not values;
    this keeps the random generation's temporaries small for pools of many GB)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if kv == "bf16":
        return (jax.random.normal(k1, (P, page, KVH, D), jnp.bfloat16),
                jax.random.normal(k2, (P, page, KVH, D), jnp.bfloat16), {})
    nb = min(P, 4096)
    rep = jnp.arange(P, dtype=jnp.int32) % nb

    def values(k):
        if kv == "int8":
            base = jax.random.randint(k, (nb, page, KVH, D), -127, 128, jnp.int8)
        else:
            base = jnp.clip(jax.random.normal(k, (nb, page, KVH, D), jnp.float32) * 64,
                            -448, 448).astype(KV_DTYPES[kv])
        return base[rep]

    top = 127.0 if kv == "int8" else 64.0
    scales = lambda k: jax.random.uniform(k, (P, KVH, page), jnp.float32, 0.5, 1.5) / top  # noqa
    return values(k1), values(k2), dict(k_scale=scales(k3), v_scale=scales(k4))


TRACE_DIR = None  # --trace


def bench_case(B, ctx, page, kv, *, reps, configs, run_ref, run_peer, key, tune=False,
               interpret=False, max_calls=16, deadline=None, mgpu_configs=(), rounds=1,
               calls=None):
    pages_per_seq = ctx // page
    kv_bytes = 2 * B * ctx * KVH * kv_bytes_per_token_head(kv)
    # Rotate among R page-table sets so the N timed calls stream >= ~1 GB from HBM, not L2.
    R = int(max(1, min(max(max_calls, calls or 0), math.ceil(1.0e9 / kv_bytes))))
    # A timed run carries a per-run cost beside its calls (session 16, H200: fitting
    # T = F + N * c to runs of 4 / 16 and 15 / 64 calls gives F ~50-570 us by row), so a run
    # makes enough calls to stream ~32 GB (~8 ms of HBM time), at least 4 and at most
    # max_calls (small shapes stay short of it); --calls N overrides.
    n_calls = (max(R, min(max_calls, max(4, math.ceil(32e9 / kv_bytes)))) if calls is None
               else max(R, calls))
    P = R * B * pages_per_seq + 1
    kp_key, k3, k4 = jax.random.split(key, 3)
    k_pages, v_pages, scales = make_pools(kp_key, P, page, kv)
    perm = jax.random.permutation(k3, jnp.arange(1, P, dtype=jnp.int32))
    pts = perm.reshape(R, B, pages_per_seq)
    # n_calls page tables: set i % R, with the sequences (and each sequence's pages, for B = 1)
    # rolled by i // R, so that consecutive calls read different pages per sequence instead of
    # what the last call left in L2.
    pts = jnp.stack([jnp.roll(pts[i % R], (i // R, i // R), axis=(0, 1))
                     for i in range(n_calls)])
    q = jax.random.normal(k4, (B, H, D), jnp.bfloat16)
    # ragged: lengths in [ctx/2, ctx], one sequence at exactly ctx
    lens = jax.random.randint(jax.random.fold_in(key, 7), (B,), ctx // 2, ctx + 1).astype(jnp.int32)
    lens = lens.at[0].set(ctx)
    qs = jnp.arange(B + 1, dtype=jnp.int32)
    scale = 1.0 / math.sqrt(D)
    bytes_read = 2 * int(jnp.sum(lens)) * KVH * kv_bytes_per_token_head(kv)
    row = dict(B=B, ctx=ctx, page=page, kv=kv, kv_bytes_floor=bytes_read,
               floor_us=bytes_read / (CEIL_TBS * 1e12) * 1e6, pool_rotations=R, n_calls=n_calls)
    sc = scales  # {} for bf16

    def looped(call, keep_all=False):
        """n_calls calls in one jit, summed (keep_all: every output returned, so a profiled
        run holds the kernels under test and nothing of the loop's own)."""
        def f(q, kp, vp, pts, lens, sc):
            outs = [call(q, kp, vp, pts[i], lens, sc) for i in range(n_calls)]
            return outs if keep_all else sum(o.astype(jnp.float32) for o in outs)
        return jax.jit(f)

    def traced(prefix, call, args):
        """--trace: the kernels' device time per call from one profiled run (kernel-only, as
        Nsight Compute's durations; the wall-clock figure also holds the run's host side)."""
        if not TRACE_DIR or interpret:
            return
        got = trace_summary.device_time(looped(call, keep_all=True), args, n_calls,
                                        os.path.join(TRACE_DIR, f"{prefix}{B}x{ctx}x{page}{kv}"))
        if got:
            row[f"{prefix}dev_us"], row[f"{prefix}dev_span_us"] = got
            print(f"  B={B} ctx={ctx} page={page} kv={kv} {prefix}device: {got[0]:.1f} us of "
                  f"kernels, {got[1]:.1f} us span per call", flush=True)

    compiled = {}  # (kernel, config) -> its looped jit: the sweep's compile is the tuner's too

    def looped_config(kind, cfg, make_call):
        if (kind, cfg) not in compiled:
            compiled[kind, cfg] = looped(make_call(cfg))
        return compiled[kind, cfg]

    def tune_bucket(prefix, akey, cands, kind, make_call):
        """autotune.tune over cands with the sweep's looped timing; results into row."""
        won = autotune.tune(akey, cands, lambda cfg: looped_config(kind, cfg, make_call)(
            q, k_pages, v_pages, pts, lens, sc), reps=reps, calls_per_run=n_calls)
        entry = autotune.load_cache().get(akey.id, {}) if won is not None else {}
        row.update({f"{prefix}tuned_key": akey.id, f"{prefix}tuned_cfg": str(won),
                    f"{prefix}tuned_us": entry.get("us"),
                    f"{prefix}tuned_n": len(entry.get("timings_us", {})),
                    f"{prefix}tuned_failed": len(entry.get("failed", {}))})
        print(f"  autotune {akey.id}: {won} {entry.get('us')} us "
              f"({row[prefix + 'tuned_n']} timed, {row[prefix + 'tuned_failed']} failed) -> "
              f"{autotune.cache_path()}", flush=True)

    ref_out = None
    if run_ref:
        ref_call = lambda q, kp, vp, pt, ln, sc: ragged_paged_attention_ref(  # noqa: E731
            q, kp, vp, pt, ln, qs, max_query_len=1, scale=scale, **sc)
        ref_out = jax.jit(ref_call)(q, k_pages, v_pages, pts[0], lens, sc)
        if run_ref == "time":
            t, _ = timeit(looped(ref_call), (q, k_pages, v_pages, pts, lens, sc), reps)
            row["ref_us"] = t / n_calls * 1e6

    def ours(cfg):
        return lambda q, kp, vp, pt, ln, sc: paged_attention_kernel(
            q, kp, vp, pt, ln, qs, max_query_len=1, scale=scale, config=cfg,
            interpret=interpret, **sc)

    def record(key, label, cfg, t, err):
        """One timed config of a kernel: appended to row[key + "_all"] and printed."""
        us = t / n_calls * 1e6
        rec = dict(cfg=str(cfg), us=us, tbs=bytes_read / (us * 1e-6) / 1e12, rel_err=err)
        row.setdefault(f"{key}_all", []).append(rec)
        print(f"  B={B} ctx={ctx} page={page} kv={kv} {label}{cfg}: {us:9.1f} us  "
              f"{rec['tbs']:.2f} TB/s  err={err}", flush=True)
        return rec

    best, first_out, seen = None, None, set()
    for cfg_kw in configs:
        if best is not None and deadline is not None and time.time() > deadline:
            row["configs_cut_by_budget"] = True
            break
        cfg = choose_config(B, KVH, H // KVH, 1, pages_per_seq, page, **cfg_kw)
        if cfg in seen:
            continue
        seen.add(cfg)
        call = ours(cfg)
        err = None
        try:
            if first_out is None:     # numerics once per case (one compile less per config)
                first_out = jax.jit(call)(q, k_pages, v_pages, pts[0], lens, sc)
                err = rel(first_out, ref_out) if ref_out is not None else None
                row["ours_err"] = err
            t, _ = timeit(looped_config("ours", cfg, ours), (q, k_pages, v_pages, pts, lens, sc),
                          reps)
        except Exception as e:  # noqa: BLE001 -- report and go on
            print(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rec = record("ours", "", cfg, t, err)
        if best is None or rec["us"] < best["us"]:
            best = rec
    if best is not None:
        row.update(ours_us=best["us"], ours_tbs=best["tbs"], ours_cfg=best["cfg"])

    if tune and configs:  # the Triton kernel's bucket (not under --mgpu-only)
        akey = autotune.make_key(q.shape, k_pages.shape, pts[0].shape, 1, q.dtype,
                                 kv_dtype=k_pages.dtype)
        cands = autotune.default_candidates(akey) + [akey.heuristic(**kw) for kw in configs]
        tune_bucket("", akey, cands, "ours", ours)

    # The Mosaic GPU decode kernel (bf16 pages, and fp8 pages with their scales): same
    # correctness check, then timed.
    mgpu_ok = decode_mgpu.supported(q.shape, k_pages.shape, q.dtype, 1, k_dtype=k_pages.dtype,
                                    k_scale=sc.get("k_scale"))
    kv_itemsize = k_pages.dtype.itemsize

    def mgpu(cfg):
        return lambda q, kp, vp, pt, ln, sc: decode_mgpu.paged_decode_mgpu(
            q, kp, vp, pt, ln, qs, scale=scale, config=cfg, interpret=interpret, **sc)
    mbest, mbest_cfg, mseen, timed = None, None, set(), []
    for cfg_kw in (mgpu_configs if mgpu_ok else ()):
        if timed and deadline is not None and time.time() > deadline:
            row["mgpu_configs_cut_by_budget"] = True
            break
        kw = dict(cfg_kw)
        mult = kw.pop("splits_mult", None)
        mcfg = decode_mgpu.choose_config(B, KVH, pages_per_seq, page, D,
                                         kv_itemsize=kv_itemsize, **kw)
        if mult is not None:
            mcfg = decode_mgpu.choose_config(B, KVH, pages_per_seq, page, D,
                                             num_splits=mcfg.num_splits * mult,
                                             kv_itemsize=kv_itemsize, **kw)
        if mcfg in mseen:
            continue
        mseen.add(mcfg)
        mcall = mgpu(mcfg)
        try:
            mout = jax.jit(mcall)(q, k_pages, v_pages, pts[0], lens, sc)
            merr = rel(mout, ref_out) if ref_out is not None else (
                rel(mout, first_out) if first_out is not None else None)
            if merr is not None and not merr < 2e-2:
                raise AssertionError(f"mgpu {mcfg}: rel err {merr} vs the reference")
            t, _ = timeit(looped_config("mgpu", mcfg, mgpu), (q, k_pages, v_pages, pts, lens, sc),
                          reps)
        except Exception as e:  # noqa: BLE001 -- report and go on
            print(f"  mgpu {mcfg} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            row.setdefault("mgpu_failed", []).append(f"{mcfg}: {type(e).__name__}: "
                                                     f"{str(e)[:200]}")
            continue
        rec = record("mgpu", "mgpu ", mcfg, t, merr)
        timed.append((rec, mcfg))
    # --rounds: every timed config again, interleaved (A B C A B C ...), so that a slow spell of
    # the machine (single passes of one shape disagreed by 30-50%, session 16) lands on all of
    # them; each config's figure is then the median of its rounds.
    for r in range(1, rounds):
        for rec, mcfg in timed:
            try:
                t, _ = timeit(looped_config("mgpu", mcfg, mgpu),
                              (q, k_pages, v_pages, pts, lens, sc), reps)
            except Exception as e:  # noqa: BLE001 -- keep the rounds it has
                print(f"  mgpu {mcfg} round {r} failed: {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
                continue
            rec.setdefault("rounds_us", [rec["us"]]).append(t / n_calls * 1e6)
    for rec, mcfg in timed:
        if "rounds_us" in rec:
            rec["us"] = statistics.median(rec["rounds_us"])
            rec["tbs"] = bytes_read / (rec["us"] * 1e-6) / 1e12
            print(f"  B={B} ctx={ctx} page={page} kv={kv} mgpu {mcfg}: median {rec['us']:.1f} us "
                  f"of rounds {[round(u, 1) for u in rec['rounds_us']]}", flush=True)
        if mbest is None or rec["us"] < mbest["us"]:
            mbest, mbest_cfg = rec, mcfg
    if mbest is not None:
        row.update(mgpu_us=mbest["us"], mgpu_tbs=mbest["tbs"], mgpu_cfg=mbest["cfg"],
                   mgpu_err=mbest["rel_err"])
        traced("mgpu_", mgpu(mbest_cfg), (q, k_pages, v_pages, pts, lens, sc))
    if tune and mgpu_ok and mgpu_configs and not interpret:  # decode_mgpu's own bucket
        mkey = autotune.make_key(q.shape, k_pages.shape, pts[0].shape, 1, q.dtype,
                                 kv_dtype=k_pages.dtype, kernel="mgpu")
        tune_bucket("mgpu_", mkey, autotune.default_candidates(mkey) + list(mseen), "mgpu", mgpu)

    if run_peer:
        try:
            kt = jnp.transpose(k_pages, (2, 0, 1, 3))
            vt = jnp.transpose(v_pages, (2, 0, 1, 3))
            pscales = {k: jnp.transpose(v, (1, 0, 2)) for k, v in sc.items()}  # [KVH, P, page]
            pkw = peer_kwargs(pages_per_seq, page, kv)
            # the deprecated kernel applies no softmax scale: fold it into q
            peer_call = lambda q, kp, vp, pt, ln, psc: peer_mod.paged_attention(  # noqa: E731
                (q * scale).astype(q.dtype), kp, vp, pt, ln, psc.get("k_scale"),
                psc.get("v_scale"), **pkw)
            row["peer_pages_per_compute_block"] = pkw["pages_per_compute_block"]
            pout = jax.jit(peer_call)(q, kt, vt, pts[0], lens, pscales)
            row["peer_err"] = rel(pout, ref_out) if ref_out is not None else (
                rel(pout, first_out) if first_out is not None else None)
            t, _ = timeit(looped(peer_call), (q, kt, vt, pts, lens, pscales), reps)
            row["peer_us"] = t / n_calls * 1e6
            row["peer_tbs"] = bytes_read / (t / n_calls) / 1e12
            traced("peer_", peer_call, (q, kt, vt, pts, lens, pscales))
            del kt, vt
        except Exception as e:  # noqa: BLE001
            print(f"  peer failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if "peer_us" in row and "mgpu_us" in row:
        row["peer_over_mgpu"] = row["peer_us"] / row["mgpu_us"]
    if "peer_dev_us" in row and "mgpu_dev_us" in row:
        row["peer_over_mgpu_dev"] = row["peer_dev_us"] / row["mgpu_dev_us"]
        print(f"  B={B} ctx={ctx} page={page} kv={kv} kernel-only: peer / mgpu = "
              f"{row['peer_over_mgpu_dev']:.2f}", flush=True)
    if "ref_us" in row:
        row["ref_tbs"] = bytes_read / (row["ref_us"] * 1e-6) / 1e12
    del k_pages, v_pages
    return row


# Default sweep, in priority order (the budget cuts from the end): B=8 x 2k vs the deprecated
# kernel (shared/GPU.md measured it at 73 us), the small-batch fixed cost, then the rest.
DEFAULT_SHAPES = [(8, 2048, 16), (1, 64, 16), (1, 1024, 16), (8, 1024, 16), (64, 1024, 16),
                  (1, 4096, 16), (8, 4096, 16), (64, 4096, 16), (1, 16384, 16), (8, 16384, 16),
                  (256, 4096, 16), (1, 32768, 16)]
FULL_SHAPES = ([(8, 2048, 16), (1, 64, 16)]
               + [(B, ctx, 16) for ctx in (1024, 4096, 16384, 32768) for B in (1, 8, 64, 256)]
               + [(8, 4096, 32), (8, 4096, 64), (64, 4096, 32), (64, 4096, 64), (1, 32768, 64)])
# --quick: bf16, B in {1, 8, 64} x ctx {1k, 2k, 4k, 16k}; the B=8 x 2k row first.
QUICK_SHAPES = [(8, 2048, 16)] + [(B, ctx, 16) for ctx in (1024, 2048, 4096, 16384)
                                  for B in (1, 8, 64) if (B, ctx) != (8, 2048)]
SMOKE_SHAPES = [(2, 64, 16), (2, 256, 16)]
SMOKE_SWEEP = [dict(), dict(num_splits=2, block_k_tokens=32)]   # one split; split-K + combine

FULL_SWEEP = [dict(), dict(prefetch_pages=False), dict(num_stages=3),
              dict(num_stages=3, prefetch_pages=False), dict(target_programs=1056)]
FULL_SWEEP_SMALL = [dict(), dict(prefetch_pages=False), dict(num_stages=3),
                    dict(num_stages=3, prefetch_pages=False),
                    dict(target_programs=1056, num_stages=3),
                    dict(target_programs=2112, block_k_tokens=32)]
SWEEP = [dict(), dict(num_stages=3), dict(prefetch_pages=False)]
SWEEP_SMALL = [dict(), dict(num_stages=3), dict(target_programs=1056, num_stages=3)]
# decode_mgpu.choose_config overrides ("splits_mult": the heuristic's split count times that).
# 64-key blocks in 2-3 stages fit two CTAs per SM (e4m3 pages too: ~100 KB with the converted
# tiles), so one CTA's conversion can overlap another's loads.
MGPU_SWEEP = [dict(), dict(fp8_qk=True), dict(fp8_qk=False),
              # two KV heads per CTA (two consumer warpgroups, one producer; session 7)
              # (at D=128 SMEM allows 64-key blocks in 2 stages; 3 at D=64 or with fp8_qk)
              dict(block_kv=64, num_stages=3, heads_per_cta=2, fp8_qk=False),
              dict(block_kv=64, num_stages=3, heads_per_cta=2, fp8_qk=True),
              dict(block_kv=128, num_stages=3, fp8_qk=False),
              dict(block_kv=128, num_stages=3, fp8_qk=True),
              dict(block_kv=64, num_stages=6), dict(block_kv=64, num_stages=2),
              dict(block_kv=64, num_stages=3), dict(splits_mult=2), dict(num_splits=1),
              dict(num_splits=1, block_kv=128, num_stages=3),
              dict(block_kv=64, num_stages=4, fp8_qk=True), dict(f16_v=False)]
# fp8_qk (8-bit pages: Q K^T as e4m3 wgmmas on the K tile) and f16_v (P V in f16, V cast
# only) are ignored on bf16 pages.
MGPU_DEFAULT = [dict(), dict(f16_v=False), dict(block_kv=128, num_stages=3, heads_per_cta=1),
                dict(block_kv=64, num_stages=6, heads_per_cta=1),
                dict(fp8_qk=False)]     # the heuristic, bf16 P V, two one-head rings, converting K
MGPU_QUICK = [dict(), dict(block_kv=128, num_stages=3)]
MGPU_SMOKE = [dict(), dict(num_splits=2)]        # one split (direct store); split-K + combine


def parse_mgpu_configs(ap, text):
    """--mgpu-configs: a JSON list of dicts of choose_config keywords (or splits_mult)."""
    if text is None:
        return None
    allowed = set(inspect.signature(decode_mgpu.choose_config).parameters) - {
        "S", "KVH", "max_pages", "page_size", "D", "kv_itemsize", "num_sms"} | {"splits_mult"}
    try:
        configs = json.loads(text)
    except json.JSONDecodeError as e:
        ap.error(f"--mgpu-configs {text!r}: not JSON ({e})")
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        ap.error(f"--mgpu-configs {text!r}: expected a JSON list of objects")
    for c in configs:
        if bad := sorted(set(c) - allowed):
            ap.error(f"--mgpu-configs: unknown keys {bad}; allowed: {sorted(allowed)}")
    return configs


def main():
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--smoke", action="store_true",
                      help="tiny shapes, Pallas interpret mode (the default without a GPU)")
    ap.add_argument("--kv", default=None, help="comma list of bf16, fp8, int8 (default: all "
                    "three; --quick: bf16)")
    ap.add_argument("--mgpu-only", action="store_true",
                    help="skip our Triton kernel; time the Mosaic GPU kernel vs the peer")
    ap.add_argument("--no-mgpu", action="store_true", help="skip the Mosaic GPU kernel")
    ap.add_argument("--shapes", default=None,
                    help="comma list of BATCHxCTX[xPAGE] (page 16 unless given), e.g. "
                         "1024x256,256x2048x64: these cases instead of the mode's table")
    ap.add_argument("--mgpu-sweep", action="store_true",
                    help="every case: the whole Mosaic GPU config sweep (MGPU_SWEEP)")
    ap.add_argument("--mgpu-configs", default=None, metavar="JSON",
                    help='the Mosaic GPU configs to time instead of the mode\'s list: a JSON '
                         'list of choose_config overrides, e.g. \'[{}, {"block_kv": 64, '
                         '"num_stages": 2, "num_splits": 4}]\'')
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the Mosaic GPU configs this many times, interleaved; each "
                         "config's figure is the median of its rounds")
    ap.add_argument("--calls", type=int, default=None,
                    help="calls per timed run (default: enough to stream ~32 GB, 4 to 64); "
                         "more calls spread a run's own cost thinner")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting cases after this many seconds (default 150, --full: "
                         "none)")
    ap.add_argument("--autotune", action="store_true",
                    help="tune each case's shape bucket and save the winner to the autotune cache")
    ap.add_argument("--cache", default=None, help="autotune cache file (default: "
                    "$IMP_JAX_AUTOTUNE_CACHE or ~/.cache/imp_jax/autotune.json)")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="also profile one run of the best Mosaic GPU config and of the peer "
                         "into DIR: their device time per call (kernel-only, *_dev_us)")
    args = ap.parse_args()
    global TRACE_DIR
    TRACE_DIR = args.trace
    given_configs = parse_mgpu_configs(ap, args.mgpu_configs)
    if args.calls is not None and args.calls < 1:
        ap.error(f"--calls {args.calls}: must be >= 1")
    t_start = time.time()
    if args.cache:
        os.environ[autotune.CACHE_ENV] = args.cache
    if args.kv is None:
        args.kv = "bf16" if args.quick else "bf16,fp8,int8"
    kvs = [k.strip() for k in args.kv.split(",") if k.strip()]
    bad = [k for k in kvs if k not in KV_DTYPES]
    if bad:
        ap.error(f"--kv: unknown {bad}; choose from {list(KV_DTYPES)}")
    smoke = args.smoke or jax.default_backend() != "gpu"
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__,
          "(smoke: interpret mode)" if smoke else "", flush=True)
    key = jax.random.PRNGKey(0)

    if smoke:
        shapes, reps, max_calls = SMOKE_SHAPES, 1, 2
        budget = args.budget_s
    elif args.quick:
        shapes, reps, max_calls = QUICK_SHAPES, min(args.reps, 10), 64
        budget = 150.0 if args.budget_s is None else args.budget_s
    elif args.full:
        shapes, reps, max_calls = FULL_SHAPES, args.reps, 64
        budget = args.budget_s
    else:
        shapes, reps, max_calls = DEFAULT_SHAPES, args.reps, 64
        budget = 150.0 if args.budget_s is None else args.budget_s
    if args.shapes:
        try:
            shapes = []
            for x in filter(None, (x.strip() for x in args.shapes.lower().split(","))):
                b, c, *p = (int(v) for v in x.split("x"))
                if len(p) > 1:
                    raise ValueError(x)
                shapes.append((b, c, p[0] if p else 16))
        except ValueError:
            ap.error(f"--shapes {args.shapes!r}: expected BATCHxCTX[xPAGE],... "
                     "(e.g. 1024x256,256x2048x64)")
        if not shapes or any(b < 1 or p < 1 or c < p or c % p for b, c, p in shapes):
            ap.error(f"--shapes {args.shapes!r}: batch >= 1, page >= 1, context a multiple "
                     "of the page (page 16 unless given)")
    deadline = None if budget is None else t_start + budget
    cases = [(B, ctx, page, kv) for (B, ctx, page) in shapes for kv in kvs]

    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "kernels_bench.json")
    rows, skipped = [], []

    def dump():
        with open(out_path, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           date=time.strftime("%Y-%m-%d"), smoke=smoke, reps=reps,
                           budget_s=budget, wall_s=time.time() - t_start, rows=rows,
                           skipped=skipped), f, indent=1)

    for (B, ctx, page, kv) in cases:
        kv_bf16 = 2 * B * ctx * KVH * D * 2          # size classes as for the bf16 pool
        if kv_bf16 > 20e9:
            print(f"skip B={B} ctx={ctx}: KV {kv_bf16/1e9:.0f} GB", flush=True)
            continue
        if deadline is not None and time.time() > deadline:
            skipped.append(dict(B=B, ctx=ctx, page=page, kv=kv, why="budget"))
            continue
        key, sub = jax.random.split(key)
        t0 = time.time()
        small = B * KVH < 132
        if smoke:
            configs = SMOKE_SWEEP
        elif args.quick:
            configs = SWEEP[:1]
        elif args.full:
            configs = FULL_SWEEP_SMALL if small else FULL_SWEEP
        else:
            configs = (SWEEP_SMALL if small else SWEEP)[: 3 if kv == "bf16" else 2]
        # The XLA reference: error check always (when it fits); timed for bf16 rows only.
        run_ref = (("time" if kv == "bf16" else "check") if kv_bf16 <= 2.2e9 else False)
        if args.quick and run_ref:
            run_ref = "check"
        if args.mgpu_only:
            configs = []
        if args.no_mgpu:
            mgpu_configs = []
        elif smoke:
            mgpu_configs = MGPU_SMOKE
        elif args.full or args.mgpu_sweep or (B, ctx) == (8, 2048):  # headline row: all
            mgpu_configs = MGPU_SWEEP
        elif args.quick:
            mgpu_configs = MGPU_QUICK
        else:
            mgpu_configs = MGPU_DEFAULT
        if args.mgpu_configs is not None and not args.no_mgpu:
            mgpu_configs = given_configs
        # Beside the deprecated peer on 1024 x 2048 e4m3 pages an illegal address surfaced (in
        # XLA's autotuner, compiling the peer's program) and poisoned the process for every
        # later case (H200, session 13): the peer is not run on 8-bit pages at B >= 1024.
        peer = (not smoke) and kv_bf16 <= 9e9 and not (kv != "bf16" and B >= 1024)
        try:
            row = bench_case(B, ctx, page, kv, reps=reps, configs=configs, run_ref=run_ref,
                             run_peer=peer, key=sub,
                             tune=args.autotune, interpret=smoke, max_calls=max_calls,
                             deadline=deadline, mgpu_configs=mgpu_configs, rounds=args.rounds,
                             calls=args.calls)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record and go on
            print(f"case B={B} ctx={ctx} kv={kv} failed: {type(e).__name__}: {str(e)[:300]}",
                  flush=True)
            row = dict(B=B, ctx=ctx, page=page, kv=kv, kv_bytes_floor=0, floor_us=0.0,
                       error=f"{type(e).__name__}: {str(e)[:300]}")
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        dump()
    dump()

    if args.autotune:
        print(f"\nautotune cache: {autotune.cache_path()}")
        for r in rows:
            print(f"  {r.get('tuned_key')}: {r.get('tuned_cfg')} {r.get('tuned_us')} us")
    print(f"\nwall {time.time() - t_start:.0f} s; JSON: {out_path}")
    if skipped:
        print("skipped (budget): " + ", ".join(f"B={s['B']} ctx={s['ctx']} {s['kv']}"
                                               for s in skipped))
    print("\n| B | ctx | page | kv | KV MB | floor us | ours us | ours TB/s | %ceil | mgpu us | "
          "mgpu TB/s | mgpu %ceil | peer us | peer TB/s | peer/mgpu | mgpu dev us | "
          "peer dev us | peer/mgpu dev | ref us | ref TB/s | err ours | err mgpu | err peer | "
          "best cfg | best mgpu cfg |")
    print("|---" * 25 + "|")
    f = lambda x, p=1: "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))  # noqa
    for r in rows:
        print(f"| {r['B']} | {r['ctx']} | {r['page']} | {r['kv']} | "
              f"{r['kv_bytes_floor']/1e6:.0f} | {f(r['floor_us'])} | "
              f"{f(r.get('ours_us'))} | {f(r.get('ours_tbs'), 2)} | "
              f"{f(None if r.get('ours_tbs') is None else 100 * r['ours_tbs'] / CEIL_TBS, 0)} | "
              f"{f(r.get('mgpu_us'))} | {f(r.get('mgpu_tbs'), 2)} | "
              f"{f(None if r.get('mgpu_tbs') is None else 100 * r['mgpu_tbs'] / CEIL_TBS, 0)} | "
              f"{f(r.get('peer_us'))} | {f(r.get('peer_tbs'), 2)} | "
              f"{f(r.get('peer_over_mgpu'), 2)} | "
              f"{f(r.get('mgpu_dev_us'))} | {f(r.get('peer_dev_us'))} | "
              f"{f(r.get('peer_over_mgpu_dev'), 2)} | "
              f"{f(r.get('ref_us'))} | "
              f"{f(r.get('ref_tbs'), 2)} | {f(r.get('ours_err'), 4)} | "
              f"{f(r.get('mgpu_err'), 4)} | {f(r.get('peer_err'), 4)} | "
              f"{(r.get('ours_cfg') or '-').replace('KernelConfig', '')} | "
              f"{(r.get('mgpu_cfg') or '-').replace('DecodeConfig', '')} |")


if __name__ == "__main__":
    main()
