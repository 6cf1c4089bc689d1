"""GEMM kernels of issue 5 on the H100, against XLA in the same process.

  python3 benchmarks/gemm.py --out $OUT/gemm.json [--part fp8|skinny|all] [--budget-s 170]
  python3 benchmarks/gemm.py --part fused_quant --out $OUT/fused.json   # (d), below
  python3 benchmarks/gemm.py --interpret           # CPU dry run: tiny shapes, kernels interpreted

(a) fp8 -- prefill-sized W8A8 (pallas_kernels/fp8_gemm.py, Mosaic GPU wgmma), TFLOP/s and % of
    the ceilings (fp8: the 1,979 TFLOP/s datasheet peak, since XLA's fp8 dot beat GPU.md's measured
    913 here; bf16: 791 measured, ../shared/GPU.md), on 8192^3
    and M in {2048, 8192} x Llama-3-8B (K, N):
      ours            fp8_matmul, weight [N, K] (K-major), scales + bf16 cast in the epilogue
      ours_cfg:...    other tile configs (8192^3 and one prefill shape)
      xla_fp8_raw     dot_general(e4m3 [M,K], e4m3 [N,K]) -> f32, no scales (the 913 peer)
      xla_fp8         the same with both scales applied and a bf16 result (ours' contract)
      xla_bf16        bf16 x bf16 -> bf16 dot
      quant_pallas    QuantArray("fp8").quantized_dot under IMP_JAX_GEMM=pallas: bf16 x in,
                      activation quantization + ours (the codes are stored K-major)
      quant_xla       the same contract through XLA (IMP_JAX_GEMM=xla)
(b) skinny -- decode-sized weight-only GEMM (pallas_kernels/skinny_gemm.py, Triton), TB/s on
    weight bytes and % of 2.94 TB/s (bf16 GEMV-like weight read, GPU.md), M in {1, 4, 16, 64}
    over the 5 Llama-3-8B shapes (qkv, o, gate_up, down, lm_head):
      ours_fp8 / ours_int8   chosen config (and, for M in {1, 16}, the sweep's best: "sweep")
      xla_bf16               x @ w (bf16 weights: twice the bytes)
      xla_fp8_wo / xla_int8_wo   x @ q.astype(bf16) * scale (XLA fuses the convert or not)
      xla_fp8_w8a8           QuantArray("fp8").quantized_dot through XLA (activation quant +
                             fp8 dot), the W8A8 path the engine would take without the kernel
(c) skinny_fp8 -- the Mosaic GPU skinny W8A8 kernel (its function's docstring).
(d) fused_quant -- RMSNorm + per-token e4m3 and SiLU-and-mul + e4m3 in one pass
    (pallas_kernels/fused_quant.py) vs XLA's fusion of the same math, M in {8192, 1024, 128}.

Every variant's output is checked (relative Frobenius error vs its jnp reference) before timing.
Timing: one jit runs N calls back to back, each on its own weights (or activations) and its
own activation argument (N separate arrays: no slicing copies, nothing XLA can merge across
calls: session 17 saw its CSE and DotMerger fold calls that shared a weight), every output
returned (no extra reduction); its first run is the compile, the warm-up and the correctness
check; then the median of --reps (>= 10) runs, divided by N. The bandwidth-bound parts
(skinny, skinny_fp8, fused_quant) make enough calls to move ~4 GB (2 to 64). The wall-clock
figure also holds the run's host side (dispatching N x 3 arguments), which short kernels do not
hide; --trace DIR adds each variant's device time per call from one profiled run (dev_us).

Each part runs in its own subprocess (a kernel fault cannot take the other part down), under a
time budget: every problem's main variants first, config sweeps after; what the budget cuts is
listed as skipped. The default (both parts) targets < 3 min and may cut the M = 8192 FP8 rows
and the larger-M skinny rows; `--part fp8` and `--part skinny` (160 s each) give full tables. Every variant is in a
try/except that prints its traceback. JSON is rewritten after every problem; a table is printed
last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402  (stdlib only at import; jax inside device_time)

# H100 SXM datasheet dense FP8 peak. GPU.md's measured 913 (XLA's fp8 dot, 8192^3) is no ceiling:
# XLA's fp8 dot itself reached 1,159 and ours 1,261 on 2026-11-28 (docs/quant_notes.md).
FP8_CEIL_TFLOPS = 1979.0
BF16_CEIL_TFLOPS = 791.0  # XLA bf16 matmul 8192^3, H100 (GPU.md)
HBM_CEIL_TBS = 2.94  # bf16 GEMV-like weight read, H100 (GPU.md)
LLAMA8B = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
           ("down", 14336, 4096), ("lm_head", 4096, 128256))
# the model's weights as they are stored today (q, k, v and gate, up separate): --split-shapes
# sets them beside the fused shapes above, to see what fusing them would buy at decode sizes
LLAMA8B_SPLIT = (("q", 4096, 4096), ("k_or_v", 4096, 1024), ("gate_or_up", 4096, 14336))


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def rel(a, b) -> float:
    import jax.numpy as jnp
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def run_variant(row, label, call, x, ws, ss, ref, *, reps, budget, work, unit):
    """Check, then time, one variant; store into row[label]. work: FLOPs or bytes per call.

    One jit runs len(ws) calls, call j on (x, ws[j], ss[j]) with x passed once per call
    (separate parameters), and returns every output; its first run (compile + warm-up) also
    gives the output checked against `ref`. No two calls share a weight: XLA merges calls that
    do (CSE of identical calls, DotMerger of dots on one operand; see _rotations)."""
    import jax
    if budget.left() <= 0:
        row.setdefault("skipped", []).append(label)
        print(f"    {label}: skipped (time budget)", flush=True)
        return None
    t0 = time.time()
    try:
        n = len(ws)
        g = jax.jit(lambda xs, ws, ss: [call(xs[j], ws[j], ss[j]) for j in range(n)])
        xs = [x] * n
        outs = jax.block_until_ready(g(xs, ws, ss))
        err = rel(outs[0], ref) if ref is not None else None
        del outs
        compile_s = time.time() - t0
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(g(xs, ws, ss))
            ts.append((time.perf_counter() - t) / n)
        t = statistics.median(ts)
    except Exception as e:  # noqa: BLE001 -- report and keep going
        traceback.print_exc()
        row[label] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
        print(f"    {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    rate = work / t / 1e12
    rec = dict(us=t * 1e6, rate=rate, unit=unit, rel_err=err, us_min=min(ts) * 1e6, calls=n,
               compile_s=compile_s, wall_s=time.time() - t0)
    if TRACE_DIR and budget.left() > 0:
        rec.update(_device_time(g, (xs, ws, ss), n, work, unit, os.path.join(TRACE_DIR, label)))
    row[label] = rec
    e = "-" if err is None else f"{err:.2e}"
    print(f"    {label}: {t * 1e6:9.1f} us  {rate:7.2f} {unit}  err={e}  "
          f"(first run {compile_s:.1f} s)", flush=True)
    return rec


TRACE_DIR = None  # --trace: also each variant's device time per call, from a profiled run


def _device_time(g, args, n: int, work: float, unit: str, path: str) -> dict:
    """One more run of g under jax.profiler: the GPU's kernel time per call (`dev_us`: what
    the wall-clock figure holds besides the run's host dispatch, ~3 arguments per call) and
    its span per call (kernels + the gaps between them)."""
    got = trace_summary.device_time(g, args, n, path)
    if got is None:
        return {}
    busy, span = got
    print(f"      device: {busy:.1f} us kernels / {span:.1f} us span per call, "
          f"{work / busy / 1e6:.2f} {unit} on kernel time", flush=True)
    return dict(dev_us=busy, dev_span_us=span, dev_rate=work / busy / 1e6)


def _scheduled_rows(schedule, budget, meta):
    """(name, K, N, M, phase, row) of each ((name, K, N), M, phase) the budget leaves time for:
    a "main" phase starts the (layer, M) row in meta["rows"], a "sweep" adds to it; skipped
    problems are listed in meta["skipped_problems"]."""
    rows = {}
    for (name, K, N), M, phase in schedule:
        if budget.left() <= 0:
            meta.setdefault("skipped_problems", []).append(f"{name} M={M} {phase}")
            continue
        if phase == "main":
            row = rows[(name, M)] = dict(layer=name, M=M, K=K, N=N)
            meta["rows"].append(row)
        else:
            row = rows[(name, M)]
        print(f"  {name}: M={M} K={K} N={N} ({phase})", flush=True)
        yield name, K, N, M, phase, row


def cfg_str(cfg) -> str:
    """A config by its non-default fields (plus the CTA tile for the FP8 GEMM)."""
    import dataclasses
    default = type(cfg)()
    diff = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name)]
    tile = f"{cfg.cta_tile_m}x{cfg.cta_tile_n}x{cfg.tile_k} " if hasattr(cfg, "cta_tile_m") else ""
    return tile + (",".join(diff) or "default")


def write(path, payload):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)


def header():
    import jax
    dev = jax.devices()[0]
    return dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                device_count=jax.device_count(), date=time.strftime("%Y-%m-%d %H:%M"))


# ------------------------------------------------------------------------------- (a) FP8 GEMM


def fp8_part(args, out_path):
    import jax
    import jax.numpy as jnp
    from imp_jax import quant
    from imp_jax.quant import QuantArray, quantize_activations
    from pallas_kernels import fp8_gemm as fg

    budget = Budget(args.budget_s)
    interp = args.interpret
    meta = dict(header(), part="fp8", fp8_ceiling_tflops=FP8_CEIL_TFLOPS,
                bf16_ceiling_tflops=BF16_CEIL_TFLOPS, rows=[])
    print("fp8 part:", meta["device"], "jax", meta["jax"], flush=True)
    base = dict(num_sms=4) if interp else {}
    if interp:
        problems = [("tiny", 256, 256, 512)]
        alt = {"wgM": dict(wg_dimension="M", tile_m=64, tile_n=64),
               "clusterM": dict(cluster_dimension="M", tile_m=64, tile_n=64)}
        small = dict(tile_m=64, tile_n=64)
        sweep_on = {("tiny", 256)}
    else:
        problems = [("square", 8192, 8192, 8192)]
        problems += [(name, 2048, K, N) for name, K, N in LLAMA8B]
        problems += [(name, 8192, K, N) for name, K, N in LLAMA8B[:4]]
        alt = {"clusterM": dict(cluster_dimension="M"),  # TMA multicast of B tiles
               "clusterN": dict(cluster_dimension="N"),  # ... of A tiles
               "snakeM16": dict(grid_minor_dim="M", grid_tile_width=16),
               "wgM": dict(wg_dimension="M"),
               "k64_s6": dict(tile_k=64, max_concurrent_steps=6),
               "s3": dict(max_concurrent_steps=3),
               "promote_n64": dict(promote=True, tile_n=64),
               "lane": dict(lowering="lane")}
        small = {}
        sweep_on = {("square", 8192), ("gate_up", 2048)}
    # every problem's main variants first, the config sweep after (it is what a short budget cuts)
    schedule = [(p, "main") for p in problems] + \
        [(p, "sweep") for p in problems if (p[0], p[1]) in sweep_on]
    rows = {}

    def operands(M, K, N, seed):
        R = max(2, min(8, math.ceil(256e6 / (K * N))))  # >= ~256 MB of fp8 weights per jit
        kx, kw, ks = jax.random.split(jax.random.PRNGKey(seed), 3)
        x = (jax.random.normal(kx, (M, K), jnp.float32)
             * jnp.exp(jax.random.normal(ks, (M, 1)))).astype(jnp.bfloat16)
        wts = [jax.random.normal(jax.random.fold_in(kw, r), (N, K), jnp.bfloat16) * 0.02
               for r in range(R)]  # [N, K]
        qas = [quant.quantize(w, "fp8", (1,)) for w in wts]  # per output channel
        return x, wts, [qa.q for qa in qas], [qa.scale.reshape(N) for qa in qas]

    for i, ((name, M, K, N), phase) in enumerate(schedule):
        if budget.left() <= 0:
            meta.setdefault("skipped_problems", []).append(f"{name} M={M} {phase}")
            continue
        if phase == "main":
            row = rows[(name, M)] = dict(layer=name, M=M, K=K, N=N, flops=fg.flops(M, K, N))
            meta["rows"].append(row)
        else:
            row = rows[(name, M)]
        print(f"  {name}: M={M} K={K} N={N} ({phase})", flush=True)
        try:
            x, wts, wq, wsc = operands(M, K, N, seed=zlib.crc32(f"{name}{M}".encode()) % 1000)
            xq, xs = quantize_activations(x, 1)
            ref = fg.fp8_matmul_ref(xq, xs, wq[0], wsc[0])
            row["rotations"] = len(wq)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"setup: {type(e).__name__}: {e}"
            write(out_path, meta)
            continue
        kw = dict(reps=args.reps, budget=budget, work=fg.flops(M, K, N), unit="TFLOP/s")
        if phase == "sweep":
            for tag, over in alt.items():
                try:
                    cfg = fg.choose_config(M, K, N, **{**base, **small, **over})
                except Exception as e:  # noqa: BLE001
                    row[f"ours_cfg:{tag}"] = dict(error=str(e))
                    continue
                rec = run_variant(row, f"ours_cfg:{tag}", lambda x, w, s, cfg=cfg: fg.fp8_matmul(
                    x, xs, w, s, config=cfg, interpret=interp), xq, wq, wsc, ref, **kw)
                if rec:
                    rec["cfg"] = cfg_str(cfg)
                write(out_path, meta)
            del x, wts, wq, wsc, xq, xs, ref
            continue
        cfg0 = fg.choose_config(M, K, N, **base, **small)
        row["ours_cfg"] = cfg_str(cfg0)
        # ours first: if it faults, the rows written so far survive in the JSON
        run_variant(row, "ours", lambda x, w, s: fg.fp8_matmul(
            x, xs, w, s, config=cfg0, interpret=interp), xq, wq, wsc, ref, **kw)
        write(out_path, meta)
        run_variant(row, "xla_fp8", lambda x, w, s: fg.fp8_matmul_ref(x, xs, w, s),
                    xq, wq, wsc, ref, **kw)
        ref_bf = jax.lax.dot_general(x, wts[0], (((1,), (1,)), ((), ())),
                                     precision=jax.lax.Precision.HIGHEST,
                                     preferred_element_type=jnp.float32)
        run_variant(row, "xla_bf16", lambda x, w, s: jax.lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ).astype(jnp.bfloat16), x, wts, wsc, ref_bf, **kw)  # the bf16 weights fp8 came from
        del ref_bf, wts
        # the engine's contract: bf16 x in, a QuantArray for the [K, N] weight (its codes stored
        # K-major, [N, K]: these very arrays)
        for label, be in (("quant_pallas", "interpret" if interp else "pallas"),
                          ("quant_xla", "xla")):
            quant.set_gemm_backend(be)
            try:
                f = lambda x, w, s: QuantArray(  # noqa: E731
                    w, s.reshape(1, N), "fp8", (0,)).quantized_dot(x, 1)
                text = str(jax.make_jaxpr(f)(x, wq[0], wsc[0]))
                row[f"{label}_kernel"] = "mpmd_map" in text or "pallas_call" in text
                run_variant(row, label, f, x, wq, wsc, ref, **kw)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row[label] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
            finally:
                quant.set_gemm_backend(None)
        run_variant(row, "xla_fp8_raw", lambda x, w, s: jax.lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32),
            xq, wq, wsc, None, **kw)
        del x, wq, wsc, xq, xs, ref
        write(out_path, meta)
    write(out_path, meta)
    return meta


# ------------------------------------------------------------------------------- (b) skinny


def _ms(args, default: tuple[int, ...]) -> tuple[int, ...]:
    """--ms (comma-separated M values) or the part's default."""
    return tuple(int(m) for m in args.ms.split(",")) if args.ms else default


def _rotations(bytes_per_call: float, interp: bool) -> int:
    """Calls per timed jit for the bandwidth-bound parts, each on its own weights (or
    activations): enough to move ~4 GB per run, 2 to 64 (2 in interpret mode). A timed run
    carries a per-run cost besides its calls (~50-570 us on an H200, session 16), which a few
    calls spread into every per-call figure (the lm_head was timed with 2 calls of ~0.2 ms).
    Calls must not share inputs: session 17 cycled 2 lm_head weights through 8 calls, and XLA
    computed the identical calls once (CSE) and merged dots on a shared weight into one
    (DotMerger), which read as 5.3-12.5 TB/s on an H200."""
    return 2 if interp else max(2, min(64, math.ceil(4e9 / bytes_per_call)))


def skinny_part(args, out_path):
    import jax
    import jax.numpy as jnp
    from imp_jax import quant
    from imp_jax.quant import QuantArray
    from pallas_kernels import skinny_gemm as sk

    budget = Budget(args.budget_s)
    interp = args.interpret
    meta = dict(header(), part="skinny", hbm_ceiling_tbs=HBM_CEIL_TBS, rows=[], tuned={})
    print("skinny part:", meta["device"], "jax", meta["jax"], flush=True)
    if interp:
        shapes, Ms, sweep_ms = (("tiny", 512, 256),), (1, 16), (1, 16)
    else:
        shapes, Ms, sweep_ms = LLAMA8B, (1, 4, 16, 64), (1, 16)
        if args.split_shapes:
            shapes = LLAMA8B_SPLIT + LLAMA8B
    Ms = _ms(args, Ms)
    # M-major (decode at batch 1 first); the config sweeps after every main row
    schedule = [((name, K, N), M, "main") for M in Ms for name, K, N in shapes]
    schedule += [((name, K, N), M, "sweep") for M in sweep_ms if M in Ms
                 for name, K, N in shapes]
    for name, K, N, M, phase, row in _scheduled_rows(schedule, budget, meta):
        try:
            R = _rotations(sk.weight_bytes(K, N, 1), interp)
            kx, kw = jax.random.split(jax.random.PRNGKey(zlib.crc32(f"{name}{M}".encode()) % 1000))
            x = jax.random.normal(kx, (M, K), jnp.bfloat16)
            wts = [jax.random.normal(jax.random.fold_in(kw, r), (K, N), jnp.bfloat16) * 0.02
                   for r in range(R)]
            row["rotations"] = R
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"setup: {type(e).__name__}: {e}"
            continue
        nb8 = sk.weight_bytes(K, N, 1)
        common = dict(reps=args.reps, budget=budget, unit="TB/s")
        if phase == "main":
            ref_bf = jnp.dot(x, wts[0], preferred_element_type=jnp.float32)
            run_variant(row, "xla_bf16", lambda x, w, s: jnp.dot(
                x, w, preferred_element_type=jnp.float32).astype(x.dtype),
                x, wts, [jnp.ones((N,), jnp.float32)] * R, ref_bf, work=K * N * 2, **common)
            del ref_bf
        for mode in (("fp8", "int8") if phase == "main" else ("fp8",)):
            qas = [quant.quantize(w, mode, (0,)) for w in wts]
            qs, ss = [qa.q for qa in qas], [qa.scale.reshape(N) for qa in qas]  # q: [N, K]
            del qas
            ref = sk.skinny_gemm_ref(x, qs[0], ss[0], w_layout="nk")
            cfg0 = sk.choose_config(M, K, N)
            if phase == "main":
                rec = run_variant(row, f"ours_{mode}", lambda x, w, s: sk.skinny_gemm(
                    x, w, s, config=cfg0, interpret=interp, w_layout="nk"), x, qs, ss, ref,
                    work=nb8, **common)
                if rec:
                    rec["cfg"] = str(cfg0)
                run_variant(row, f"xla_{mode}_wo", lambda x, w, s: sk.skinny_gemm_ref(
                    x, w, s, w_layout="nk"), x, qs, ss, ref, work=nb8, **common)
                if mode == "fp8":
                    quant.set_gemm_backend("xla")  # QuantArray would take the kernel here
                    try:
                        run_variant(row, "xla_fp8_w8a8", lambda x, w, s: QuantArray(
                            w, s.reshape(1, N), "fp8", (0,)).quantized_dot(x, 1),
                            x, qs, ss, ref, work=nb8, **common)
                    finally:
                        quant.set_gemm_backend(None)
            else:  # a few more configs; the best (chosen included) is a TUNED candidate
                cands = [c for c in sk.candidate_configs(M, K, N) if c != cfg0]
                picks = cands[:2] + [c for c in cands if c.splits == 1][:1]
                rec = row.get("ours_fp8")
                best = (rec["us"], cfg0) if isinstance(rec, dict) and "us" in rec else None
                for cfg in dict.fromkeys(picks):
                    r2 = run_variant(row, f"ours_fp8_cfg:{cfg}", lambda x, w, s, cfg=cfg:
                                     sk.skinny_gemm(x, w, s, config=cfg, interpret=interp,
                                                    w_layout="nk"),
                                     x, qs, ss, ref, work=nb8, **common)
                    if r2 and (best is None or r2["us"] < best[0]):
                        best = (r2["us"], cfg)
                if best:
                    c = best[1]
                    row["sweep_best"] = dict(us=best[0], cfg=str(c), rate=nb8 / best[0] / 1e6)
                    meta["tuned"][f"({K}, {N}, {sk.padded_m(M)})"] = (
                        f"GemmConfig({c.block_n}, {c.block_k}, {c.splits}, {c.num_warps}, "
                        f"{c.num_stages})")
            del qs, ss, ref
        del wts, x
        write(out_path, meta)
    write(out_path, meta)
    return meta


# ------------------------------------------------------------------------------- (c) skinny fp8


def skinny_fp8_part(args, out_path):
    """Decode-sized W8A8 on the Mosaic GPU skinny kernel (pallas_kernels/skinny_fp8.py), weights
    given directly in its [N, K] layout, against XLA and the Triton skinny kernel on the same
    weights; then a config sweep (the winners print as skinny_fp8.TUNED entries)."""
    import jax
    import jax.numpy as jnp
    from imp_jax import quant
    from imp_jax.quant import quantize_activations
    from pallas_kernels import fp8_gemm as fg
    from pallas_kernels import skinny_fp8 as sf
    from pallas_kernels import skinny_gemm as sk

    budget = Budget(args.budget_s)
    interp = args.interpret
    meta = dict(header(), part="skinny_fp8", hbm_ceiling_tbs=HBM_CEIL_TBS, rows=[], tuned={})
    print("skinny_fp8 part:", meta["device"], "jax", meta["jax"], flush=True)
    if interp:
        shapes, Ms, sweep_ms, n_sweep = (("tiny", 512, 256),), (1, 16), (1,), 2
    else:
        shapes, Ms, sweep_ms, n_sweep = LLAMA8B, (1, 16, 64, 4), (1, 16), 5
    Ms = _ms(args, Ms)
    # what matters most first: batch-1 rows and their sweep (TUNED), then the larger batches
    schedule = []
    for M in Ms:
        schedule += [((name, K, N), M, "main") for name, K, N in shapes]
        if M == Ms[0] and M in sweep_ms:
            schedule += [((name, K, N), M, "sweep") for name, K, N in shapes]
    schedule += [((name, K, N), M, "sweep") for M in sweep_ms if M in Ms[1:]
                 for name, K, N in shapes]
    for name, K, N, M, phase, row in _scheduled_rows(schedule, budget, meta):
        try:
            R = _rotations(sf.weight_bytes(K, N), interp)
            kx, kw = jax.random.split(jax.random.PRNGKey(zlib.crc32(f"f{name}{M}".encode()) % 999))
            x = jax.random.normal(kx, (M, K), jnp.bfloat16)
            wts = [jax.random.normal(jax.random.fold_in(kw, r), (N, K), jnp.bfloat16) * 0.02
                   for r in range(R)]  # [N, K]: the kernel's layout, no transpose anywhere
            qas = [quant.quantize(w, "fp8", (1,)) for w in wts]  # per output channel
            qs, ss = [qa.q for qa in qas], [qa.scale.reshape(N) for qa in qas]
            del qas
            xq, xs = quantize_activations(x, 1)
            ref = sf.skinny_fp8_ref(xq, xs, qs[0], ss[0])
            row["rotations"] = R
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"setup: {type(e).__name__}: {e}"
            continue
        nb8 = sf.weight_bytes(K, N)
        common = dict(reps=args.reps, budget=budget, unit="TB/s", work=nb8)
        cfg0 = sf.choose_config(M, K, N)
        if phase == "main":
            row["ours_cfg"] = str(cfg0)
            row["model_us"] = sf.estimate_us(M, K, N, cfg0)
            # ours first: if it faults, the rows written so far survive in the JSON
            # the quantized activations go in as each call's own x: a dot whose operand every
            # call shared could be merged across calls (XLA's DotMerger, weights <= 32 MB)
            run_variant(row, "ours", lambda x, w, s: sf.skinny_fp8_matmul(
                *x, w, s, config=cfg0, interpret=interp), (xq, xs), qs, ss, ref, **common)
            write(out_path, meta)
            # the engine's contract: bf16 x in, per-token quantization fused in front
            run_variant(row, "ours_e2e", lambda x, w, s: sf.skinny_fp8_matmul(
                *quantize_activations(x, 1), w, s, config=cfg0, interpret=interp),
                x, qs, ss, ref, **common)
            run_variant(row, "xla_fp8", lambda x, w, s: fg.fp8_matmul_ref(*x, w, s),
                        (xq, xs), qs, ss, ref, **common)  # XLA's fp8 dot: the W8A8 peer
            # Triton skinny kernel, weight-only on the same [N, K] e4m3 weights ("nk" layout)
            ref_wo = sk.skinny_gemm_ref(x, qs[0], ss[0], w_layout="nk")
            run_variant(row, "triton_fp8", lambda x, w, s: sk.skinny_gemm(
                x, w, s, w_layout="nk", interpret=interp), x, qs, ss, ref_wo, **common)
            ref_bf = jax.lax.dot_general(x, wts[0], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            run_variant(row, "xla_bf16", lambda x, w, s: jax.lax.dot_general(
                x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            ).astype(jnp.bfloat16), x, wts, ss, ref_bf, **{**common, "work": 2 * nb8})
            del ref_bf, ref_wo
        else:  # a few more configs: the model's next picks + other structures
            cands = [c for c in sf.candidate_configs(M, K, N) if c != cfg0]
            picks = cands[:2]
            for c in cands:  # the best of each (tile_n, splits) structure not yet tried
                if len(picks) >= n_sweep:
                    break
                if all((c.tile_n, c.splits) != (p.tile_n, p.splits) for p in picks + [cfg0]):
                    picks.append(c)
            rec = row.get("ours")
            best = (rec["us"], cfg0) if isinstance(rec, dict) and "us" in rec else None
            for cfg in picks:
                r2 = run_variant(row, f"ours_cfg:{cfg}", lambda x, w, s, cfg=cfg:
                                 sf.skinny_fp8_matmul(*x, w, s, config=cfg, interpret=interp),
                                 (xq, xs), qs, ss, ref, **common)
                if r2:
                    r2["model_us"] = sf.estimate_us(M, K, N, cfg)
                if r2 and (best is None or r2["us"] < best[0]):
                    best = (r2["us"], cfg)
            if best:
                c = best[1]
                row["sweep_best"] = dict(us=best[0], cfg=str(c), rate=nb8 / best[0] / 1e6)
                meta["tuned"][f"({K}, {N}, {sf.padded_m(M)})"] = (
                    f"SkinnyFp8Config({c.tile_n}, {c.tile_k}, {c.stages}, {c.splits})")
        del wts, qs, ss, x, xq, xs, ref
        write(out_path, meta)
    write(out_path, meta)
    return meta


def fused_quant_part(args, out_path):
    """W8A8 activation quantization fused into its producer (pallas_kernels/fused_quant.py)
    against XLA's fusion of the same jnp math, at prefill-sized M: RMSNorm + quantize (K = 4096)
    and SiLU-and-mul + quantize (N = 14336). TB/s on the bytes the fused kernel must move (read
    the producer's inputs, write e4m3 + scales); each call reads a different activation."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels import fused_quant as fq

    budget = Budget(args.budget_s)
    interp = args.interpret
    meta = dict(header(), part="fused_quant", rows=[])
    print("fused_quant part:", meta["device"], "jax", meta["jax"], flush=True)
    Ms = (64, 8) if interp else _ms(args, (8192, 1024, 128))
    width = {"rms_norm": 256 if interp else 4096, "silu_mul": 512 if interp else 14336}
    eps = 1e-5
    for M in Ms:
        for op, n in width.items():
            if budget.left() <= 0:
                meta.setdefault("skipped_problems", []).append(f"{op} M={M}")
                continue
            row = dict(op=op, M=M, n=n)
            meta["rows"].append(row)
            print(f"  {op}: M={M} n={n}", flush=True)
            nbytes = (M * n * 2 + M * n + M * 4 + n * 4 if op == "rms_norm"   # bytes per call
                      else 2 * M * n * 2 + M * n + M * 4)
            R = _rotations(nbytes, interp)
            key = jax.random.PRNGKey(zlib.crc32(f"{op}{M}".encode()) % 999)
            xs = [jax.random.normal(jax.random.fold_in(key, r), (M, n), jnp.bfloat16) * 2
                  for r in range(R)]
            common = dict(reps=args.reps, budget=budget, unit="TB/s")
            if op == "rms_norm":
                w = 1 + 0.1 * jax.random.normal(key, (n,), jnp.float32)
                ref = fq.rms_norm_quant_ref(xs[0], w, eps)[0]
                variants = {
                    "fused": lambda w, x, _: fq.rms_norm_quant(x, w, eps, interpret=interp)[0],
                    "xla": lambda w, x, _: fq.rms_norm_quant_ref(x, w, eps)[0],
                    "xla_norm_only": lambda w, x, _: fq.rms_norm_ref(x, w, eps)}
                first, ops = w, (xs, xs)
            else:
                ups = [jax.random.normal(jax.random.fold_in(key, 99 + r), (M, n), jnp.bfloat16)
                       for r in range(R)]
                ref = fq.silu_mul_quant_ref(xs[0], ups[0])[0]
                variants = {
                    "fused": lambda _, g, u: fq.silu_mul_quant(g, u, interpret=interp)[0],
                    "xla": lambda _, g, u: fq.silu_mul_quant_ref(g, u)[0],
                    "xla_silu_mul_only": lambda _, g, u: fq.silu_mul_ref(g, u)}
                first, ops = jnp.zeros(()), (xs, ups)
            row["rotations"], row["bytes"] = R, nbytes
            for label, call in variants.items():
                check = None if label.endswith("_only") else ref
                run_variant(row, label, call, first, *ops, check, work=nbytes, **common)
            write(out_path, meta)
            del xs, ops, ref
    write(out_path, meta)
    print("\n| op | M | n | fused us (TB/s) | XLA us (TB/s) | fused vs XLA | producer alone us |")
    print("|---|---|---|---|---|---|---|")
    for r in meta["rows"]:
        def cell(label):
            rec = r.get(label)
            return (f"{rec['us']:.1f} ({rec['rate']:.2f})" if isinstance(rec, dict)
                    and "us" in rec else "-")
        f, x = r.get("fused", {}), r.get("xla", {})
        ratio = f"{x['us'] / f['us']:.2f}x" if "us" in f and "us" in x else "-"
        alone = cell("xla_norm_only" if r["op"] == "rms_norm" else "xla_silu_mul_only")
        print(f"| {r['op']} | {r['M']} | {r['n']} | {cell('fused')} | {cell('xla')} | {ratio} "
              f"| {alone} |")
    return meta


# ------------------------------------------------------------------------------- tables


def fmt(rec, pct_of=None):
    if not isinstance(rec, dict):
        return "-"
    if "error" in rec:
        return "FAIL"
    s = f"{rec['rate']:.0f}" if rec["unit"] == "TFLOP/s" else f"{rec['rate']:.2f}"
    if pct_of:
        s += f" ({100 * rec['rate'] / pct_of:.0f}%)"
    return s


def print_skinny_fp8_table(res):
    print(f"\n(c) skinny FP8 (Mosaic GPU), {res['device']}: us per call / TB/s on weight bytes "
          f"(% of {HBM_CEIL_TBS} TB/s); xla_bf16 counts its 2-byte weights")
    cols = ("ours", "ours_e2e", "xla_fp8", "triton_fp8", "xla_bf16")
    print("| layer | M | K | N | " + " | ".join(cols) + " | ours vs bf16 | sweep best | "
          "ours cfg | model us |")
    print("|" + "---|" * (len(cols) + 8))
    for r in res["rows"]:
        def cell(c):
            rec = r.get(c)
            if not isinstance(rec, dict):
                return "-"
            if "error" in rec:
                return "FAIL"
            return f"{rec['us']:.1f} / {rec['rate']:.2f} ({100 * rec['rate'] / HBM_CEIL_TBS:.0f}%)"
        o, b = r.get("ours"), r.get("xla_bf16")
        ratio = (f"{b['us'] / o['us']:.2f}x" if isinstance(o, dict) and isinstance(b, dict)
                 and "us" in o and "us" in b else "-")
        sb = r.get("sweep_best")
        sbs = (f"{sb['us']:.1f} ({100 * sb['rate'] / HBM_CEIL_TBS:.0f}%) "
               f"{sb['cfg'].replace('SkinnyFp8Config', '')}" if sb else "-")
        cfg = r.get("ours_cfg", "-").replace("SkinnyFp8Config", "")
        mu = f"{r['model_us']:.1f}" if "model_us" in r else "-"
        print(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | "
              + " | ".join(cell(c) for c in cols) + f" | {ratio} | {sbs} | {cfg} | {mu} |")
    sweep = [(r["layer"], r["M"], k[len("ours_cfg:"):], v) for r in res["rows"]
             for k, v in r.items() if k.startswith("ours_cfg:")]
    if sweep:
        print("\nconfig sweep (measured us / % of ceiling / model us):")
        for layer, M, c, v in sweep:
            if isinstance(v, dict) and "us" in v:
                print(f"  {layer} M={M} {c.replace('SkinnyFp8Config', '')}: {v['us']:.1f} us "
                      f"{100 * v['rate'] / HBM_CEIL_TBS:.0f}% (model {v.get('model_us', 0):.1f})")
            else:
                print(f"  {layer} M={M} {c}: FAIL")
    if res.get("tuned"):
        print("\nskinny_fp8.TUNED candidates (sweep winners, chosen config included):")
        for k, v in res["tuned"].items():
            print(f"    {k}: {v},")
    if res.get("skipped_problems"):
        print("skipped (budget):", ", ".join(res["skipped_problems"]))


def print_tables(fp8, skinny):
    if fp8:
        print(f"\n(a) FP8 GEMM, {fp8['device']}, jax {fp8['jax']}: TFLOP/s (% of the measured "
              f"ceiling: fp8 {FP8_CEIL_TFLOPS:.0f}, bf16 {BF16_CEIL_TFLOPS:.0f}); err = ours vs "
              "f32 reference")
        cols = ("ours", "xla_fp8", "xla_fp8_raw", "xla_bf16", "quant_pallas", "quant_xla")
        print("| layer | M | K | N | " + " | ".join(cols) + " | err ours | ours cfg |")
        print("|" + "---|" * (len(cols) + 6))
        for r in fp8["rows"]:
            cells = [fmt(r.get(c), BF16_CEIL_TFLOPS if c == "xla_bf16" else FP8_CEIL_TFLOPS)
                     for c in cols]
            if r.get("quant_pallas_kernel") is False:  # the dispatch fell back to XLA
                cells[cols.index("quant_pallas")] += " (XLA: no kernel)"
            o = r.get("ours") or {}
            err = o.get("rel_err")
            print(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells)
                  + f" | {'-' if err is None else f'{err:.1e}'} | {r.get('ours_cfg', '-')} |")
        extra = [(r["layer"], r["M"], k, v) for r in fp8["rows"] for k, v in r.items()
                 if k.startswith("ours_cfg:")]
        if extra:
            print("\nconfig sweep:")
            for layer, M, k, v in extra:
                print(f"  {layer} M={M} {k}: {fmt(v, FP8_CEIL_TFLOPS)} "
                      f"err={v.get('rel_err') if isinstance(v, dict) else '-'}")
    if skinny:
        print(f"\n(b) skinny GEMM, {skinny['device']}: TB/s on weight bytes (% of "
              f"{HBM_CEIL_TBS} TB/s); us per call in the JSON")
        cols = ("ours_fp8", "xla_fp8_wo", "xla_fp8_w8a8", "ours_int8", "xla_int8_wo", "xla_bf16")
        print("| layer | M | K | N | " + " | ".join(cols) + " | sweep best fp8 | ours fp8 us | "
              "xla bf16 us | cfg |")
        print("|" + "---|" * (len(cols) + 8))
        for r in skinny["rows"]:
            cells = [fmt(r.get(c), HBM_CEIL_TBS) for c in cols]
            sb = r.get("sweep_best")
            sbs = f"{sb['rate']:.2f} {sb['cfg'].replace('GemmConfig', '')}" if sb else "-"
            us = lambda c: (f"{r[c]['us']:.1f}" if isinstance(r.get(c), dict)  # noqa: E731
                            and "us" in r[c] else "-")
            cfg = (r.get("ours_fp8") or {}).get("cfg", "-").replace("GemmConfig", "")
            print(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells)
                  + f" | {sbs} | {us('ours_fp8')} | {us('xla_bf16')} | {cfg} |")
        if skinny.get("tuned"):
            print("\nskinny_gemm.TUNED candidates (fp8 sweep winners):")
            for k, v in skinny["tuned"].items():
                print(f"    {k}: {v},")


# ------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gemm.json if $OUT)")
    ap.add_argument("--part", choices=("all", "fp8", "skinny", "skinny_fp8", "fused_quant"),
                    default="all", help="all = fp8 + skinny (each in a subprocess); skinny_fp8 "
                    "and fused_quant run alone")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds per part (default: one part 160; all: the fp8 part up to 65, "
                         "the skinny part what remains of --total-s)")
    ap.add_argument("--total-s", type=float, default=None,
                    help="--part all: wall-clock target for both parts (default 170)")
    ap.add_argument("--reps", type=int, default=10, help="timed runs per variant (median)")
    ap.add_argument("--split-shapes", action="store_true",
                    help="skinny part: also the unfused q / k / v / gate / up shapes, first")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU dry run: tiny shapes, kernels interpreted")
    ap.add_argument("--ms", default=None, help="skinny parts: comma-separated M (default "
                    "1,4,16,64; skinny_fp8: 1,16,64,4, the first one's sweep right after it)")
    ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="also profile one run of each variant into DIR and record its device "
                         "time per call (dev_us, its rate dev_rate)")
    args = ap.parse_args()
    global TRACE_DIR
    TRACE_DIR = args.trace
    if not args.interpret:
        args.reps = max(args.reps, 10)
    out = args.out or (os.path.join(os.environ["OUT"], "gemm.json") if os.environ.get("OUT")
                       else None)
    if args.part == "all":  # each part in its own process: a kernel fault stays contained
        results = {}
        t_start = time.time()
        total = 600.0 * 2 if args.interpret else (args.total_s or 170.0)
        for part in ("fp8", "skinny"):
            left = total - (time.time() - t_start)
            if args.budget_s is not None:
                budget = args.budget_s
            elif part == "fp8":  # leave the skinny part at least ~75 s
                budget = 600.0 if args.interpret else max(20.0, min(65.0, left - 110.0))
            else:
                budget = 600.0 if args.interpret else max(20.0, left - 25.0)
            part_out = (out[:-5] if out and out.endswith(".json") else (out or "gemm")) + \
                f".{part}.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", part_out,
                   "--budget-s", f"{budget:.0f}", "--reps", str(args.reps), "--no-table"]
            if args.interpret:
                cmd.append("--interpret")
            if args.ms:
                cmd += ["--ms", args.ms]
            if args.split_shapes:
                cmd.append("--split-shapes")
            if args.trace:
                cmd += ["--trace", os.path.join(args.trace, part)]
            t = time.time()
            try:  # budget + startup + the variant running when the budget ends (a hang: killed)
                rc = subprocess.call(cmd, timeout=budget + (600 if args.interpret else 35))
            except subprocess.TimeoutExpired:
                rc = "timeout (killed)"
            print(f"[{part} part: exit {rc}, {time.time() - t:.0f} s]", flush=True)
            try:
                with open(part_out) as f:
                    results[part] = json.load(f)
                results[part]["exit_code"] = rc
            except Exception as e:  # noqa: BLE001
                results[part] = dict(error=f"no results ({type(e).__name__}: {e}), exit {rc}")
        write(out, results)
        print_tables(results.get("fp8") if "rows" in results.get("fp8", {}) else None,
                     results.get("skinny") if "rows" in results.get("skinny", {}) else None)
        return
    if args.budget_s is None:  # skinny_fp8: 140 s of budget + compile of the last variant
        args.budget_s = 600.0 if args.interpret else (140.0 if args.part == "skinny_fp8"
                                                      else 160.0)
    if args.interpret:
        args.reps = 1  # a dry run: interpreted kernels take seconds per call
    if args.part == "fused_quant":
        fused_quant_part(args, out)
        return
    if args.part == "skinny_fp8":
        res = skinny_fp8_part(args, out)
        if not args.no_table:
            print_skinny_fp8_table(res)
        return
    fn = fp8_part if args.part == "fp8" else skinny_part
    res = fn(args, out)
    if not args.no_table:
        print_tables(res if args.part == "fp8" else None, res if args.part == "skinny" else None)


if __name__ == "__main__":
    main()
