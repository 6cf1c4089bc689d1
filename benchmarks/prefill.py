"""Prefill (causal) attention on the GPU: our Mosaic GPU kernel vs the alternatives.

    python3 benchmarks/prefill.py --out $OUT/prefill.json          # < 3 minutes on an H100

Rows (each in its own try/except; a failure is recorded with its traceback and the run goes on):
  * mosaic:<config>  pallas_kernels.flash_prefill.flash_prefill over the paged pools (bf16)
  * triton           pallas_kernels.ragged_paged_attention (Triton-backend kernel, prefill form,
                     max_query_len = longest sequence), same paged inputs
  * cudnn / xla      jax.nn.dot_product_attention(implementation=...) on dense [B, L, H, D]
                     (B equal-length sequences), bf16
  * mgpu_fa3         jax's attention_mgpu example (FlashAttention-3, fp16 as shipped; q is
                     pre-scaled because the example applies no softmax scale), dense
Cases: causal bf16, 32 q heads / 8 KV heads x 128 and 16 MHA heads x 128; T = 8192 tokens as one
sequence and as 8 sequences x 1024 (varlen); page 16 and 64.

FLOPs (causal, as in shared/GPU.md): sum over sequences of 4 * L * L * H * D / 2.
Timing: CUPTI (jax.experimental.mosaic.gpu.profiler.measure, GPU time of every kernel the call
launches, incl. small wrapper ops), median over --reps iterations after a warm-up; also wall
clock (back-to-back async calls, block at the end) as a cross-check. "% of 791" = TFLOP/s over
the bf16 XLA matmul ceiling measured on the H100 (shared/GPU.md).
Correctness (before timing): rel err ||out - truth|| / ||truth||. Truth = the jnp reference
(ragged_paged_attention_ref) where its f32 logits fit (8 x 1k), else a float32 dense computation
of sampled query rows (first 64, middle 100, last 130) of the 8k sequence; also rel err vs cuDNN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# --dump-dir DIR: ptxas -v of every Mosaic GPU kernel (registers, spills) into DIR. Set before
# jax is imported so the Mosaic GPU compiler sees it.
if "--dump-dir" in sys.argv:
    _dump = sys.argv[sys.argv.index("--dump-dir") + 1]
    os.makedirs(_dump, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_TO"] = _dump
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.flash_prefill import FlashConfig, default_config, flash_prefill  # noqa: E402

PEAK = 791.0  # TFLOP/s, bf16 XLA matmul ceiling on the H100 (shared/GPU.md)
TOL = 2e-2


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    name: str
    L: int            # tokens per sequence (qlen == context: plain prefill)
    S: int            # sequences
    H: int
    KVH: int
    D: int
    pages: tuple      # page sizes to build pools for

    @property
    def T(self):
        return self.L * self.S

    @property
    def flops(self):
        return self.S * 4.0 * self.L * self.L * self.H * self.D / 2


def build(prob: Problem, seed=0):
    key = jax.random.key(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    T, H, KVH, D, S, L = prob.T, prob.H, prob.KVH, prob.D, prob.S, prob.L
    q = jax.random.normal(k1, (T, H, D), jnp.bfloat16)
    k = jax.random.normal(k2, (S, L, KVH, D), jnp.bfloat16)
    v = jax.random.normal(k3, (S, L, KVH, D), jnp.bfloat16)
    pools = {}
    for page in prob.pages:
        n = S * (L // page)
        perm = jax.random.permutation(jax.random.fold_in(k4, page), n) + 1   # page 0 unused
        kp = jnp.zeros((n + 1, page, KVH, D), jnp.bfloat16).at[perm].set(
            k.reshape(n, page, KVH, D))
        vp = jnp.zeros((n + 1, page, KVH, D), jnp.bfloat16).at[perm].set(
            v.reshape(n, page, KVH, D))
        pt = perm.reshape(S, L // page).astype(jnp.int32)
        pools[page] = (kp, vp, pt)
    seq_lens = jnp.full((S,), L, jnp.int32)
    query_start = jnp.arange(S + 1, dtype=jnp.int32) * L
    return dict(q=q, k=k, v=v, pools=pools, seq_lens=seq_lens, query_start=query_start)


def sample_rows(L):
    return np.concatenate([np.arange(0, 64), np.arange(L // 2 - 50, L // 2 + 50),
                           np.arange(L - 130, L)])


def dense_rows_ref(q, k, v, rows, scale):
    """float32 causal attention for selected rows of ONE sequence: q [L,H,D], k/v [L,KVH,D]."""
    L, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    qr = q[rows].astype(jnp.float32).reshape(len(rows), KVH, G, D)
    s = jnp.einsum("rkgd,tkd->rkgt", qr, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    mask = jnp.arange(L)[None, :] <= jnp.asarray(rows)[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("rkgt,tkd->rkgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return o.reshape(len(rows), H, D)


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def time_fn(fn, args, reps):
    """(cupti median ms of all kernels, cupti median ms of the longest kernel, wall median ms)."""
    out = jax.block_until_ready(fn(*args))        # compile + warm-up
    jax.block_until_ready(fn(*args))
    cupti_total = cupti_main = None
    try:
        from jax.experimental.mosaic.gpu import profiler
        _, per_iter = profiler.measure(fn, aggregate=False, iterations=reps)(*args)
        if per_iter:
            if reps == 1:
                per_iter = [per_iter]
            cupti_total = statistics.median(sum(t for _, t in it) for it in per_iter)
            cupti_main = statistics.median(max(t for _, t in it) for it in per_iter)
    except Exception as e:  # noqa: BLE001
        log(f"    (cupti unavailable: {type(e).__name__}: {str(e)[:200]})")
    inner = 5
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = None
        for _ in range(inner):
            r = fn(*args)
        jax.block_until_ready(r)
        walls.append((time.perf_counter() - t0) * 1e3 / inner)
    return out, cupti_total, cupti_main, statistics.median(walls)


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------

def mosaic_fn(prob, data, page, cfg, interpret=False):
    kp, vp, pt = data["pools"][page]
    scale = prob.D ** -0.5
    f = jax.jit(lambda q, kp, vp, pt, sl, qs: flash_prefill(
        q, kp, vp, pt, sl, qs, scale=scale, max_query_len=prob.L, config=cfg,
        interpret=interpret))
    return f, (data["q"], kp, vp, pt, data["seq_lens"], data["query_start"])


def triton_fn(prob, data, page, interpret=False):
    from pallas_kernels import ragged_paged_attention
    kp, vp, pt = data["pools"][page]
    scale = prob.D ** -0.5
    f = jax.jit(lambda q, kp, vp, pt, sl, qs: ragged_paged_attention(
        q, kp, vp, pt, sl, qs, max_query_len=prob.L, scale=scale, interpret=interpret))
    return f, (data["q"], kp, vp, pt, data["seq_lens"], data["query_start"])


def dense_fn(prob, data, impl):
    scale = prob.D ** -0.5
    S, L, H, D = prob.S, prob.L, prob.H, prob.D
    q4 = data["q"].reshape(S, L, H, D)

    def f(q4, k, v):
        o = jax.nn.dot_product_attention(q4, k, v, scale=scale, is_causal=True,
                                         implementation=impl)
        return o.reshape(S * L, H, D)
    return jax.jit(f), (q4, data["k"], data["v"])


def fa3_fn(prob, data, block_kv=128):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    S, L, H, D = prob.S, prob.L, prob.H, prob.D
    scale = prob.D ** -0.5
    q16 = (data["q"].astype(jnp.float32) * scale).astype(jnp.float16).reshape(S, L, H, D)
    k16 = data["k"].astype(jnp.float16)
    v16 = data["v"].astype(jnp.float16)
    cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)

    def f(q, k, v):
        return am.attention(q, k, v, cfg).reshape(S * L, H, D)
    return jax.jit(f), (q16, k16, v16)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prefill.json")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds; rows not started by then are skipped (listed in the JSON)")
    ap.add_argument("--quick", action="store_true", help="first case only")
    ap.add_argument("--dump-dir", default=None,
                    help="write ptxas -v output of the Mosaic GPU kernels here")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU plumbing check: tiny shapes, kernels in interpret mode")
    args = ap.parse_args()
    t_start = time.perf_counter()

    dev = jax.devices()[0]
    env = dict(device=str(getattr(dev, "device_kind", dev)), backend=jax.default_backend(),
               jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    log("env:", env)
    results = dict(env=env, rows=[], peak_tflops=PEAK)

    def save():
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)

    gqa = dict(H=32, KVH=8, D=128)
    mha = dict(H=16, KVH=16, D=128)
    # (problem, [(variant, spec)]) in priority order.
    d128 = default_config(128)
    sweep = [d128, FlashConfig(block_kv=64), FlashConfig(block_kv=64, num_stages=3),
             FlashConfig(schedule_barrier=False), FlashConfig(lpt=False),
             FlashConfig(heads_fastest=False), FlashConfig(block_kv=64, compat=True)]
    plan = [
        (Problem("gqa32/8_8k_x1", 8192, 1, pages=(16, 64), **gqa),
         [("cudnn", None)] + [("mosaic", (16, c)) for c in sweep] +
         [("mgpu_fa3", None), ("mosaic", (64, d128)),
          ("mosaic", (64, FlashConfig(block_kv=64))), ("triton", 16), ("triton", 64),
          ("xla", None)]),
        (Problem("gqa32/8_1k_x8", 1024, 8, pages=(16, 64), **gqa),
         [("cudnn", None), ("mosaic", (16, d128)), ("mosaic", (16, FlashConfig(block_kv=64))),
          ("mosaic", (64, d128)), ("mgpu_fa3", None), ("triton", 16),
          ("triton", 64), ("xla", None)]),
        (Problem("mha16_8k_x1", 8192, 1, pages=(16, 64), **mha),
         [("cudnn", None), ("mosaic", (16, d128)), ("mosaic", (16, FlashConfig(block_kv=64))),
          ("mosaic", (64, d128)), ("mgpu_fa3", None), ("xla", None)]),
    ]
    if args.quick:
        plan = plan[:1]
    interp = False
    if args.smoke:  # tiny shapes; Pallas kernels in interpret mode; no cuDNN / FA3 on CPU
        interp = True
        small = FlashConfig(block_kv=64, compat=True)
        plan = [
            (Problem("smoke_gqa_x1", 256, 1, pages=(16, 64), H=4, KVH=2, D=64),
             [("xla", None), ("mosaic", (16, small)), ("mosaic", (64, small)),
              ("triton", 16), ("cudnn", None)]),
        ]

    for prob, variants in plan:
        log(f"\n=== {prob.name}: S={prob.S} x L={prob.L}, H={prob.H}, KVH={prob.KVH}, "
            f"D={prob.D}, causal, {prob.flops / 1e12:.3f} TFLOP ===")
        if time.perf_counter() - t_start > args.budget:
            for vname, spec in variants:
                results["rows"].append(dict(case=prob.name, variant=vname, spec=str(spec),
                                            status="skipped (budget)"))
            save()
            continue
        try:
            data = build(prob)
            scale = prob.D ** -0.5
            truth_kind = None
            truth = None
            rows = None
            if prob.S * prob.H * prob.L * prob.L * 4 <= 4 * 2 ** 30 and not args.smoke:
                from pallas_kernels.reference import ragged_paged_attention_ref
                kp, vp, pt = data["pools"][prob.pages[0]]
                truth = jax.block_until_ready(ragged_paged_attention_ref(
                    data["q"], kp, vp, pt, data["seq_lens"], data["query_start"],
                    max_query_len=prob.L, scale=scale))
                truth_kind = "reference"
            else:
                rows = sample_rows(prob.L)
                truth = jax.block_until_ready(dense_rows_ref(
                    data["q"][:prob.L], data["k"][0], data["v"][0], rows, scale))
                truth_kind = f"f32 rows ({len(rows)} sampled)"
            log(f"truth: {truth_kind}")
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            log(tb)
            results["rows"].append(dict(case=prob.name, status="setup failed", error=tb[-4000:]))
            save()
            continue

        cudnn_out = None
        for vname, spec in variants:
            if time.perf_counter() - t_start > args.budget:
                results["rows"].append(dict(case=prob.name, variant=vname, spec=str(spec),
                                            status="skipped (budget)"))
                save()
                continue
            label = vname
            if vname == "mosaic":
                page, cfg = spec
                label = (f"mosaic p{page} bq{cfg.block_q}x2 bkv{cfg.block_kv} st{cfg.num_stages}"
                         f"{' compat' if cfg.compat else ''}"
                         f"{' nosched' if not cfg.schedule_barrier else ''}"
                         f"{' no-lpt' if not cfg.lpt else ''}"
                         f"{' tiles-fastest' if not cfg.heads_fastest else ''}")
            elif vname == "triton":
                label = f"triton p{spec}"
            row = dict(case=prob.name, variant=label, S=prob.S, L=prob.L, H=prob.H,
                       KVH=prob.KVH, D=prob.D, tflop=prob.flops / 1e12, truth=truth_kind)
            t0 = time.perf_counter()
            try:
                if vname == "mosaic":
                    fn, fargs = mosaic_fn(prob, data, *spec, interpret=interp)
                elif vname == "triton":
                    fn, fargs = triton_fn(prob, data, spec, interpret=interp)
                elif vname in ("cudnn", "xla"):
                    fn, fargs = dense_fn(prob, data, vname)
                elif vname == "mgpu_fa3":
                    fn, fargs = fa3_fn(prob, data)
                else:
                    raise ValueError(vname)
                out = jax.block_until_ready(fn(*fargs))
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                got = out if rows is None else out[:prob.L][rows]
                row["rel_err"] = rel(got, truth)
                row["nan"] = bool(jnp.isnan(out).any())
                if vname == "cudnn":
                    cudnn_out = out
                if cudnn_out is not None and vname != "cudnn":
                    row["rel_err_vs_cudnn"] = rel(out, cudnn_out)
                row["correct"] = bool(row["rel_err"] < TOL and not row["nan"])
                del out
                _, c_tot, c_main, wall = time_fn(fn, fargs, 1 if args.smoke else args.reps)
                row.update(cupti_ms=c_tot, cupti_main_kernel_ms=c_main, wall_ms=wall)
                ms = c_tot if c_tot is not None else wall
                row["ms"] = ms
                row["tflops"] = prob.flops / (ms * 1e-3) / 1e12
                row["pct_of_791"] = 100.0 * row["tflops"] / PEAK
                row["tflops_wall"] = prob.flops / (wall * 1e-3) / 1e12
                row["status"] = "ok" if row["correct"] else "WRONG"
                log(f"  {label:<44} {fmt(ms):>9} ms  {row['tflops']:7.1f} TFLOP/s "
                    f"({row['pct_of_791']:5.1f}%)  wall {fmt(wall)} ms  rel {row['rel_err']:.2e}"
                    f"  compile {row['compile_s']} s")
            except Exception as e:  # noqa: BLE001
                tb = traceback.format_exc()
                row["status"] = f"failed: {type(e).__name__}"
                row["error"] = tb[-6000:]
                log(f"  {label:<44} FAILED: {type(e).__name__}: {str(e)[:300]}")
                log(tb[-3000:])
            results["rows"].append(row)
            save()
        del data, truth, cudnn_out

    # Summary table last.
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    save()
    def efmt(x):
        return "-" if x is None else format(x, ".2e")

    log(f"\n{'case':<16} {'variant':<44} {'ms':>9} {'TFLOP/s':>8} {'%791':>6} {'wall ms':>9} "
        f"{'rel err':>9} {'vs cudnn':>9} status")
    for r in results["rows"]:
        log(f"{r.get('case', ''):<16} {r.get('variant', ''):<44} {fmt(r.get('ms')):>9} "
            f"{fmt(r.get('tflops'), 1):>8} {fmt(r.get('pct_of_791'), 1):>6} "
            f"{fmt(r.get('wall_ms')):>9} {efmt(r.get('rel_err')):>9} "
            f"{efmt(r.get('rel_err_vs_cudnn')):>9} {r.get('status', '')}")
    log(f"elapsed {results['elapsed_s']} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
