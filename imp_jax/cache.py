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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]  # per layer: [num_pages, page_size, kv_heads, head_dim]
    v: list[jax.Array]

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> "KVCache":
        spec = kv_page_spec(num_pages, page_size, cfg)
        return cls(k=[jnp.zeros(spec.shape, dtype) for _ in range(cfg.num_layers)],
                   v=[jnp.zeros(spec.shape, dtype) for _ in range(cfg.num_layers)])

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


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V [T, kv_heads, head_dim] into the page pools at their slots."""
    num_pages, page_size = k_pages.shape[:2]
    # Padding slots (-1) are sent out of bounds and dropped, never written to a real page.
    slots = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)
    page, offset = slots // page_size, slots % page_size
    k_pages = k_pages.at[page, offset].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, offset].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages
