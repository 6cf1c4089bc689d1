"""Decode GEMVs in a chain of Llama-3-8B layers: which FP8 formulation streams fastest (issue 5).

    python3 benchmarks/gemv_chain.py --out $OUT/gemv_chain.json [--layers 30] [--m 1,16]
    python3 benchmarks/gemv_chain.py --tiny      # CPU dry run: small shapes, every variant checked

Batch-1 FP8 decode was 1.14x bf16 before session 11 (1.40x since), where 1.7x is the target (docs/quant_notes.md): the FP8 GEMVs
stream ~2.3 TB/s where bf16's reach the HBM rate. A kernel timed alone pays its launch and its
ramp for every call, which no decode step pays in isolation, so this times what a step runs:
`--layers` blocks back to back, each with its 7 matmuls on its own weights (q, k, v, o, gate, up,
down; 218 MB per block in e4m3), an RMSNorm, a stand-in for attention (q + tiled k + v) and the
residual adds, so every GEMV depends on the one before, as in the model. Variants (same e4m3
codes and per-channel scales everywhere; bf16 holds those weights dequantized):

  bf16         the model's `dense` on bf16 weights: the baseline, 2 bytes per weight
  xla_wo       `dense` on QuantArray under IMP_JAX_GEMM=auto: XLA's dot on the weight converted
               to bf16 inside its operand load (the decode path; above 64 rows, "fp8" mode's
               W8A8 dot), codes stored K-major ([N, K])
  xla_wo_kn    the same weight-only dot on codes in the weight's [K, N] layout (the layout
               QuantArray stored before session 11)
  *_cat        the same with q/k/v and gate/up concatenated into one weight each (4 GEMVs a
               block instead of 7: what fusing the weights at load time would buy)
  reduce       sum(x[:, :, None] * w) in f32: a column reduction, no dot (M = 1 only)
  f16bits      e4m3 -> f16 by bit moves (sign << 8, exponent + mantissa << 7: the value / 2^8,
               the 2^8 folded into the scale) instead of a convert, then an f16 dot
  bf16bits     the same into bf16 (exponent + mantissa << 4: the value / 2^120, which bf16's
               range holds, subnormals as bf16 subnormals), a bf16 dot: x stays bf16
  w8a8_nk      `dense` on QuantArray under IMP_JAX_GEMM=xla: per-token e4m3 activations, XLA's
               fp8 dot on the K-major codes at every M (at M > 64 what xla_wo runs)
  mgpu_nk_cat  pallas_kernels.skinny_fp8 (Mosaic GPU, fp8 wgmma) on [N, K] concatenated weights
  triton       pallas_kernels.skinny_gemm (IMP_JAX_GEMM=pallas)
  xla_wo_f16   XLA's weight-only dot with both operands in f16 (e4m3 -> f16 is one hardware
               conversion per two codes; e4m3 -> bf16 goes through f16 or f32), f32 sums
  xla_wo_int8  `dense` on int8 codes of the same weights (int8 -> bf16: XLA's conversion;
               re-quantizing the e4m3 values adds int8's own rounding to its error)
  read_fp8 / read_bf16   every weight summed, no matmul: the stream rate in this process

Each variant's final activations are compared with bf16's (relative Frobenius error; the W8A8
ones also quantize activations). Time: `--calls` chains dispatched back to back (no host sync
between them), median of `--reps`, per chain. TB/s on the variant's own weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from imp_jax import quant  # noqa: E402
from imp_jax.models.llama import dense, rms_norm, silu_mul  # noqa: E402

# name, K, N of one block's matmuls (Llama-3-8B); tiny: the same roles at 1/16 width
BLOCK = (("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024), ("o", 4096, 4096),
         ("gate", 4096, 14336), ("up", 4096, 14336), ("down", 14336, 4096))
TINY = tuple((n, K // 16, N // 16) for n, K, N in BLOCK)


def make_block(key, shapes) -> dict[str, quant.QuantArray]:
    out = {}
    for (name, K, N), k in zip(shapes, jax.random.split(key, len(shapes))):
        w = jax.random.normal(k, (K, N), jnp.float32) * K ** -0.5
        out[name] = quant.quantize(w, "fp8")
    return out


def concat(block: dict) -> dict:
    """q/k/v -> qkv and gate/up -> gate_up along N (codes [N, K] and scales [1, N] alike)."""
    def cat(names):
        ws = [block[n] for n in names]
        return quant.QuantArray(jnp.concatenate([w.q for w in ws], 0),
                                jnp.concatenate([w.scale for w in ws], 1), "fp8")
    return {"qkv": cat(("q", "k", "v")), "o": block["o"], "gate_up": cat(("gate", "up")),
            "down": block["down"]}


# -- per-variant weight preparation and matmul ----------------------------------------------------

def mm_reduce(h, w):
    q, scale = w  # prep_kn: [K, N] codes
    y = jnp.sum(h.astype(jnp.float32)[:, :, None] * q.astype(jnp.float32)[None], axis=1)
    return (y * scale).astype(h.dtype)


def prep_f16bits(w):
    return (w.codes(), w.scale * 256.0)  # [K, N]


def mm_f16bits(h, w):
    q, scale = w
    b = jax.lax.bitcast_convert_type(q, jnp.uint8).astype(jnp.uint16)
    bits = ((b & 0x7F) << 7) | ((b & 0x80) << 8)  # exact: e4m3 value / 2^8 as an f16
    w16 = jax.lax.bitcast_convert_type(bits, jnp.float16)
    y = jax.lax.dot(h.astype(jnp.float16), w16, preferred_element_type=jnp.float32)
    return (y * scale).astype(h.dtype)


BF16_BIAS = 2.0 ** 120  # e4m3 (bias 7) moved into bf16's exponent field (bias 127)


def prep_bf16bits(w):
    return (w.codes(), w.scale * BF16_BIAS)  # [K, N]


def mm_bf16bits(h, w):
    q, scale = w
    b = jax.lax.bitcast_convert_type(q, jnp.uint8).astype(jnp.uint16)
    bits = ((b & 0x7F) << 4) | ((b & 0x80) << 8)  # the value / 2^120 (subnormals included)
    w16 = jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    y = jax.lax.dot(h, w16, preferred_element_type=jnp.float32)
    return (y * scale).astype(h.dtype)


def prep_nk(w):
    return (w.q, w.scale.reshape(-1))  # QuantArray codes are stored [N, K]


def prep_kn(w):
    return (w.codes(), w.scale)  # the codes in the weight's [K, N] layout (before session 11)


def mm_wo_kn(h, w):
    q, scale = w
    y = jax.lax.dot(h, q.astype(h.dtype), preferred_element_type=jnp.float32)
    return (y * scale).astype(h.dtype)


def mm_wo_f16(h, w):
    q, scale = w  # prep_nk: [N, K] codes
    y = jax.lax.dot_general(h.astype(jnp.float16), q.astype(jnp.float16),
                            (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * scale).astype(h.dtype)


def mm_mgpu_nk(h, w):
    from pallas_kernels.skinny_fp8 import skinny_fp8_matmul

    qt, ws = w
    xq, xs = quant.quantize_activations(h, 1)
    return skinny_fp8_matmul(xq, xs, qt, ws, out_dtype=h.dtype)


VARIANTS = {  # name: (prep, mm, concatenated, gemm backend, max M)
    "bf16": (lambda w: w.dequantize(jnp.bfloat16), dense, False, "auto", None),
    "bf16_cat": (lambda w: w.dequantize(jnp.bfloat16), dense, True, "auto", None),
    "xla_wo": (lambda w: w, dense, False, "auto", None),
    "xla_wo_cat": (lambda w: w, dense, True, "auto", None),
    "xla_wo_kn": (prep_kn, mm_wo_kn, False, "auto", None),
    "xla_wo_f16": (prep_nk, mm_wo_f16, False, "auto", None),
    "xla_wo_int8": (lambda w: quant.quantize(w.dequantize(jnp.float32), "int8"), dense, False,
                    "auto", None),
    "reduce": (prep_kn, mm_reduce, False, "auto", 1),
    "reduce_cat": (prep_kn, mm_reduce, True, "auto", 1),
    "f16bits": (prep_f16bits, mm_f16bits, False, "auto", None),
    "f16bits_cat": (prep_f16bits, mm_f16bits, True, "auto", None),
    "bf16bits": (prep_bf16bits, mm_bf16bits, False, "auto", None),
    "bf16bits_cat": (prep_bf16bits, mm_bf16bits, True, "auto", None),
    "w8a8_nk": (lambda w: w, dense, False, "xla", None),  # QuantArray's W8A8 at every M
    "w8a8_nk_cat": (lambda w: w, dense, True, "xla", None),
    "mgpu_nk_cat": (prep_nk, mm_mgpu_nk, True, "auto", 64),
    "triton": (lambda w: w, dense, False, "pallas", 64),
}


def block_fn(x, w, mm, cat: bool, eps=1e-5):
    """One decoder block's matmul chain (attention replaced by q + tiled (k + v))."""
    h = rms_norm(x, jnp.ones(x.shape[-1], x.dtype), eps)
    if cat:
        qkv = mm(h, w["qkv"])
        nq = x.shape[-1]
        q, k, v = jnp.split(qkv, [nq, nq + (qkv.shape[-1] - nq) // 2], axis=-1)
    else:
        q, k, v = mm(h, w["q"]), mm(h, w["k"]), mm(h, w["v"])
    a = q + jnp.tile(k + v, (1, q.shape[-1] // k.shape[-1]))
    x = x + mm(a, w["o"])
    h = rms_norm(x, jnp.ones(x.shape[-1], x.dtype), eps)
    if cat:
        g, u = jnp.split(mm(h, w["gate_up"]), 2, axis=-1)
    else:
        g, u = mm(h, w["gate"]), mm(h, w["up"])
    return x + mm(silu_mul(g, u), w["down"])


def chain(x, weights, mm, cat):
    for w in weights:
        x = block_fn(x, w, mm, cat)
    return x


def read_all(weights):
    """Every weight streamed once (summed): no matmul, the same bytes."""
    total = jnp.zeros((), jnp.float32)
    for w in weights:
        for a in jax.tree.leaves(w):
            total = total + jnp.sum(a.astype(jnp.float32))
    return total


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def timed(fn, args, calls: int, reps: int, feed: bool) -> float:
    """Median seconds per call over `reps` runs of `calls` back-to-back calls (feed: each call's
    output is the next call's first argument, so the calls form one dependent stream)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        y = args[0]
        for _ in range(calls):
            y = fn(y, *args[1:]) if feed else fn(*args)
        jax.block_until_ready(y)
        ts.append((time.perf_counter() - t) / calls)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--m", default="1,16", help="token rows (comma list)")
    ap.add_argument("--variants", default=",".join(("read",) + tuple(VARIANTS)))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--hlo", default=None, help="folder: optimized HLO of bf16 / xla_wo at M=1")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (small widths, 2 layers)")
    args = ap.parse_args()
    end = time.time() + args.budget_s
    shapes = TINY if args.tiny else BLOCK
    layers = 2 if args.tiny else args.layers
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS) - {"read"})
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)}, read")
    blocks = [make_block(k, shapes) for k in jax.random.split(jax.random.key(0), layers)]
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__, "layers": layers,
           "block_shapes": shapes, "rows": []}

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    if "read" in names and not args.tiny:
        for label, prep in (("read_fp8", lambda w: w.q), ("read_bf16", VARIANTS["bf16"][0])):
            ws = [{n: prep(w) for n, w in b.items()} for b in blocks]
            s = timed(jax.jit(read_all), (ws,), args.calls, args.reps, feed=False)
            gb = quant.params_nbytes(ws) / 1e9
            res["rows"].append(dict(variant=label, m=0, ms=s * 1e3, gb=gb, tb_s=gb / s / 1e3))
            print(f"{label:12s}  {s * 1e3:8.3f} ms  {gb:6.2f} GB  {gb / s / 1e3:5.2f} TB/s",
                  flush=True)
            del ws
        save()
    base = {}
    for M in (int(m) for m in args.m.split(",")):
        x = jax.random.normal(jax.random.key(M), (M, shapes[0][1]), jnp.bfloat16)
        for name in names:
            if name == "read":
                continue
            prep, mm, cat, backend, max_m = VARIANTS[name]
            if max_m is not None and M > max_m:
                continue
            if time.time() > end:
                print(f"SKIPPED (budget): {name} M={M}", flush=True)
                continue
            quant.set_gemm_backend("interpret" if args.tiny and backend == "pallas"
                                   else backend)
            try:
                if args.tiny and name.startswith("mgpu"):
                    raise RuntimeError("Mosaic GPU kernel: GPU only (tests/test_skinny_fp8.py "
                                       "covers it interpreted)")
                ws = [{n: prep(w) for n, w in (concat(b) if cat else b).items()} for b in blocks]
                fn = jax.jit(lambda x, ws, mm=mm, cat=cat: chain(x, ws, mm, cat))
                t0 = time.time()
                y = jax.block_until_ready(fn(x, ws))
                compile_s = time.time() - t0
                if args.hlo and M == 1 and name in ("bf16", "xla_wo"):
                    os.makedirs(args.hlo, exist_ok=True)
                    with open(os.path.join(args.hlo, f"hlo_{name}.txt"), "w") as f:
                        f.write(fn.lower(x, ws).compile().as_text())
                if name == "bf16":
                    base[M] = y
                err = rel(y, base[M]) if M in base else float("nan")
                s = timed(fn, (x, ws), args.calls, args.reps, feed=True)
                gb = quant.params_nbytes(ws) / 1e9
                row = dict(variant=name, m=M, ms=s * 1e3, gb=gb, tb_s=gb / s / 1e3,
                           rel_err_vs_bf16=err, compile_s=compile_s)
                if M in base and name != "bf16":
                    bf = next(r for r in res["rows"] if r["variant"] == "bf16" and r["m"] == M)
                    row["speedup_vs_bf16"] = bf["ms"] / row["ms"]
                res["rows"].append(row)
                print(f"{name:12s} M={M:3d}  {s * 1e3:8.3f} ms  {gb:6.2f} GB  "
                      f"{gb / s / 1e3:5.2f} TB/s  x{row.get('speedup_vs_bf16', 1):.2f} vs bf16  "
                      f"err {err:.2e}  (compile {compile_s:.1f}s)", flush=True)
                del ws
            except Exception as e:  # one variant's failure must not hide the others
                traceback.print_exc()
                res["rows"].append(dict(variant=name, m=M, error=f"{type(e).__name__}: {e}"))
            save()
    quant.set_gemm_backend(None)
    save()


if __name__ == "__main__":
    main()
