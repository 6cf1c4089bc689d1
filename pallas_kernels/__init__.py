"""Pallas attention kernels for Hopper, each beside its pure-jnp reference.

`ragged_paged_attention` is the one entry point (the contract of docs/architecture.md):

    ragged_paged_attention(q[T,H,D], k_pages[P,page,KVH,D], v_pages, page_table i32[S,max_pages],
                           seq_lens i32[S], query_start i32[S+1], *, max_query_len (static),
                           scale, soft_cap=None, sliding_window=None, interpret=False,
                           k_scale=None, v_scale=None) -> [T,H,D]

k_scale / v_scale: float32 [P, KVH, page] scales of float8_e4m3fn or int8 pages (one per token
and KV head, imp_jax/cache.py's layout); the kernel dequantizes the tiles it reads, the
reference the pages it gathers.

Dispatch: on a GPU, decode steps go to `decode_mgpu.py` when it covers them
(IMP_JAX_DECODE=triton opts out; float8_e4m3fn pages unless one KV head per CTA would
convert K, see `mgpu_decode_config`); prompt steps the Mosaic GPU kernel covers
(`use_flash_prefill`) run `flash_prefill.py` (FA3-style: TMA K/V page gathers, two wgmma
warpgroups, work list longest first). Otherwise, on a GPU (or with interpret=True) the Pallas
kernel of `paged_decode.py` runs, in its decode form (one query block holding all
max_query_len tokens, split-K over pages) when max_query_len * (H // KVH) <= 64, else in its
prefill form (query blocks of ~64 rows, causal block skipping). Shapes the kernel does not
cover (non power-of-two head_dim / group / page size) and
non-GPU backends without interpret use `reference.ragged_paged_attention_ref`.

Launch config (Triton kernel and decode_mgpu, each with its own entries): `autotune.lookup` of
the static-shape bucket key (kernel, device kind, dtype, KV page dtype when it differs,
head_dim, group, page size, pow2 batch / context buckets, decode vs prefill) picks the cached
autotuned winner (~/.cache/imp_jax/autotune.json or
$IMP_JAX_AUTOTUNE_CACHE), else `choose_config`'s heuristic. With IMP_JAX_AUTOTUNE=1 a missing
bucket is tuned once, at trace time.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels import autotune, decode_mgpu, flash_prefill
from pallas_kernels.paged_decode import (KernelConfig, choose_config, paged_attention_kernel,
                                         paged_decode_attention, supported)
from pallas_kernels.reference import ragged_paged_attention_ref

__all__ = ["ragged_paged_attention", "ragged_paged_attention_ref", "paged_attention_kernel",
           "paged_decode_attention", "KernelConfig", "choose_config", "supported", "autotune",
           "kernel_config"]


def kernel_config(q, k_pages, page_table, max_query_len: int, *, interpret: bool = False,
                  soft_cap=None, sliding_window=None, kernel: str = "triton"):
    """The launch config of `kernel` ("triton": a KernelConfig, "mgpu": a
    decode_mgpu.DecodeConfig) for these (static) shapes: cached autotuned winner, else the
    kernel's heuristic."""
    key = autotune.make_key(q.shape, k_pages.shape, page_table.shape, max_query_len, q.dtype,
                            kv_dtype=k_pages.dtype, kernel=kernel)
    autotune.maybe_tune(key, interpret=interpret, soft_cap=soft_cap,
                        sliding_window=sliding_window)  # no-op unless IMP_JAX_AUTOTUNE=1
    return autotune.lookup(key)


def use_flash_prefill(q, k_pages, max_query_len: int, soft_cap=None, sliding_window=None,
                      k_scale=None) -> bool:
    """Prompt steps go to the Mosaic GPU flash-prefill kernel (measured 3.6x the Triton kernel's
    prefill form at 8k tokens, docs/benchmarks.md) when it covers them: causal bf16/f16 pages,
    no soft-cap, window or 8-bit pages, and more query rows per KV head than a decode block.
    IMP_JAX_PREFILL=triton keeps every step on the Triton kernel."""
    choice = os.environ.get("IMP_JAX_PREFILL", "mosaic")
    if choice not in ("mosaic", "triton"):
        raise ValueError(f"IMP_JAX_PREFILL={choice!r}; allowed: 'mosaic', 'triton'")
    if choice == "triton":
        return False
    group = q.shape[1] // k_pages.shape[2]
    return (soft_cap is None and sliding_window is None and k_scale is None
            and int(max_query_len) * group > 64
            and flash_prefill.supported(q.shape, k_pages.shape, q.dtype)
            and k_pages.dtype == q.dtype)


DECODE_KERNELS = ("triton", "mgpu")


def decode_kernel() -> str:
    """$IMP_JAX_DECODE: which kernel runs decode steps on a GPU, "mgpu" (decode_mgpu.py, the
    default: Mosaic GPU, TMA page gathers into an SMEM ring, wgmma; 1.1-2.0x the Triton
    kernel on H200, docs/kernels_notes.md) or "triton" (paged_decode.py). decode_mgpu covers
    bf16/f16 pages without soft-cap or window; the rest stays on Triton."""
    choice = os.environ.get("IMP_JAX_DECODE", "mgpu")
    if choice not in DECODE_KERNELS:
        raise ValueError(f"IMP_JAX_DECODE={choice!r}; allowed: {', '.join(DECODE_KERNELS)}")
    return choice


def decode_kernel_8bit() -> str:
    """$IMP_JAX_DECODE_8BIT: which kernel reads float8_e4m3fn pages in decode steps on a GPU.
    "mgpu" (the default): decode_mgpu wherever `mgpu_decode_config` gives it the step (two KV
    heads per CTA at every batch; H200, page 16: 256 x 2048 551 vs 671 us in session 8,
    8 x 2048 34.7 vs 43.9 us in session 14), else the Triton kernel; "triton" always the
    Triton kernel (int8 pages always take it)."""
    choice = os.environ.get("IMP_JAX_DECODE_8BIT", "mgpu")
    if choice not in DECODE_KERNELS:
        raise ValueError(f"IMP_JAX_DECODE_8BIT={choice!r}; allowed: {', '.join(DECODE_KERNELS)}")
    return choice


def mgpu_decode_config(q, k_pages, page_table, max_query_len: int, *, k_scale=None,
                       soft_cap=None, sliding_window=None):
    """decode_mgpu's launch config for this step on a GPU, or None where another kernel serves
    it: the env choices above, the shapes `decode_mgpu.supported` covers, and for 8-bit pages
    every config but one KV head per CTA converting K (level with or behind the Triton kernel,
    sessions 6-8). H200, e4m3 pages of 16, session 14: 8 x 2k two heads 34.7 us, one head with
    fp8_qk 42.3-54.4 (level with Triton's 43.9 at best), 32 x 2k 108.0 / 113.2-125.5 / 146.8.
    One head serves odd KV-head counts (or IMP_JAX_MGPU_HEADS=1)."""
    if decode_kernel() != "mgpu" or (k_scale is not None and decode_kernel_8bit() != "mgpu"):
        return None
    if not decode_mgpu.supported(q.shape, k_pages.shape, q.dtype, max_query_len,
                                 k_dtype=k_pages.dtype, soft_cap=soft_cap,
                                 sliding_window=sliding_window, k_scale=k_scale):
        return None
    config = kernel_config(q, k_pages, page_table, 1, kernel="mgpu")
    one_head_converting = config.heads_per_cta == 1 and not config.fp8_qk
    return None if k_scale is not None and one_head_converting else config


def ragged_paged_attention(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                           max_query_len: int, scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, interpret: bool = False,
                           k_scale=None, v_scale=None):
    kwargs = dict(max_query_len=int(max_query_len), scale=float(scale), soft_cap=soft_cap,
                  sliding_window=sliding_window)
    on_gpu = jax.default_backend() == "gpu" and not interpret
    if on_gpu and use_flash_prefill(q, k_pages, max_query_len, soft_cap, sliding_window,
                                    k_scale):
        return flash_prefill.flash_prefill(q, k_pages, v_pages, page_table, seq_lens,
                                           query_start, scale=float(scale),
                                           max_query_len=int(max_query_len))
    mgpu = on_gpu and mgpu_decode_config(q, k_pages, page_table, max_query_len, k_scale=k_scale,
                                         soft_cap=soft_cap, sliding_window=sliding_window)
    if mgpu:
        return decode_mgpu.paged_decode_mgpu(
            q, k_pages, v_pages, page_table, seq_lens, query_start, scale=float(scale),
            max_query_len=1, config=mgpu, k_scale=k_scale, v_scale=v_scale)
    use_kernel = ((interpret or on_gpu) and supported(q.shape, k_pages.shape, k_pages.dtype))
    if not use_kernel:
        return ragged_paged_attention_ref(q, k_pages, v_pages, page_table, seq_lens, query_start,
                                          k_scale=k_scale, v_scale=v_scale, **kwargs)
    config = kernel_config(q, k_pages, page_table, max_query_len, interpret=interpret,
                           soft_cap=soft_cap, sliding_window=sliding_window)
    if k_scale is not None:  # 8-bit pages: the kernel dequantizes in its loop
        kwargs.update(k_scale=k_scale, v_scale=v_scale)
    return paged_attention_kernel(q, k_pages, v_pages, page_table, seq_lens, query_start,
                                  interpret=interpret, config=config, **kwargs)
