"""Fused activation quantization for W8A8 FP8 matmuls: the producer and the per-token e4m3
quantization in one pass over the row.

In `fp8` (W8A8) mode every matmul at prefill sizes quantizes its input per token
(`imp_jax.quant.quantize_activations`: amax over the row, divide, cast to e4m3). Unfused, the
producer of that input writes it in bf16, and the quantization reads it back twice (the amax,
then the cast). The two producers in a Llama block are elementwise-per-row, so one program per
token row can do it all while the row sits in L1/L2:

    rms_norm_quant(x[..., K], w[K], eps) -> (e4m3 [..., K], f32 scale [...])
        the RMSNorm before q/k/v and gate/up: reads x and w, writes e4m3 + one scale per row
        (instead of: norm writes bf16, quantization reads it twice).
    silu_mul_quant(gate[..., N], up[..., N]) -> (e4m3 [..., N], f32 scale [...])
        SiLU-and-mul before down: reads gate and up once from HBM, writes e4m3 + scale
        (instead of: gate/up read, bf16 written, read twice more). At N = 14336 that is the
        largest activation of the block.

Numerics are the unfused model's (`rms_norm_ref` / `silu_mul_ref` are the model's math): the
producer is computed in float32 and rounded to the activation dtype (what the model's RMSNorm /
SiLU-and-mul return) before the amax and the division, so the e4m3 codes equal
`quantize_activations(producer(x))` up to the order of the float32 sums. (Inside a larger jitted
program XLA may skip that rounding, "excess precision"; the kernel keeps it.) Each row is walked
in `chunk`-wide power-of-two slices (Triton's block shapes), three times (sum of squares or
nothing, amax, store); only the first walk misses the cache.

Lowering: the Pallas Triton backend (a row-wise reduction needs none of Mosaic GPU's TMA or
wgmma). `*_ref` are the jnp references; `interpret=True` runs the kernels on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
TINY = 1e-12  # amax floor, as imp_jax.quant: an all-zero row gets q = 0, never NaN
MAX_CHUNK = 4096  # widest slice a program holds in registers (32 floats a thread at 4 warps)
MIN_CHUNK = 32


def row_chunk(n: int) -> int:
    """The slice width a program walks a row of n in: the largest power of two dividing n,
    capped at MAX_CHUNK (0 when n has no power-of-two divisor >= MIN_CHUNK: unsupported)."""
    c = min(n & -n, MAX_CHUNK)
    return c if c >= MIN_CHUNK else 0


def supported(n: int, dtype) -> bool:
    return row_chunk(n) > 0 and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                                      jnp.dtype(jnp.float16))


def _quantize_ref(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    # the same arithmetic as imp_jax.quant.quantize_activations (dims=1)
    y32 = y.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(y32), axis=-1, keepdims=True), TINY) / FP8_MAX
    return jnp.clip(y32 / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale[..., 0]


def rms_norm_ref(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in f32, output in x.dtype: imp_jax.models.llama.rms_norm's math (a test holds
    them equal; this package does not import the model)."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def silu_mul_ref(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU(gate) * up in float32, rounded once to gate.dtype: imp_jax.models.llama.silu_mul's
    math (a test holds them equal)."""
    g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * u).astype(gate.dtype)


def rms_norm_quant_ref(x, w, eps):
    return _quantize_ref(rms_norm_ref(x, w, eps))


def silu_mul_quant_ref(gate, up):
    return _quantize_ref(silu_mul_ref(gate, up))


# ------------------------------------------------------------------------------- kernels


def _slices(n: int, chunk: int):
    return n // chunk, lambda i: pl.ds(pl.multiple_of(i * chunk, chunk), chunk)


def _amax_and_store(value, sl, n_chunks: int, q_ref, s_ref):
    """Shared tail: the amax of value(i) (slice sl(i) of the row) over the row, then the e4m3
    codes and the row's scale."""
    amax = lax.fori_loop(0, n_chunks, lambda i, m: jnp.maximum(m, jnp.max(jnp.abs(value(i)))),
                         jnp.float32(0.0))
    scale = jnp.maximum(amax, TINY) / FP8_MAX

    def store(i, carry):
        q_ref[sl(i)] = jnp.clip(value(i) / scale, -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        return carry

    lax.fori_loop(0, n_chunks, store, 0)
    s_ref[...] = jnp.full(s_ref.shape, scale, jnp.float32)


def _norm_kernel(x_ref, w_ref, q_ref, s_ref, *, chunk: int, eps: float):
    # x_ref, q_ref: [K] (one token row); w_ref: [K]; s_ref: [1]
    K = x_ref.shape[0]
    n_chunks, sl = _slices(K, chunk)

    def sum_sq(i, acc):
        x = x_ref[sl(i)].astype(jnp.float32)
        return acc + jnp.sum(x * x)

    r = lax.rsqrt(lax.fori_loop(0, n_chunks, sum_sq, jnp.float32(0.0)) / K + eps)

    def value(i):  # the norm's output, rounded to the activation dtype as the model returns it
        y = x_ref[sl(i)].astype(jnp.float32) * r * w_ref[sl(i)].astype(jnp.float32)
        return y.astype(x_ref.dtype).astype(jnp.float32)

    _amax_and_store(value, sl, n_chunks, q_ref, s_ref)


def _silu_mul_kernel(g_ref, u_ref, q_ref, s_ref, *, chunk: int):
    n_chunks, sl = _slices(g_ref.shape[0], chunk)

    def value(i):
        g = g_ref[sl(i)].astype(jnp.float32)
        u = u_ref[sl(i)].astype(jnp.float32)
        return (g / (1.0 + jnp.exp(-g)) * u).astype(g_ref.dtype).astype(jnp.float32)

    _amax_and_store(value, sl, n_chunks, q_ref, s_ref)


def _row_call(kernel, rows: list, shared: list, n: int, name: str, interpret: bool):
    """Run `kernel` once per token row of the [M, n] arrays in `rows` (plus [n] arrays in
    `shared`, the same for every row) -> (e4m3 [M, n], f32 scale [M])."""
    M = rows[0].shape[0]
    row = pl.BlockSpec((None, n), lambda m: (m, 0))
    whole = pl.BlockSpec((n,), lambda m: (0,))
    q, s = pl.pallas_call(
        kernel,
        grid=(M,),
        in_specs=[row] * len(rows) + [whole] * len(shared),
        out_specs=[row, pl.BlockSpec((None, 1), lambda m: (m, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, n), FP8), jax.ShapeDtypeStruct((M, 1), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=4 if n <= 4096 else 8, num_stages=1),
        interpret=interpret,
        name=name,
    )(*rows, *shared)
    return q, s[:, 0]


def _check(name: str, n: int, dtype):
    if not supported(n, dtype):
        raise ValueError(f"{name}: rows of {n} {jnp.dtype(dtype).name} are not supported; allowed: "
                         f"bf16/f16 rows whose length has a power-of-two divisor >= {MIN_CHUNK}")


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm_quant(x: jax.Array, w: jax.Array, eps: float, *,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """RMSNorm(x) * w quantized per token to e4m3: x [..., K] bf16/f16, w [K] ->
    (float8_e4m3fn [..., K], float32 scale [...]); dequantized: q * scale[..., None]."""
    K = x.shape[-1]
    _check("rms_norm_quant", K, x.dtype)
    if w.shape != (K,):
        raise ValueError(f"rms_norm_quant: weight shape {w.shape}, expected ({K},)")
    kernel = functools.partial(_norm_kernel, chunk=row_chunk(K), eps=float(eps))
    q, s = _row_call(kernel, [x.reshape(-1, K)], [w], K, f"imp_rms_norm_quant_{K}", interpret)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@functools.partial(jax.jit, static_argnames=("interpret",))
def silu_mul_quant(gate: jax.Array, up: jax.Array, *,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """SiLU(gate) * up quantized per token to e4m3: gate, up [..., N] bf16/f16 ->
    (float8_e4m3fn [..., N], float32 scale [...])."""
    N = gate.shape[-1]
    _check("silu_mul_quant", N, gate.dtype)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"silu_mul_quant: up {up.shape} {up.dtype} must match gate "
                         f"{gate.shape} {gate.dtype}")
    kernel = functools.partial(_silu_mul_kernel, chunk=row_chunk(N))
    q, s = _row_call(kernel, [gate.reshape(-1, N), up.reshape(-1, N)], [], N,
                     f"imp_silu_mul_quant_{N}", interpret)
    return q.reshape(gate.shape), s.reshape(gate.shape[:-1])


__all__ = ["rms_norm_quant", "rms_norm_quant_ref", "silu_mul_quant", "silu_mul_quant_ref",
           "rms_norm_ref", "silu_mul_ref", "row_chunk", "supported"]
