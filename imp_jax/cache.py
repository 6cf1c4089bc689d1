"""The paged KV cache pytree and the metadata that says where each token's K/V lives.

See docs/architecture.md for the contract. Both are plain pytrees so they pass through `jax.jit`
(the cache donated, so XLA updates the pools in place).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from imp_jax.config import ModelConfig
from imp_jax.spec import kv_page_spec


FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8 = jnp.int8
INT8_MAX = 127.0  # symmetric: -127..127 (-128 unused, so the grid is symmetric about 0)
# 8-bit pool dtypes: values + one float32 scale per token and KV head (k_scale / v_scale).
QUANT_DTYPES = (jnp.dtype(FP8), jnp.dtype(INT8))


def is_quantized(dtype) -> bool:
    """Whether a pool of this dtype holds 8-bit values with per-token-per-head scales."""
    return jnp.dtype(dtype) in QUANT_DTYPES


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]  # per layer: [num_pages, page_size, kv_heads, head_dim]
    v: list[jax.Array]
    # 8-bit pools only (fp8 e4m3 / int8): one float32 scale per token and KV head,
    # [num_pages, kv_heads, page_size] (4 bytes next to head_dim bytes of values: KV memory and
    # bandwidth drop ~2x from bf16). A page's scales for one KV head are contiguous, so a
    # kernel copies them in one piece per page (see scale_pool_shape).
    k_scale: list[jax.Array] | None = None
    v_scale: list[jax.Array] | None = None

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> "KVCache":
        spec = kv_page_spec(num_pages, page_size, cfg)
        layers = range(cfg.num_layers)
        pools = dict(k=[jnp.zeros(spec.shape, dtype) for _ in layers],
                     v=[jnp.zeros(spec.shape, dtype) for _ in layers])
        if is_quantized(dtype):
            shape = scale_pool_shape(spec.shape)
            pools.update(k_scale=[jnp.ones(shape, jnp.float32) for _ in layers],
                         v_scale=[jnp.ones(shape, jnp.float32) for _ in layers])
        return cls(**pools)

    def pools(self) -> tuple[list, ...]:
        """(k, v), plus (k_scale, v_scale) for 8-bit pools, each a per-layer list:
        `KVCache(*pools)` rebuilds a cache (of arrays, or of their shardings)."""
        if self.k_scale is None:
            return self.k, self.v
        return self.k, self.v, self.k_scale, self.v_scale

    def layer(self, i: int) -> tuple:
        """(k, v, k_scale, v_scale) of layer i; the scales are None for plain pools."""
        if self.k_scale is None:
            return self.k[i], self.v[i], None, None
        return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        per_head = cfg.head_dim * jnp.dtype(dtype).itemsize + (4 if is_quantized(dtype) else 0)
        return 2 * cfg.num_layers * cfg.num_kv_heads * per_head

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: jax.Array  # int32[T]; -1 = padding token, its K/V is dropped
    page_table: jax.Array  # int32[S, max_pages]
    seq_lens: jax.Array  # int32[S]: context length after this step
    query_start: jax.Array  # int32[S+1]
    logits_indices: jax.Array  # int32[N]: tokens whose logits are returned
    max_query_len: int = dataclasses.field(metadata=dict(static=True), default=1)


# What a fresh cache holds, per entry of `KVCache.pools()`: zero pages, and scale 1 in the
# 8-bit pools' scale pools (a page nothing has written dequantizes to zeros).
POOL_FILLS = (0, 0, 1, 1)


def scale_pool_shape(pool_shape) -> tuple[int, int, int]:
    """[num_pages, page_size, kv_heads, head_dim] pool -> its scale pool's
    [num_pages, kv_heads, page_size]: head-major inside a page, so one KV head's scales of a
    page are contiguous (the Mosaic GPU decode kernel bulk-copies them; in a
    [.., page, kv_heads] pool they would be 4-byte elements strided kv_heads apart, which no
    bulk copy moves)."""
    num_pages, page_size, kv_heads = pool_shape[:3]
    return num_pages, kv_heads, page_size


def quantize_pool(pool: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A whole float pool [P, page, KVH, D] quantized per token and head, as `write_kv` stores
    it: (8-bit values [P, page, KVH, D], f32 scales [P, KVH, page]). Tests and benchmarks."""
    values, scales = quantize_kv(pool, dtype)
    return values, jnp.swapaxes(scales, 1, 2)


def quantize_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] -> (float8_e4m3fn values, float32 scale [...]) per token and head."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1) / FP8_MAX, 1e-12)
    return jnp.clip(x32 / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8), scale


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] -> (int8 values, float32 scale [...]) per token and head.

    Symmetric: scale = max|x| / 127, values round(x / scale) in [-127, 127]; the error of each
    element is at most scale / 2 (a 1/254 share of the token-head's largest magnitude)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX, 1e-12)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -INT8_MAX, INT8_MAX)
    return q.astype(INT8), scale


def quantize_kv(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Per-token-per-head quantization of x [..., head_dim] to an 8-bit pool dtype."""
    dt = jnp.dtype(dtype)
    if dt == jnp.dtype(FP8):
        return quantize_fp8(x)
    if dt == jnp.dtype(INT8):
        return quantize_int8(x)
    raise ValueError(f"no per-token quantization for {dt}; 8-bit pools are "
                     f"{[str(d) for d in QUANT_DTYPES]}")


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array, k_scale: jax.Array | None = None,
             v_scale: jax.Array | None = None) -> tuple:
    """Scatter this step's K/V [T, kv_heads, head_dim] into the page pools at their slots.

    Returns (k_pages, v_pages, k_scale, v_scale); 8-bit pools (fp8 / int8, scales given) store
    each token's K/V quantized with its own per-head scale."""
    if is_quantized(k_pages.dtype) and k_scale is None:
        # Casting K/V straight to 8 bits without a scale would silently store garbage.
        raise ValueError(f"{k_pages.dtype} KV pools need their k_scale / v_scale pools")
    num_pages, page_size = k_pages.shape[:2]
    # Padding slots (-1) are sent out of bounds, each to its own slot, and dropped, never
    # written to a real page. Real slots are distinct (a token owns its slot), so the scatters
    # promise unique indices: plain stores on the GPU instead of one atomic read-modify-write
    # per element (session 8). Only warm-up's dummy steps break the promise: their rows all
    # write page 0, which no sequence owns and every read masks, so whichever store lands there
    # is harmless.
    pad = num_pages * page_size + jnp.arange(slot_mapping.shape[0], dtype=slot_mapping.dtype)
    slots = jnp.where(slot_mapping < 0, pad, slot_mapping)
    page, offset = slots // page_size, slots % page_size
    put = dict(mode="drop", unique_indices=True)
    if k_scale is not None:
        (k, ks), (v, vs) = quantize_kv(k, k_pages.dtype), quantize_kv(v, v_pages.dtype)
        # scale pools are [P, KVH, page]: index (page, :, offset) takes [T, KVH] like ks
        k_scale = k_scale.at[page, :, offset].set(ks, **put)
        v_scale = v_scale.at[page, :, offset].set(vs, **put)
    k_pages = k_pages.at[page, offset].set(k.astype(k_pages.dtype), **put)
    v_pages = v_pages.at[page, offset].set(v.astype(v_pages.dtype), **put)
    return k_pages, v_pages, k_scale, v_scale
