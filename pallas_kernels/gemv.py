"""GEMV for decode on CUDA cores: y[M, N] = (x[M, K] @ q[N, K]^T) * scale[N], M = 1..8.

At the engine's decode sizes (1-8 token rows) a matmul is a stream of the weight: every weight
byte is used M times. The tensor-core kernels (`skinny_gemm`, `skinny_fp8`) pad M to a tile of
16-64 and move each weight tile through shared memory into the MMA operand layout; XLA's fused
convert + dot reads e4m3 at ~2.7 TB/s on an H200, below bf16's 3.5 (docs/quant_notes.md,
session 11). This kernel is the plain GEMV instead: each program owns `block_n` output channels,
reads their K-contiguous codes (16-byte loads of the stored [N, K] layout, QuantArray's K-major
codes), converts them in registers (e4m3 and int8 -> f32 are exact) and multiplies them into
each of the M activation rows on the CUDA cores, reducing along K once per step. Per weight byte
that is one conversion and M fused multiply-adds, so M is kept small (`MAX_M`).

Grid: (N / block_n, splits). K is split `splits` ways when N / block_n gives too few programs;
partials are f32 and a small XLA epilogue sums them and applies the scale.

    gemv(x, q, scale, interpret=False) -> [M, N] in x.dtype (or out_dtype)
    gemv_ref(x, q, scale)               -> the jnp reference
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_M = 8
VEC = 16  # codes per 16-byte load: the innermost axis of the kernel's 3-D views


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16   # output channels per program
    block_k: int = 512  # K elements per step (16-byte loads of 8-bit codes: 32 threads per row)
    splits: int = 1     # K partitions
    num_warps: int = 4
    num_stages: int = 2


def _valid(K: int, N: int, cfg: GemvConfig) -> bool:
    return (N % cfg.block_n == 0 and cfg.block_k % VEC == 0
            and K % (cfg.splits * cfg.block_k) == 0)


def choose_config(M: int, K: int, N: int, *, block_n: int = 16, block_k: int = 512,
                  num_warps: int = 4, num_stages: int = 2) -> GemvConfig:
    """The given tiles (shrunk to divide K and N), K split until there are >= 512 programs
    (~4 per SM of 132), each split keeping >= 4 steps of block_k."""
    bk, bn = block_k, block_n
    while K % bk:
        bk //= 2
    while N % bn:
        bn //= 2
    splits = 1
    while (N // bn) * splits < 512 and K % (splits * 2 * bk) == 0 and K // (splits * 2) >= 4 * bk:
        splits *= 2
    return GemvConfig(bn, bk, splits, num_warps, num_stages)


def supported(M: int, K: int, N: int) -> bool:
    return 1 <= M <= MAX_M and K % 64 == 0 and N % 8 == 0


def gemv_ref(x: jax.Array, q: jax.Array, scale: jax.Array, out_dtype=None) -> jax.Array:
    """The reference: exact conversion of q, f32 products and sums, per-channel scale."""
    y = lax.dot_general(x.astype(jnp.float32), q.astype(jnp.float32), (((1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST)
    return (y * scale.reshape(1, -1).astype(jnp.float32)).astype(out_dtype or x.dtype)


def _kernel(x_ref, w_ref, *rest, m: int, block_k: int, k_steps: int, scaled: bool):
    # x_ref [Mp, Ks/VEC, VEC]; w_ref [bn, Ks/VEC, VEC] (this program's channels and K range);
    # scaled: s_ref [1, bn], o_ref [Mp, bn] in the output dtype; else o_ref [Mp, bn] f32 partial.
    # The VEC axis is one thread's 16-byte load, so summing over it each step stays inside the
    # thread; the sum across threads runs once, after the loop.
    if scaled:
        s_ref, o_ref = rest
    else:
        (o_ref,) = rest
    bn, steps = w_ref.shape[0], block_k // VEC

    def body(i, accs):
        ks = pl.ds(pl.multiple_of(i * steps, steps), steps)
        w = w_ref[:, ks, :].astype(jnp.float32)  # [bn, steps, VEC]: dequantize in registers
        return tuple(acc + jnp.sum(w * x_ref[r, ks, :].astype(jnp.float32)[None], axis=2)
                     for r, acc in enumerate(accs))

    accs = lax.fori_loop(0, k_steps, body, tuple(jnp.zeros((bn, steps), jnp.float32)
                                                 for _ in range(m)))
    for r, acc in enumerate(accs):
        y = jnp.sum(acc, axis=1)
        o_ref[r, :] = (y * s_ref[0, :]).astype(o_ref.dtype) if scaled else y


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def gemv(x: jax.Array, q: jax.Array, scale: jax.Array, *, config: GemvConfig | None = None,
         interpret: bool = False, out_dtype=None) -> jax.Array:
    """x [M, K] (bf16/f16/f32, M <= MAX_M) @ q [N, K]^T (float8_e4m3fn / int8 codes, K-major)
    * scale (N elements) -> [M, N] in out_dtype (default x.dtype)."""
    M, K = x.shape
    N, K2 = q.shape
    if K2 != K:
        raise ValueError(f"x is [M={M}, K={K}] but q is {q.shape} ([N, K])")
    if not 1 <= M <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} rows, got M={M}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    cfg = config or choose_config(M, K, N)
    if not _valid(K, N, cfg):
        raise ValueError(f"{cfg} does not tile K={K}, N={N}")
    Mp = 1 << (M - 1).bit_length()  # Triton blocks are powers of two; padded rows are not read
    xp = jnp.pad(x, ((0, Mp - M), (0, 0))) if Mp != M else x
    Ks, bn = K // cfg.splits, cfg.block_n
    scale = scale.reshape(1, N).astype(jnp.float32)
    scaled = cfg.splits == 1
    kernel = functools.partial(_kernel, m=M, block_k=cfg.block_k, k_steps=Ks // cfg.block_k,
                               scaled=scaled)
    in_specs = [pl.BlockSpec((Mp, Ks // VEC, VEC), lambda n, s: (0, s, 0)),
                pl.BlockSpec((bn, Ks // VEC, VEC), lambda n, s: (n, s, 0))]
    args = [xp.reshape(Mp, K // VEC, VEC), q.reshape(N, K // VEC, VEC)]
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
        name=f"imp_gemv_M{M}_bn{bn}_bk{cfg.block_k}_sp{cfg.splits}",
    )(*args)
    if scaled:
        return y[:M] if Mp != M else y
    return (y[:, :M].sum(axis=0) * scale).astype(out_dtype)


def weight_bytes(K: int, N: int, itemsize: int = 1) -> int:
    return K * N * itemsize + N * 4


__all__ = ["GemvConfig", "MAX_M", "choose_config", "gemv", "gemv_ref", "supported",
           "weight_bytes"]
