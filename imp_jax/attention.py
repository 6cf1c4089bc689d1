"""The one attention entry point the model calls: paged, ragged, causal, GQA.

`impl="auto"` picks the Pallas kernels on a GPU and the pure-jnp reference elsewhere (CPU, or
when a kernel does not cover a case). The reference is also the oracle the kernel tests use.
"""

from __future__ import annotations

import jax

from imp_jax.cache import AttentionMetadata

IMPLS = ("auto", "reference", "pallas")


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return impl


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                    *, scale: float, sliding_window: int | None = None, impl: str = "auto",
                    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                    mesh=None, heads_axis=None) -> jax.Array:
    """q [T, H, D] against the paged K/V of each token's sequence -> [T, H, D].

    8-bit pools (fp8 / int8) pass their per-token, per-head scales; the kernel reads the 8-bit
    pages and applies the scales to the logits (K) and probabilities (V).

    With `mesh` and `heads_axis` (tensor parallelism, KV pools split over the same mesh axes as
    the query heads), attention runs per device on its own heads under `shard_map`: a Pallas
    call has no partitioning rule, and GSPMD would otherwise gather q and the whole pools."""
    kwargs = dict(max_query_len=meta.max_query_len, scale=scale, sliding_window=sliding_window)
    if resolve_impl(impl) == "pallas":
        from pallas_kernels import ragged_paged_attention as fn
    else:
        from pallas_kernels.reference import ragged_paged_attention_ref as fn

    def local(q, k_pages, v_pages, page_table, seq_lens, query_start, k_scale, v_scale):
        scales = {} if k_scale is None else dict(k_scale=k_scale, v_scale=v_scale)
        return fn(q, k_pages, v_pages, page_table, seq_lens, query_start, **kwargs, **scales)

    args = (q, k_pages, v_pages, meta.page_table, meta.seq_lens, meta.query_start, k_scale,
            v_scale)
    if mesh is None or not heads_axis:
        return local(*args)
    from jax.sharding import PartitionSpec as P

    heads = P(None, heads_axis, None)  # q and out: [T, H, D]
    pools = P(None, None, heads_axis, None)  # [pages, page, KVH, D]
    scales = P(None, heads_axis, None)  # 8-bit pools' scales [pages, KVH, page], or None
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(heads, pools, pools, P(), P(), P(), scales, scales),
                         out_specs=heads, check_vma=False)(*args)
