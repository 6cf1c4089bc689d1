"""Skinny GEMM for decode: y[M, N] = (x[M, K] @ q[K, N]) * scale[N], M = 1..64, q in fp8 / int8.

Decode matmuls are bound by reading the weight once; with 8-bit weights that is half of bf16's
bytes. The kernel (Pallas, Triton backend) streams q once, converts each [block_k, block_n] tile
to the activation dtype in registers (exact for e4m3 and int8 -> bf16) and accumulates in f32 on
the tensor cores; the per-output-channel scale factors out of the sum and is applied once at the
end (the same algebra as `imp_jax.quant.QuantArray.quantized_dot` weight-only modes).

Grid: (N / block_n, splits). Llama shapes give few N tiles (N = 4096 -> 32 tiles of 128) for 132
SMs, so K is split `splits` ways; each program writes an f32 partial [M, block_n] and a small jnp
epilogue sums the partials and applies the scale (splits * M * N * 4 bytes, small next to K * N).
M is padded to 16 (the smallest tensor-core tile); padding rows cost no weight bytes.

    skinny_gemm(x, q, scale, interpret=False) -> [M, N] in x.dtype
    skinny_gemm_ref(x, q, scale)                -> the jnp reference
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NUM_SMS_H100 = 132


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 128
    block_k: int = 128  # K rows per inner step
    splits: int = 1  # K partitions (each K / splits long, a multiple of block_k)
    num_warps: int = 4
    num_stages: int = 3


def _pow2_divisor(k: int) -> int:
    return k & -k


def choose_config(M: int, K: int, N: int, *, block_n: int | None = None,
                  block_k: int | None = None, target_programs: int = 2 * NUM_SMS_H100,
                  num_warps: int = 4, num_stages: int = 3) -> GemmConfig:
    """Tiles and a K split that give roughly `target_programs` programs."""
    bn = block_n or (64 if N <= 4096 else 128)
    bn = min(bn, _pow2_divisor(N))
    bk = block_k or (128 if M <= 16 else 64)  # larger M: keep the f32 accumulator in registers
    bk = min(bk, _pow2_divisor(K))
    n_tiles = N // bn
    splits = 1
    # splits must keep K / splits a multiple of bk
    while n_tiles * splits * 2 <= target_programs and (K // (splits * 2)) % bk == 0 \
            and K % (splits * 2) == 0 and K // (splits * 2) >= 4 * bk:
        splits *= 2
    return GemmConfig(bn, bk, splits, num_warps, num_stages)


def supported(M: int, K: int, N: int) -> bool:
    return M <= 256 and K % 16 == 0 and N % 16 == 0


def skinny_gemm_ref(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """The reference: exact conversion of q, f32 accumulation, per-column scale."""
    y = jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale.reshape(-1).astype(jnp.float32)).astype(x.dtype)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, k_steps: int, precision):
    # x_ref [Mp, Ks], w_ref [Ks, bn] (this program's K range), o_ref [Mp, bn] f32 partial
    Mp = x_ref.shape[0]
    bn = w_ref.shape[1]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = x_ref[:, ks]
        w = w_ref[ks, :].astype(x.dtype)  # dequantize in registers (the scale comes later)
        return acc + pltriton.dot(x, w, precision=precision)

    o_ref[...] = lax.fori_loop(0, k_steps, body, jnp.zeros((Mp, bn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def skinny_gemm(x: jax.Array, q: jax.Array, scale: jax.Array, *, config: GemmConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """x [M, K] (bf16/f16/f32) @ q [K, N] (float8_e4m3fn / int8) * scale [N] or [1, N] -> [M, N]."""
    M, K = x.shape
    K2, N = q.shape
    if K2 != K:
        raise ValueError(f"x is [M={M}, K={K}] but q is [{K2}, {N}]")
    cfg = config or choose_config(M, K, N)
    if N % cfg.block_n or K % (cfg.splits * cfg.block_k):
        raise ValueError(f"{cfg} does not tile K={K}, N={N}")
    Mp = max(16, 1 << max(0, M - 1).bit_length())
    xp = jnp.pad(x, ((0, Mp - M), (0, 0))) if Mp != M else x
    Ks = K // cfg.splits
    kernel = functools.partial(_kernel, block_k=cfg.block_k, k_steps=Ks // cfg.block_k,
                               precision=(lax.Precision.HIGHEST if x.dtype == jnp.float32
                                          else None))
    partial = pl.pallas_call(
        kernel,
        grid=(N // cfg.block_n, cfg.splits),
        in_specs=[pl.BlockSpec((Mp, Ks), lambda n, s: (0, s)),
                  pl.BlockSpec((Ks, cfg.block_n), lambda n, s: (s, n))],
        out_specs=pl.BlockSpec((None, Mp, cfg.block_n), lambda n, s: (s, 0, n)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, Mp, N), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"imp_skinny_gemm_M{Mp}_bn{cfg.block_n}_bk{cfg.block_k}_sp{cfg.splits}",
    )(xp, q)
    y = partial.sum(axis=0)[:M] if cfg.splits > 1 else partial[0, :M]
    return (y * scale.reshape(1, N).astype(jnp.float32)).astype(x.dtype)


def weight_bytes(K: int, N: int, itemsize: int = 1) -> int:
    return K * N * itemsize + N * 4


__all__ = ["GemmConfig", "choose_config", "skinny_gemm", "skinny_gemm_ref", "supported",
           "weight_bytes"]
