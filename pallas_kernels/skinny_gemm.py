"""Skinny GEMM for decode: y[M, N] = (x[M, K] @ W) * scale[N], M = 1..64, W in fp8 / int8.

Decode matmuls are bound by reading the weight once; with 8-bit weights that is half of bf16's
bytes. The kernel (Pallas, Triton backend) streams W once, converts each [block_k, block_n] tile
to the activation dtype in registers (exact for e4m3 and int8 -> bf16) and accumulates in f32 on
the tensor cores; the per-output-channel scale factors out of the sum and is applied once at the
end (the same algebra as `imp_jax.quant.QuantArray.quantized_dot` weight-only modes).

Weight layouts: `w_layout="nk"` (W is q[N, K], K contiguous: how `imp_jax.quant.QuantArray`
stores every weight's codes, the engine's only layout) or `"kn"` (W is q[K, N], a weight's own
[in, out] layout, N contiguous: tests and benchmarks).

Grid: (N / block_n, splits). Llama shapes give few N tiles (N = 4096 -> 32 tiles of 128) for 132
SMs, so K may be split `splits` ways:
  * splits == 1: each program owns whole output columns; it applies the scale and writes
    out_dtype itself (one kernel, nothing else).
  * splits > 1: each program writes an f32 partial [Mp, block_n]; a small jnp epilogue sums the
    partials and applies the scale (one more, small, XLA fusion; splits * M * N * 4 bytes each
    way, kept small next to K * N by `choose_config`).
M is padded to 16 (the smallest tensor-core tile) or the next power of two; padding rows cost no
weight bytes.

    skinny_gemm(x, q, scale, interpret=False)   -> [M, N] in x.dtype (or out_dtype)
    skinny_gemm_ref(x, q, scale)                -> the jnp reference
    choose_config(M, K, N), candidate_configs   -> launch configs (TUNED table, else a heuristic)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NUM_SMS_H100 = 132
HBM_TBS = 2.94  # measured weight-streaming ceiling on the H100 (../shared/GPU.md)


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 128
    block_k: int = 128  # K rows per inner step
    splits: int = 1  # K partitions (each K / splits long, a multiple of block_k)
    num_warps: int = 4
    num_stages: int = 3


def padded_m(M: int) -> int:
    return max(16, 1 << max(0, M - 1).bit_length())


def _pow2_divisor(k: int) -> int:
    return k & -k


def _valid(M: int, K: int, N: int, cfg: GemmConfig) -> bool:
    return (N % cfg.block_n == 0 and cfg.block_n >= 16 and cfg.block_k >= 16
            and K % (cfg.splits * cfg.block_k) == 0)


def estimate_us(M: int, K: int, N: int, cfg: GemmConfig, itemsize: int = 1,
                num_sms: int = NUM_SMS_H100) -> float:
    """A rough time model used to rank configs (not a measurement): weight + partial bytes at the
    HBM ceiling, derated when too few bytes are in flight (Little's law: ~3 MB at ~1 us
    latency), too few programs stream, or the last wave is ragged; plus ~2 us for the split
    epilogue's extra launch."""
    Mp = padded_m(M)
    programs = (N // cfg.block_n) * cfg.splits
    nbytes = K * N * itemsize + N * 4
    if cfg.splits > 1:
        nbytes += cfg.splits * N * (Mp + M) * 4
    tile = cfg.block_k * cfg.block_n * itemsize
    smem = cfg.num_stages * (tile + Mp * cfg.block_k * 2)
    resident = max(1, min(4, (160 * 1024) // smem, 16 // max(1, cfg.num_warps // 4)))
    slots = resident * num_sms
    inflight = min(programs, slots) * (cfg.num_stages - 1) * tile
    eff = min(1.0, inflight / 3e6)
    eff *= min(1.0, programs / num_sms)  # at least one streaming program per SM
    if programs > slots:
        eff *= programs / (math.ceil(programs / slots) * slots)
    # narrow tiles read short rows (block_n bytes) -> less efficient DRAM bursts
    eff *= {16: 0.6, 32: 0.8, 64: 0.95}.get(cfg.block_n * itemsize, 1.0)
    steps = K // (cfg.splits * cfg.block_k)
    eff *= min(1.0, steps / (cfg.num_stages + 1))  # too few K steps: pipeline never fills
    return nbytes / (HBM_TBS * 1e12 * max(eff, 1e-3)) * 1e6 + (2.0 if cfg.splits > 1 else 0.0)


def candidate_configs(M: int, K: int, N: int, *, itemsize: int = 1) -> list[GemmConfig]:
    """Every config of a small grid that tiles (K, N), best estimate first."""
    Mp = padded_m(M)
    out = []
    for bn in (32, 64, 128, 256):
        for bk in (64, 128, 256):
            # per-stage bytes <= 32 KB: 3 stages plus the bf16 copy of a weight tile Triton may
            # stage for the dot's operand layout stay well inside the 227 KB of SMEM
            if Mp * bk * 2 + bk * bn * itemsize > 32 * 1024:
                continue
            for splits in (1, 2, 4, 8, 16):
                warps = 8 if Mp * bn >= 64 * 128 else 4
                cfg = GemmConfig(bn, bk, splits, warps, 3)
                if _valid(M, K, N, cfg) and K // (splits * bk) >= 2:
                    out.append(cfg)
    out.sort(key=lambda c: (round(estimate_us(M, K, N, c, itemsize), 1), c.splits,
                           -c.block_k * c.block_n))
    return out


def choose_config(M: int, K: int, N: int, *, block_n: int | None = None,
                  block_k: int | None = None, splits: int | None = None,
                  target_programs: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, itemsize: int = 1) -> GemmConfig:
    """A launch config: the tuned table's entry if any, else the best of `candidate_configs` by
    `estimate_us`; keyword arguments pin fields (and `target_programs` picks the split that
    gives about that many programs)."""
    pinned = dict(block_n=block_n, block_k=block_k, splits=splits, num_warps=num_warps,
                  num_stages=num_stages)
    pinned = {k: v for k, v in pinned.items() if v is not None}
    if not pinned and target_programs is None:
        tuned = TUNED.get((K, N, padded_m(M)))
        if tuned is not None and _valid(M, K, N, tuned):
            return tuned
    if target_programs is not None and "splits" not in pinned:
        bn = pinned.get("block_n") or (64 if N <= 4096 else 128)
        bn = min(bn, _pow2_divisor(N))
        bk = pinned.get("block_k") or 128
        bk = min(bk, _pow2_divisor(K))
        s = 1
        while ((N // bn) * s * 2 <= target_programs and K % (s * 2 * bk) == 0
               and K // (s * 2) >= 4 * bk):
            s *= 2
        pinned.update(block_n=bn, block_k=bk, splits=s)
    for cfg in candidate_configs(M, K, N, itemsize=itemsize):
        cfg = GemmConfig(**{**cfg.__dict__, **pinned})
        if _valid(M, K, N, cfg):
            return cfg
    # nothing in the grid fits: the largest power-of-two tiles that divide
    bn = min(pinned.get("block_n", 128), _pow2_divisor(N))
    bk = min(pinned.get("block_k", 128), _pow2_divisor(K))
    return GemmConfig(bn, bk, 1, pinned.get("num_warps", 4), pinned.get("num_stages", 3))


# (K, N, padded M) -> GemmConfig measured best on the H100 (benchmarks/gemm.py prints these).
# Empty until a GPU run fills it; choose_config falls back to the estimate.
TUNED: dict[tuple[int, int, int], GemmConfig] = {}


def supported(M: int, K: int, N: int) -> bool:
    return 1 <= M <= 256 and K % 16 == 0 and N % 16 == 0


def skinny_gemm_ref(x: jax.Array, q: jax.Array, scale: jax.Array, *, w_layout: str = "kn",
                    out_dtype=None) -> jax.Array:
    """The reference: exact conversion of q, f32 accumulation, per-column scale."""
    dims = ((1,), (0,)) if w_layout == "kn" else ((1,), (1,))
    y = lax.dot_general(x, q.astype(x.dtype), (dims, ((), ())),
                        preferred_element_type=jnp.float32)
    return (y * scale.reshape(1, -1).astype(jnp.float32)).astype(out_dtype or x.dtype)


def _kernel(x_ref, w_ref, *rest, block_k: int, k_steps: int, precision, nk: bool,
            scaled: bool):
    # x_ref [Mp, Ks]; w_ref [Ks, bn] ("kn") or [bn, Ks] ("nk") -- this program's K range;
    # scaled: s_ref [1, bn] and o_ref [Mp, bn] out dtype; else o_ref [Mp, bn] f32 partial
    if scaled:
        s_ref, o_ref = rest
    else:
        (o_ref,) = rest
    Mp = x_ref.shape[0]
    bn = w_ref.shape[0] if nk else w_ref.shape[1]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = x_ref[:, ks]
        w = (w_ref[:, ks] if nk else w_ref[ks, :]).astype(x.dtype)  # dequantize in registers
        return acc + pltriton.dot(x, w, trans_b=nk, precision=precision)

    acc = lax.fori_loop(0, k_steps, body, jnp.zeros((Mp, bn), jnp.float32))
    if scaled:
        o_ref[...] = (acc * s_ref[...]).astype(o_ref.dtype)
    else:
        o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("config", "interpret", "w_layout", "out_dtype"))
def skinny_gemm(x: jax.Array, q: jax.Array, scale: jax.Array, *, config: GemmConfig | None = None,
                interpret: bool = False, w_layout: str = "kn", out_dtype=None) -> jax.Array:
    """x [M, K] (bf16/f16/f32) @ q (float8_e4m3fn / int8; [K, N] for "kn", [N, K] for "nk")
    * scale ([N] or any shape of N elements) -> [M, N] in out_dtype (default x.dtype)."""
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"w_layout must be 'kn' or 'nk', got {w_layout!r}")
    nk = w_layout == "nk"
    M, K = x.shape
    N, K2 = q.shape if nk else q.shape[::-1]
    if K2 != K:
        raise ValueError(f"x is [M={M}, K={K}] but q is {q.shape} ({w_layout})")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    cfg = config or choose_config(M, K, N, itemsize=q.dtype.itemsize)
    if not _valid(M, K, N, cfg):
        raise ValueError(f"{cfg} does not tile K={K}, N={N}")
    Mp = padded_m(M)
    xp = jnp.pad(x, ((0, Mp - M), (0, 0))) if Mp != M else x
    Ks = K // cfg.splits
    bn = cfg.block_n
    scale = scale.reshape(1, N).astype(jnp.float32)
    scaled = cfg.splits == 1
    kernel = functools.partial(_kernel, block_k=cfg.block_k, k_steps=Ks // cfg.block_k,
                               precision=(lax.Precision.HIGHEST if x.dtype == jnp.float32
                                          else None), nk=nk, scaled=scaled)
    w_spec = (pl.BlockSpec((bn, Ks), lambda n, s: (n, s)) if nk
              else pl.BlockSpec((Ks, bn), lambda n, s: (s, n)))
    in_specs = [pl.BlockSpec((Mp, Ks), lambda n, s: (0, s)), w_spec]
    args = [xp, q]
    if scaled:
        in_specs.append(pl.BlockSpec((1, bn), lambda n, s: (0, n)))
        args.append(scale)
        out_spec = pl.BlockSpec((Mp, bn), lambda n, s: (0, n))
        out_shape = jax.ShapeDtypeStruct((Mp, N), out_dtype)
    else:
        out_spec = pl.BlockSpec((None, Mp, bn), lambda n, s: (s, 0, n))
        out_shape = jax.ShapeDtypeStruct((cfg.splits, Mp, N), jnp.float32)
    y = pl.pallas_call(
        kernel,
        grid=(N // bn, cfg.splits),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"imp_skinny_gemm_{w_layout}_M{Mp}_bn{bn}_bk{cfg.block_k}_sp{cfg.splits}",
    )(*args)
    if scaled:
        return y[:M] if Mp != M else y
    return (y[:, :M].sum(axis=0) * scale).astype(out_dtype)


def weight_bytes(K: int, N: int, itemsize: int = 1) -> int:
    return K * N * itemsize + N * 4


__all__ = ["GemmConfig", "TUNED", "candidate_configs", "choose_config", "estimate_us",
           "padded_m", "skinny_gemm", "skinny_gemm_ref", "supported", "weight_bytes"]
