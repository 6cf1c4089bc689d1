"""Weight quantization: FP8 (W8A8 or weight-only) and int8 weight-only, as a pytree leaf.

A quantized weight is a `QuantArray(q, scale)` standing in for a weight of `shape` (spec.py's
shape and logical axes): `scale` is float32 with the weight's shape except that the dims spec.py
marks as `contract` are reduced to 1 (one scale per output channel); `q`, in float8_e4m3fn or
int8, holds the codes **K-major**: the weight's output dims first, its contracted dims last
([N..., K...]; `stored_axes`). That is the only layout Hopper's 8-bit tensor-core operands
(wgmma, cuBLASLt FP8) take. On codes in the weight's own [K, N] layout XLA's W8A8 dot ran 2.3x
*slower* than bf16 at 1024 rows on an H200; on K-major codes 1.43x faster, and its weight-only
decode dot 1.30x faster (benchmarks/gemv_chain.py, docs/quant_notes.md session 11). The embedding table [vocab, embed]
is K-major as it is. The model never branches on it: `models/llama.dense` calls
`w.quantized_dot(x, dims)`, the embedding calls `table.quantized_take(ids)` and the tied head
`table.quantized_dot_t(x)`.

    from imp_jax.quant import quantize_params, QuantPolicy
    qparams = quantize_params(params, cfg, "fp8")              # default policy
    qparams = quantize_params(params, cfg, "int8", QuantPolicy(keep_first=1, keep_last=1))
    ModelRunner(cfg, qparams, ..., dtype=jnp.bfloat16)         # activations in bf16

Modes
  "fp8"              W8A8: activations are quantized per token to e4m3 on the fly (per-token
                     scale), the dot runs on fp8 operands with float32 accumulation (Hopper's FP8
                     tensor cores), both scales are applied to the float32 result.
  "fp8-weight-only"  e4m3 weights, activations stay in the compute dtype: the weight is converted
                     (exactly) to the activation dtype, the per-channel scale applied after the dot.
  "int8"             the same with symmetric int8 weights (|q| <= 127).

Because a scale is per *output* channel it factors out of the sum, so the weight-only modes never
materialise a dequantized weight: `(x @ q) * scale`. The conversion of q fuses into the dot's
operand load (XLA on GPU; `pallas_kernels/skinny_gemm.py` does it explicitly for decode).

GEMM kernels on GPU (`$IMP_JAX_GEMM`, read at trace time; `set_gemm_backend` overrides it)
  "auto" (default)   flattened M <= $IMP_JAX_GEMM_MAX_M (64), on a GPU: XLA's weight-only dot
                     (the 8-bit weight converted inside the dot's operand load) for every mode --
                     "fp8" too: at decode sizes the dot is bound by the weight bytes, so the
                     activations stay bf16 (weight-only numerics, slightly *more* accurate than
                     W8A8). Measured on an H200 (docs/quant_notes.md, sessions 4 and 11): batch-1
                     decode 319.6 tok/s this way on K-major codes (bf16: 228.4), where the
                     skinny kernel made 158.9 and the Mosaic one lost to it in a 30-block chain
                     (so did a CUDA-core Pallas GEMV and f16 / int8 operands, session 12). Larger M:
                     XLA (`AUTO_LARGE_M` flips "fp8" mode to the Mosaic FP8 GEMM once measured).
  "pallas"           both kernels: `pallas_kernels.skinny_gemm` (Triton, weight streamed once,
                     dequantized in registers) for small M, `pallas_kernels.fp8_gemm` (Mosaic
                     GPU wgmma, e4m3 x e4m3 -> f32, scales in the epilogue) for "fp8" at large M;
                     and W8A8 inputs quantized in their producer's pass: the model hands dots a
                     `PendingActivation` (RMSNorm, SiLU-and-mul), `pallas_kernels.fused_quant`
                     runs producer + per-token e4m3 in one kernel ("auto": $IMP_JAX_FUSED_QUANT).
  "xla"              XLA dot_general everywhere (the reference path).
  "interpret"        the "pallas" choices with the kernels interpreted (CPU tests).
Kernels run only on a GPU backend, with bf16/f16 activations, shapes the kernels tile, and a
single device: a pallas_call has no partitioning rule, so on a mesh (or any multi-device process,
where a traced weight's placement is unknown) the XLA path runs. CPU is unchanged (XLA).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.config import ModelConfig
from imp_jax.spec import ArraySpec, get_path, map_specs, param_specs

MODES = ("fp8", "fp8-weight-only", "int8")
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
INT8_MAX = 127.0
_TINY = 1e-12  # floor on amax: an all-zero channel gets scale ~0 and q = 0, never NaN


# ------------------------------------------------------------------------------- GEMM dispatch

GEMM_ENV = "IMP_JAX_GEMM"  # auto | xla | pallas | interpret
GEMM_MAX_M_ENV = "IMP_JAX_GEMM_MAX_M"  # flattened M up to which the decode kernel runs
GEMM_BACKENDS = ("auto", "xla", "pallas", "interpret")
SMALL_M_DEFAULT = 64
# What "auto" runs for "fp8" (W8A8) at M > max M: "xla" (cuBLAS FP8) until an H100 run shows the
# Mosaic kernel ahead (benchmarks/gemm.py), then "pallas".
AUTO_LARGE_M = "xla"
# Whether "auto" quantizes W8A8 activations in their producer's pass (pallas_kernels.fused_quant:
# RMSNorm or SiLU-and-mul + per-token e4m3 in one kernel) on a GPU: off until a GPU run times it
# against XLA's own fusions (benchmarks/gemm.py --part fused_quant); "pallas" turns it on, and
# $IMP_JAX_FUSED_QUANT=1 / 0 overrides it under "auto" (read at trace time).
AUTO_FUSED_QUANT = False
FUSED_QUANT_ENV = "IMP_JAX_FUSED_QUANT"
_backend_override: str | None = None


def set_gemm_backend(name: str | None) -> None:
    """Override $IMP_JAX_GEMM for this process (None: back to the environment). The choice is
    made at trace time, so a change clears JAX's compilation caches (jitted steps retrace);
    changing the environment variable mid-process does not."""
    global _backend_override
    if name is not None and name not in GEMM_BACKENDS:
        raise ValueError(f"unknown GEMM backend {name!r}; allowed: {', '.join(GEMM_BACKENDS)}")
    if name != _backend_override:
        jax.clear_caches()
    _backend_override = name


def gemm_backend() -> str:
    name = _backend_override or os.environ.get(GEMM_ENV, "auto").strip().lower() or "auto"
    if name not in GEMM_BACKENDS:
        raise ValueError(f"${GEMM_ENV}={name!r}; allowed: {', '.join(GEMM_BACKENDS)}")
    return name


def gemm_max_m() -> int:
    return int(os.environ.get(GEMM_MAX_M_ENV, SMALL_M_DEFAULT))


def _single_device(a) -> bool:
    """True when `a` certainly lives on one device: a concrete array on one device, or any array
    in a process that sees one device (a tracer's placement is not known at trace time)."""
    if jax.device_count() == 1:
        return True
    if isinstance(a, jax.core.Tracer):
        return False
    sharding = getattr(a, "sharding", None)
    return sharding is not None and len(sharding.device_set) == 1


def _gemm_plan(w: jax.Array, x_dtype, mode: str, M: int, K: int, N: int,
               allow_large: bool = True) -> tuple[str | None, bool]:
    """(kernel, interpret): kernel is "skinny", "fp8", "weight-only" (XLA's dot on the weight
    converted to the activation dtype, whatever the mode) or None (XLA, the mode's own math)."""
    backend = gemm_backend()
    if backend == "xla":
        return None, False
    interpret = backend == "interpret"
    if backend == "auto" and M <= gemm_max_m() and jax.default_backend() == "gpu":
        return "weight-only", False  # faster than the skinny kernel end to end (module doc)
    if not interpret and (jax.default_backend() != "gpu" or not _single_device(w)):
        return None, False
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None, False
    if M <= gemm_max_m():
        from pallas_kernels import skinny_gemm as sk
        return ("skinny" if sk.supported(M, K, N) else None), interpret
    large = "pallas" if backend in ("pallas", "interpret") else AUTO_LARGE_M
    if mode == "fp8" and allow_large and large == "pallas" and \
            jnp.dtype(x_dtype) == jnp.dtype(jnp.bfloat16):
        from pallas_kernels import fp8_gemm
        return ("fp8" if fp8_gemm.supported(M, K, N) else None), interpret
    return None, False


def _auto_fused_quant() -> bool:
    value = os.environ.get(FUSED_QUANT_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"${FUSED_QUANT_ENV}={value!r}; allowed: 1 (fuse), 0 (do not), unset "
                         f"(the default, {int(AUTO_FUSED_QUANT)})")
    return AUTO_FUSED_QUANT if not value else value == "1"


def _fused_quant_plan(x_dtype, n: int) -> tuple[bool, bool]:
    """(fuse, interpret): whether a W8A8 dot quantizes a PendingActivation with its producer's
    fused kernel (same single-device and dtype limits as the GEMM kernels)."""
    backend = gemm_backend()
    interpret = backend == "interpret"
    wanted = interpret or backend == "pallas" or (backend == "auto" and _auto_fused_quant())
    if not wanted or not (interpret or (jax.default_backend() == "gpu"
                                        and jax.device_count() == 1)):
        return False, False
    from pallas_kernels import fused_quant
    return fused_quant.supported(n, x_dtype), interpret


class PendingActivation:
    """An activation whose producer (the RMSNorm before q/k/v and gate/up, the SiLU-and-mul
    before down) has not run yet, so that a W8A8 dot can quantize it in the producer's pass
    (`pallas_kernels.fused_quant`) instead of reading a bf16 copy back. Every other consumer
    takes `value()`: the model's own math, so unfused numerics are unchanged. It lives inside
    one trace; the consumers of one activation (q, k, v) share it and each form runs once.

        PendingActivation(value_fn, fp8_fn, shape, dtype)
            value_fn()           -> the activation
            fp8_fn(interpret)    -> (float8_e4m3fn codes, float32 per-token scale [...])
    """

    def __init__(self, value_fn, fp8_fn, shape: tuple[int, ...], dtype):
        self._value_fn, self._fp8_fn = value_fn, fp8_fn
        self.shape, self.dtype = tuple(shape), jnp.dtype(dtype)
        self._value = self._fp8 = None

    def value(self) -> jax.Array:
        if self._value is None:
            self._value = self._value_fn()
        return self._value

    def fp8(self) -> tuple[jax.Array, jax.Array]:
        """Per-token e4m3 (codes, scale): the fused kernel where `_fused_quant_plan` allows
        (and there is a row: a grid of none is no kernel), else `quantize_activations(value())`."""
        if self._fp8 is None:
            fuse, interpret = _fused_quant_plan(self.dtype, self.shape[-1])
            fuse = fuse and math.prod(self.shape[:-1]) > 0
            self._fp8 = (self._fp8_fn(interpret) if fuse
                         else quantize_activations(self.value(), 1))
        return self._fp8


def materialize(x) -> jax.Array:
    """x itself, or the value of a PendingActivation."""
    return x.value() if isinstance(x, PendingActivation) else x


def _fp8_activations(x, dims: int) -> tuple[jax.Array, jax.Array]:
    if isinstance(x, PendingActivation) and dims == 1:
        return x.fp8()
    return quantize_activations(materialize(x), dims)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; allowed: {', '.join(MODES)}")
    return mode


def storage_dtype(mode: str):
    return jnp.int8 if check_mode(mode) == "int8" else FP8


def _qmax(mode: str) -> float:
    return INT8_MAX if mode == "int8" else FP8_MAX


def stored_axes(ndim: int, contract: tuple[int, ...]) -> tuple[int, ...]:
    """The weight's axes in the order a QuantArray stores its codes: output dims, then the
    contracted ones (q = w.transpose(stored_axes(...)))."""
    return tuple(d for d in range(ndim) if d not in contract) + tuple(contract)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantArray:
    """A quantized weight: `w ~= q.transpose(weight order) * scale` (scale broadcasts over the
    contract dims). `shape`, `ndim` describe the weight, `q.shape` the stored codes."""

    q: jax.Array  # float8_e4m3fn or int8, the weight's dims in stored_axes order (K-major)
    scale: jax.Array  # float32, the weight's shape with contract dims reduced to 1
    mode: str = dataclasses.field(metadata=dict(static=True), default="fp8")
    # Which dims of the weight are contracted (spec.contract); the embedding table uses (1,):
    # per-row scales.
    contract: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=(0,))

    # -- array-like surface (shape checks, memory accounting) ----------------------------------
    @property
    def axes(self) -> tuple[int, ...]:
        """stored_axes: q's dim i is the weight's dim axes[i]."""
        return stored_axes(self.q.ndim, self.contract)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (q's dims back in the weight's order)."""
        return tuple(self.q.shape[i] for i in np.argsort(self.axes))

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.size) * self.q.dtype.itemsize + int(self.scale.size) * 4

    def codes(self) -> jax.Array:
        """The codes in the weight's own layout (a transpose of q; tests and references)."""
        return jnp.transpose(self.q, np.argsort(self.axes))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight in its own layout and `dtype`."""
        return (self.codes().astype(jnp.float32) * self.scale).astype(dtype)

    # -- the matmuls the model calls ------------------------------------------------------------
    def quantized_dot(self, x, dims: int = 1) -> jax.Array:
        """x[..., in...] @ w[in..., out...] contracting the last `dims` axes of x -> x.dtype.
        x: an array or a PendingActivation (a W8A8 dot may quantize it in its producer)."""
        if self.contract != tuple(range(dims)):
            raise ValueError(f"QuantArray contracted over {self.contract} used in a dot over the "
                             f"first {dims} axes")
        return self._matmul(x, dims, self.scale.reshape(self.scale.shape[dims:]), x.dtype)

    def quantized_take(self, ids: jax.Array) -> jax.Array:
        """Embedding lookup of a [vocab, embed] table quantized per row -> float32 rows."""
        return jnp.take(self.q, ids, axis=0).astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)

    def quantized_dot_t(self, x: jax.Array) -> jax.Array:
        """Tied head: x[..., embed] @ table.T -> float32 [..., vocab] (the [vocab, embed] table is
        K-major as it is, so this is the same matmul as any weight's)."""
        return self._matmul(x, 1, self.scale[:, 0], jnp.float32, allow_large=False)

    def _matmul(self, x, dims: int, out_scale: jax.Array, out_dtype,
                allow_large: bool = True) -> jax.Array:
        """x's last `dims` axes contracted with the stored codes' trailing ones (q: [out...,
        in...]) -> [..., out...] in out_dtype, out_scale [out...] applied after the sum."""
        n_out = self.q.ndim - dims
        out_shape = tuple(self.q.shape[:n_out])
        K, N = math.prod(self.q.shape[n_out:]), math.prod(out_shape)
        lead = x.shape[:len(x.shape) - dims]
        M = math.prod(lead)
        kernel, interpret = _gemm_plan(self.q, x.dtype, self.mode, M, K, N, allow_large)
        if kernel == "skinny" and M > 0:  # weight-only in registers, every mode (module doc)
            from pallas_kernels.skinny_gemm import skinny_gemm
            y2 = skinny_gemm(materialize(x).reshape(M, K), self.q.reshape(N, K),
                             out_scale.reshape(N), interpret=interpret, w_layout="nk",
                             out_dtype=out_dtype)
            return y2.reshape(lead + out_shape)
        if kernel == "fp8" and M > 0:  # W8A8 on the Mosaic GPU kernel (K-major, as stored)
            from pallas_kernels.fp8_gemm import fp8_matmul
            xq, x_scale = _fp8_activations(x, dims)
            y2 = fp8_matmul(xq.reshape(M, K), x_scale.reshape(M), self.q.reshape(N, K),
                            out_scale.reshape(N), interpret=interpret, out_dtype=out_dtype)
            return y2.reshape(lead + out_shape)
        contract = (tuple(range(len(lead), len(lead) + dims)), tuple(range(n_out, n_out + dims)))
        if self.mode == "fp8" and kernel in (None, "fp8"):  # W8A8
            xq, x_scale = _fp8_activations(x, dims)
            y = jax.lax.dot_general(xq, self.q, (contract, ((), ())),
                                    preferred_element_type=jnp.float32)
            y = y * x_scale.reshape(lead + (1,) * n_out)
        else:  # weight-only: exact conversion to the activation dtype, scale after the sum
            y = jax.lax.dot_general(materialize(x), self.q.astype(x.dtype), (contract, ((), ())),
                                    preferred_element_type=jnp.float32)
        return (y * out_scale).astype(out_dtype)


def quantize_activations(x: jax.Array, dims: int = 1) -> tuple[jax.Array, jax.Array]:
    """Per-token e4m3 quantization of x over its last `dims` axes -> (xq, scale[..., 1...])."""
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - dims, x.ndim))
    amax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
    scale = jnp.maximum(amax, _TINY) / FP8_MAX
    xq = jnp.clip(x32 / scale, -FP8_MAX, FP8_MAX).astype(FP8)
    return xq, scale.reshape(scale.shape[:x.ndim - dims])  # [...]


SCALE_METHODS = ("absmax", "mse")
# Multipliers of the absmax scale that "mse" tries for every output channel (the channel keeps the
# one with the least squared weight error; 1 = absmax, tried first, so ties keep absmax).
# e4m3 is a float format: scales s and 2s give the same grid but for its ends, so multipliers in
# [1, 2) span every alignment of the grid to a channel's values without clipping; below 1 the
# largest values clip. int8's grid is uniform: only clipping (< 1) can lower the error.
MSE_ALPHAS = {"fp8": tuple(k / 32 for k in range(24, 64)),
              "int8": tuple(k / 64 for k in range(32, 65))}


def _quantize_with(w32: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    if mode == "int8":
        return jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return jnp.clip(w32 / scale, -FP8_MAX, FP8_MAX).astype(FP8)


@functools.partial(jax.jit, static_argnames=("contract", "mode", "method"))
def _channel_scale(w32: jax.Array, contract: tuple[int, ...], mode: str,
                   method: str) -> jax.Array:
    """Per-output-channel scale (contract dims reduced to 1) for `method` in SCALE_METHODS."""
    amax = jnp.max(jnp.abs(w32), axis=contract, keepdims=True)
    base = jnp.maximum(amax, _TINY) / _qmax(mode)
    if method == "absmax":
        return base

    def sq_err(scale):
        deq = _quantize_with(w32, scale, mode).astype(jnp.float32) * scale
        return jnp.sum(jnp.square(deq - w32), axis=contract, keepdims=True)

    def body(best, alpha):
        err, scale = best
        cand = base * alpha
        cand_err = sq_err(cand)
        better = cand_err < err
        return (jnp.where(better, cand_err, err), jnp.where(better, cand, scale)), None

    grid = MSE_ALPHAS["int8" if mode == "int8" else "fp8"]
    alphas = jnp.asarray([a for a in grid if a != 1.0], jnp.float32)
    (_, scale), _ = jax.lax.scan(body, (sq_err(base), base), alphas)
    return scale


def quantize(w: jax.Array, mode: str, contract: tuple[int, ...] = (0,),
             scales: str = "absmax") -> QuantArray:
    """Symmetric per-output-channel quantization over the `contract` dims (codes stored
    K-major, `stored_axes`).

    scales="absmax": scale = amax / qmax (each channel's largest magnitude exact). "mse": the
    multiple of that in MSE_ALPHAS with the least squared error per channel (a load-time search;
    the kernels see just another per-channel scale).
    """
    check_mode(mode)
    if not contract:
        raise ValueError("quantize needs at least one contracted dim (spec.contract is empty)")
    if scales not in SCALE_METHODS:
        raise ValueError(f"unknown scale method {scales!r}; allowed: {', '.join(SCALE_METHODS)}")
    w32 = jnp.asarray(w, jnp.float32)
    scale = _channel_scale(w32, tuple(contract), mode, scales)
    return _quant_array(_quantize_with(w32, scale, mode), scale, mode, tuple(contract))


def _quant_array(q: jax.Array, scale: jax.Array, mode: str,
                 contract: tuple[int, ...]) -> QuantArray:
    """A QuantArray from codes in the weight's own layout."""
    return QuantArray(jnp.transpose(q, stored_axes(q.ndim, contract)),
                      scale.astype(jnp.float32), mode, contract)


# ------------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """Which weights to quantize. Edit the fields; everything not selected keeps the compute dtype.

    keep_first / keep_last: how many leading / trailing decoder blocks stay unquantized.
    keep: fnmatch patterns of '/'-joined param paths kept unquantized
          (e.g. "layers_*/mlp/down/kernel").
    quantize_embedding: the [vocab, embed] table (per-row scales; also serves the tied head).
    quantize_lm_head: the untied lm_head kernel.
    scales: how each output channel's scale is chosen ("absmax" or "mse", see `quantize`).
    """

    keep_first: int = 0
    keep_last: int = 0
    keep: tuple[str, ...] = ()
    quantize_embedding: bool = False
    quantize_lm_head: bool = False
    scales: str = "absmax"

    def selects(self, path: tuple[str, ...], spec: ArraySpec, cfg: ModelConfig) -> bool:
        name = "/".join(path)
        if path[-1] == "embedding":
            return self.quantize_embedding
        if path[0] == "lm_head":
            return self.quantize_lm_head
        if path[-1] != "kernel" or not spec.contract:  # norms, biases
            return False
        m = re.fullmatch(r"layers_(\d+)", path[0])
        if m:
            i = int(m.group(1))
            if i < self.keep_first or i >= cfg.num_layers - self.keep_last:
                return False
        return not any(fnmatch.fnmatchcase(name, pat) for pat in self.keep)

    def block_fraction(self, cfg: ModelConfig) -> float:
        """Fraction of the decoder blocks' matmul weight elements this policy quantizes (the
        bytes a decode step streams in 8 bits rather than 16, embedding / lm_head aside)."""
        total = chosen = 0

        def one(path, spec):
            nonlocal total, chosen
            if re.fullmatch(r"layers_\d+", path[0]) and path[-1] == "kernel" and spec.contract:
                n = math.prod(spec.shape)
                total += n
                chosen += n if self.selects(path, spec, cfg) else 0

        map_specs(one, param_specs(cfg))
        return chosen / total


# Measured on SmolLM2-135M (docs/quant_notes.md): keeping the first and last blocks in the compute
# dtype halves fp8's perplexity gap to bf16 (+5.7% -> +2.7%) for 5% more weight bytes; for int8 it
# is within noise. Embedding and lm_head stay in the compute dtype. The 2026-11-28 sensitivity
# sweep (`benchmarks/quant.py --sensitivity`) found no policy that keeps >= 75% of the block bytes
# in fp8 and measures within 2% of bf16 (keeping k/v and more blocks lowers the KL but not the
# perplexity beyond its +-0.7% standard error), nor a gain in perplexity from scales="mse", so
# this default stands for every mode.
DEFAULT_POLICY = QuantPolicy(keep_first=1, keep_last=1)


def quantize_params(params: dict[str, Any], cfg: ModelConfig, mode: str,
                    policy: QuantPolicy | None = None,
                    scales: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace the weights `policy` selects with QuantArrays; the rest are returned as they are.

    scales: {"/"-joined params path: float32 [out] or None} fixed per-output-channel scales,
    used for those weights in the fp8 modes instead of `policy.scales` (an FP8 checkpoint's own
    scales, `LoadedModel.fp8_scales`: its dequantized weights then quantize back to their exact
    codes); None (block scales, no per-channel equivalent) takes `policy.scales`."""
    check_mode(mode)
    policy = DEFAULT_POLICY if policy is None else policy
    scales = scales or {}

    def one(path, spec):
        w = get_path(params, path)
        if isinstance(w, QuantArray) or not policy.selects(path, spec, cfg):
            return w
        if tuple(w.shape) != spec.shape:
            raise ValueError(f"{'/'.join(path)}: shape {tuple(w.shape)} != spec {spec.shape}")
        contract = (1,) if path[-1] == "embedding" else spec.contract
        fixed = scales.get("/".join(path))  # None: an FP8 weight with block scales
        if fixed is not None and mode != "int8" and path[-1] != "embedding":
            scale = jnp.asarray(fixed, jnp.float32).reshape(scale_shape(spec.shape, contract))
            q = _quantize_with(jnp.asarray(w, jnp.float32), scale, mode)
            return _quant_array(q, scale, mode, tuple(contract))
        return quantize(w, mode, contract, policy.scales)

    return map_specs(one, param_specs(cfg))


def quantize_loaded(params: dict[str, Any], cfg: ModelConfig, mode: str,
                    fp8_scales: dict[str, Any] | None = None, *,
                    policy: QuantPolicy | None = None) -> dict[str, Any]:
    """Quantize a loaded model at load time (`LLM(quantization=)`, `imp-jax convert`). An FP8
    checkpoint (`LoadedModel.fp8_scales`) in an fp8 mode: exactly the weights it quantized,
    with its own scales where they are per tensor or per channel (its e4m3 codes come back
    unchanged), absmax per channel where they are per block. Weights quantized already (a
    converted checkpoint, a `loaded=` model): kept as they are, relabelled between "fp8" and
    "fp8-weight-only" (the same codes), and with no policy nothing else is quantized. Otherwise
    `policy` (default: `DEFAULT_POLICY`)."""
    check_mode(mode)
    saved = quant_meta(params)
    if saved and (saved["mode"] == "int8") != (mode == "int8"):
        raise ValueError(f"these weights are already quantized to {saved['mode']!r}; load them "
                         f"with quantization={saved['mode']!r} (or None), or convert the "
                         f"full-precision source again with --quantization {mode}")
    if saved and saved["mode"] != mode:  # fp8 <-> fp8-weight-only: the same e4m3 codes
        params = jax.tree.map(
            lambda x: dataclasses.replace(x, mode=mode) if isinstance(x, QuantArray) else x,
            params, is_leaf=lambda x: isinstance(x, QuantArray))
    if policy is not None:
        check_policy(policy, cfg, saved)
    elif saved:  # as saved
        return params
    scales = fp8_scales if mode != "int8" else None
    if not scales:
        return quantize_params(params, cfg, mode, policy)
    if policy is not None:
        raise ValueError("this checkpoint is already FP8: it fixes which weights are 8-bit, so a "
                         "quantization policy cannot apply; drop the policy, or load it with "
                         "quantization='int8' to re-quantize every selected weight")
    return quantize_params(params, cfg, mode, ExactPolicy(paths=frozenset(scales)), scales)


def check_policy(policy: QuantPolicy, cfg: ModelConfig,
                 saved: dict[str, Any] | None = None) -> None:
    """A policy given by the user must do what it says: each `keep` pattern names some weight,
    and weights that are 8-bit already (`saved`: `quant_meta` of a converted checkpoint) are all
    ones it selects. Raises ValueError naming what does not fit."""
    everything = QuantPolicy(quantize_embedding=True, quantize_lm_head=True)
    weights, selected = [], set()  # what any policy could quantize; what this one does

    def one(path, spec):
        name = "/".join(path)
        if everything.selects(path, spec, cfg):
            weights.append(name)
        if policy.selects(path, spec, cfg):
            selected.add(name)

    map_specs(one, param_specs(cfg))
    for pat in policy.keep:
        if not any(fnmatch.fnmatchcase(name, pat) for name in weights):
            raise ValueError(f"keep pattern {pat!r} matches no quantizable weight of this model "
                             f"(such as {', '.join(repr(w) for w in weights[1:3])})")
    extra = sorted(set(saved["paths"]) - selected) if saved else []
    if extra:
        raise ValueError(f"{len(extra)} weights are already quantized ({saved['mode']}) that this "
                         f"policy keeps unquantized: {', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}; drop the policy to use them as "
                         f"saved, or convert the full-precision source again with it")


def policy_before_load(spec: str | QuantPolicy | None, mode: str | None, model: str | None,
                       needs: str) -> QuantPolicy | None:
    """Everything a user's policy can get wrong, checked before a long load (`LLM`, `imp-jax
    convert`): given without a mode (ValueError starting with `needs`, the caller's own names
    for the two), unparsable (`parse_policy`), or a `keep` pattern that matches no weight of
    `model`'s config (`check_policy`; skipped when model is None, e.g. an already loaded one)."""
    if spec is None:
        return None
    if mode is None:
        raise ValueError(f"{needs} ({', '.join(MODES)})")
    policy = parse_policy(spec)
    if model is not None:
        from imp_jax.loaders import read_config

        check_policy(policy, read_config(model))
    return policy


# Named policies for `parse_policy` (the command line's --quant-policy).
POLICY_PRESETS = {
    "default": DEFAULT_POLICY,
    # every decoder block and an untied lm_head in 8 bits: the fewest bytes per decode step
    # (batch-1 FP8 1.49x bf16 on an H200, the default 1.39-1.40x; docs/quant_notes.md, session
    # 12) for more error: +5.7% perplexity with W8A8 on the default model (tied head, so its
    # blocks only), against the default's +2.7%; an 8-bit lm_head's own cost is unmeasured
    "all": QuantPolicy(quantize_lm_head=True),
}
_POLICY_FIELDS = {"keep_first": "keep_first", "keep_last": "keep_last", "keep": "keep",
                  "embedding": "quantize_embedding", "lm_head": "quantize_lm_head",
                  "scales": "scales"}


def parse_policy(spec: str | QuantPolicy | None) -> QuantPolicy | None:
    """A QuantPolicy from a string (`--quant-policy`): comma-separated items, the first of
    which may name a preset (`POLICY_PRESETS`: "default", "all") to start from (else the
    default policy), the others key=value overrides: keep_first=N, keep_last=N,
    keep=PATTERN[;PATTERN...] (fnmatch patterns of '/'-joined param paths), embedding=0|1,
    lm_head=0|1 (an untied lm_head), scales=absmax|mse. A QuantPolicy or None passes through.

        >>> parse_policy("all") == QuantPolicy(quantize_lm_head=True)
        True
        >>> parse_policy("keep_first=0,keep_last=0")   # every block, lm_head unquantized
        QuantPolicy(keep_first=0, keep_last=0, keep=(), quantize_embedding=False, quantize_lm_head=False, scales='absmax')
        >>> parse_policy("all,lm_head=0") == parse_policy("keep_first=0,keep_last=0")
        True
    """
    if spec is None or isinstance(spec, QuantPolicy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"quantization policy must be a QuantPolicy or a string, got {spec!r}")
    items = [part.strip() for part in spec.split(",") if part.strip()]
    base = DEFAULT_POLICY
    if items and items[0] in POLICY_PRESETS:
        base = POLICY_PRESETS[items.pop(0)]
    elif not items:
        raise ValueError(f"empty quantization policy {spec!r}: give a preset "
                         f"({', '.join(POLICY_PRESETS)}) and/or key=value items")
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _POLICY_FIELDS:
            raise ValueError(f"bad quantization policy item {item!r} in {spec!r}: expected a "
                             f"preset ({', '.join(POLICY_PRESETS)}) first, then key=value "
                             f"with key in {', '.join(_POLICY_FIELDS)}")
        if _POLICY_FIELDS[key] in fields:
            raise ValueError(f"quantization policy {spec!r} sets {key} twice")
        if key in ("keep_first", "keep_last"):
            if not (value.isascii() and value.isdecimal()):
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
            fields[_POLICY_FIELDS[key]] = int(value)
        elif key in ("embedding", "lm_head"):
            if value not in ("0", "1"):
                raise ValueError(f"{key} must be 0 or 1, got {value!r}")
            fields[_POLICY_FIELDS[key]] = value == "1"
        elif key == "scales":
            if value not in SCALE_METHODS:
                raise ValueError(f"scales must be one of {', '.join(SCALE_METHODS)}, got "
                                 f"{value!r}")
            fields["scales"] = value
        else:
            fields["keep"] = tuple(p for p in (v.strip() for v in value.split(";")) if p)
    return dataclasses.replace(base, **fields)


def abstract_quantized(cfg: ModelConfig, dtype, mode: str,
                       policy: QuantPolicy | None = None) -> dict[str, Any]:
    """ShapeDtypeStructs of `quantize_params(...)`'s output: an orbax restore target."""
    check_mode(mode)
    policy = DEFAULT_POLICY if policy is None else policy

    def one(path, spec):
        if not policy.selects(path, spec, cfg):
            return jax.ShapeDtypeStruct(spec.shape, dtype)
        contract = (1,) if path[-1] == "embedding" else spec.contract
        return abstract_quantized_leaf(spec, dtype, mode, contract)

    return map_specs(one, param_specs(cfg))


def scale_shape(shape: tuple[int, ...], contract: tuple[int, ...]) -> tuple[int, ...]:
    """A per-output-channel scale's shape: the weight's, contracted dims reduced to 1."""
    return tuple(1 if d in contract else n for d, n in enumerate(shape))


def abstract_quantized_leaf(spec: ArraySpec, dtype, mode: str,
                            contract: tuple[int, ...]) -> QuantArray:
    """ShapeDtypeStructs of one weight quantized over its `contract` axes."""
    stored = tuple(spec.shape[d] for d in stored_axes(len(spec.shape), contract))
    return QuantArray(jax.ShapeDtypeStruct(stored, storage_dtype(mode)),
                      jax.ShapeDtypeStruct(scale_shape(spec.shape, contract), jnp.float32), mode,
                      tuple(contract))


CODES_LAYOUT = "k-major"  # how saved checkpoints hold QuantArray codes (stored_axes)


def quant_meta(params: dict[str, Any]) -> dict[str, Any] | None:
    """JSON-able description of which leaves are quantized (for checkpoint metadata), or None."""
    paths, modes = [], set()

    def walk(prefix, node):
        if isinstance(node, QuantArray):
            paths.append("/".join(prefix))
            modes.add(node.mode)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v)

    walk((), params)
    if not paths:
        return None
    if len(modes) != 1:
        raise ValueError(f"mixed quantization modes {sorted(modes)} in one params tree")
    return {"mode": modes.pop(), "paths": sorted(paths), "layout": CODES_LAYOUT}


@dataclasses.dataclass(frozen=True)
class ExactPolicy(QuantPolicy):
    """Selects exactly the weights named by "/"-joined params path (a saved tree's quantized
    leaves, an FP8 checkpoint's quantized weights); the inherited keep_* / keep / quantize_*
    fields are not consulted (`scales` still is)."""

    paths: frozenset[str] = frozenset()

    def selects(self, path, spec, cfg):
        return "/".join(path) in self.paths


def abstract_from_meta(cfg: ModelConfig, dtype, meta: dict[str, Any]) -> dict[str, Any]:
    """The orbax restore target of a tree `quant_meta` described."""
    if meta.get("layout") != CODES_LAYOUT:  # before session 11 codes were saved [in, out]
        layout = meta.get("layout")
        raise ValueError(f"this checkpoint's 8-bit weights are in layout "
                         f"{'[in, out] (none recorded)' if layout is None else repr(layout)}; "
                         f"this imp_jax reads {CODES_LAYOUT!r} only: convert the model again "
                         f"(imp-jax convert SOURCE OUT --quantization {meta.get('mode')})")
    policy = ExactPolicy(paths=frozenset(meta["paths"]))
    return abstract_quantized(cfg, dtype, meta["mode"], policy)


def cast_unquantized(params: dict[str, Any], dtype) -> dict[str, Any]:
    """Cast every float leaf that is not part of a QuantArray to `dtype` (e.g. bf16 serving)."""
    return jax.tree.map(lambda a: a if isinstance(a, QuantArray) else a.astype(dtype), params,
                        is_leaf=lambda a: isinstance(a, QuantArray))


def params_nbytes(params: dict[str, Any]) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(params))
