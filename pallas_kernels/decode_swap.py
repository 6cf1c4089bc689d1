"""Keys-major paged decode attention (Pallas Mosaic GPU, Hopper): an experimental sibling of
decode_mgpu.py with wgmma's operands swapped, S^T = K Q^T and O^T = V^T P^T.

Why. decode_mgpu pads the G query heads of a KV head (4 for Llama-3) to wgmma's 64-row M, so
every 64-key block costs each consumer thread 32 logits and 64 accumulator elements of
softmax work, 15/16 of it on padding rows. H200, session 14: e4m3 and bf16 pages both run at
~67 M keys x heads per second per SM, so on e4m3 pages (half the bytes per key) the consumer,
not HBM, holds the kernel at ~1.7 TB/s. Here a block's keys are wgmma's M rows and the query
heads its N = 16 columns: a thread holds 8 logits and 16 accumulator elements per 64-key block.
The price: the softmax's max and sum run over the accumulator's M axis (keys), across the
warpgroup's 4 warps (Mosaic GPU reduces them through SMEM scratch).

Layout rules found by lowering probes (jax 0.11.2, tests/test_decode_swap.py): both operands
of the P V wgmma come from SMEM (V^T as a register operand does not lower) and Mosaic requires
their swizzles to match, so P^T [keys, 16] and the V tiles are swizzled by 32 bytes (16 bf16
columns); 16-byte swizzles are refused, hence N = 16 (G <= 16). K tiles keep 128-byte rows.

Data flow (same contract as `decode_mgpu.paged_decode_mgpu`):
* XLA first gathers each sequence's query row, [S, KVH, 16, D] with the G heads padded by
  zeros; on e4m3 pages it splits Q per row into two e4m3 terms, Q = s * (hi + lo / 16) as
  decode_mgpu's fp8_qk does, and the kernel runs Q K^T as two e4m3 wgmmas on the 8-bit K tile.
* Grid (S, KVH, splits), two warpgroups: a TMA producer fills a `num_stages` ring with the
  block's page boxes (and their per-key scales), the consumer computes S^T, the online softmax
  per column, P^T into SMEM, V (e4m3: converted to a bf16 tile, each key times its scale) and
  O^T += V^T P^T.
* Every active CTA writes an f32 partial O^T [D, 16] and its log2-sum-exp; XLA merges the
  splits, drops the padding heads and scatters the rows to their tokens (zeros elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_mgpu import FP8, supported as _mgpu_supported
from pallas_kernels.flash_prefill import LOG2E, check_ring, interpret_params
from pallas_kernels.paged_decode import NEG, NUM_SMS_H100

NQ = 16                 # query-head columns of every wgmma (the G real heads padded to it)
REDUCE_SCRATCH = 2048   # bytes Mosaic GPU reserves for cross-warp reductions (its default)
# 128-byte rows for K and Q (Q K^T), 32-byte rows (16 bf16 columns) for V and P^T (P V).
SW32 = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    block_kv: int = 64      # keys per stage: wgmma's M
    num_stages: int = 4     # depth of the K/V ring
    num_splits: int = 1     # split-K partitions of each sequence's blocks

    def validate(self, D: int, page_size: int, kv_itemsize: int = 2):
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
        check_ring(self, page_size, smem_bytes(self, D, kv_itemsize), min_stages=1)


def smem_bytes(cfg: SwapConfig, D: int, kv_itemsize: int = 2) -> int:
    """SMEM of a CTA: Q (bf16, or its two e4m3 terms + column scales), the ring (+ per-key
    scales and one converted V tile on 8-bit pages), P^T, the f32 partial and the scratch."""
    B = cfg.block_kv
    ring = 2 * cfg.num_stages * B * D * kv_itemsize
    if kv_itemsize == 1:
        ring += 2 * cfg.num_stages * B * 4 + B * D * 2
    return 2 * NQ * D + NQ * 4 + ring + B * NQ * 2 + (D + 1) * NQ * 4 + REDUCE_SCRATCH + 1024


def supported(q_shape, k_pages_shape, dtype=None, max_query_len: int = 1, *, k_dtype=None,
              soft_cap=None, sliding_window=None, k_scale=None) -> bool:
    """decode_mgpu's cover, with at most NQ query heads per KV head."""
    ok = _mgpu_supported(q_shape, k_pages_shape, dtype, max_query_len, k_dtype=k_dtype,
                         soft_cap=soft_cap, sliding_window=sliding_window, k_scale=k_scale)
    return ok and q_shape[1] // k_pages_shape[2] <= NQ


def choose_config(S: int, KVH: int, max_pages: int, page_size: int, *,
                  num_sms: int = NUM_SMS_H100, **overrides) -> SwapConfig:
    """64-key blocks (slices of larger pages) in a 4-stage ring; splits until the CTAs fill one
    wave (no split shorter than two blocks), as decode_mgpu.choose_config does."""
    block_kv = overrides.get("block_kv", 64)
    max_blocks = -(-(max_pages * page_size) // block_kv)
    splits = overrides.get("num_splits")
    if splits is None:
        base = max(1, S * KVH)
        splits = 1 if base >= num_sms else min(num_sms // base, max(1, max_blocks // 2))
    return SwapConfig(block_kv=block_kv, num_stages=overrides.get("num_stages", 4),
                      num_splits=max(1, min(int(splits), max_blocks)))


def _build_kernel(*, S, KVH, D, page_size, cfg: SwapConfig, scale: float, dtype, kv_dtype,
                  interpret):
    quant = jnp.dtype(kv_dtype) == jnp.dtype(FP8)
    B, stages, splits = cfg.block_kv, cfg.num_stages, cfg.num_splits
    n_cp, rows_cp = (B // page_size, page_size) if B >= page_size else (1, B)
    c_log2 = float(scale) * LOG2E
    col = plgpu.Layout.WGMMA.reduce(0)   # a [NQ] vector along S^T's columns (query heads)
    row = plgpu.Layout.WGMMA.reduce(1)   # a [B] vector along S^T's rows (keys)

    def convert(src8, scales, dst):
        """An e4m3 [B, D] stage -> bf16 in `dst`, each key (row) times its scale."""
        n = min(64, B)
        for r in range(0, B, n):
            x = src8.at[pl.ds(r, n)][...].astype(jnp.float32)
            sc = scales.at[pl.ds(r, n)][...]
            dst.at[pl.ds(r, n)][...] = (x * lax.broadcast_in_dim(sc, x.shape, [0])).astype(dtype)

    def kernel(sl_ref, qs_ref, pt_ref, q_ref, qsc_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref,
               lse_ref, bufs, bars, cons):
        s, h, j = lax.axis_index("seq"), lax.axis_index("kvh"), lax.axis_index("split")
        wg = lax.axis_index("wg")
        q_smem, qsc_smem, k_smem, v_smem, ks_smem, vs_smem, v16, p_smem, o_smem, lse_smem = bufs
        k_bars, v_bars, q_bar = bars
        k_cons, v_cons = cons
        seq_len = sl_ref[s]
        active = (qs_ref[s + 1] - qs_ref[s]) > 0
        nblk = lax.div(seq_len + (B - 1), jnp.int32(B))
        per = lax.div(nblk + (splits - 1), jnp.int32(splits))
        b0 = j * per
        nsteps = jnp.where(active, jnp.clip(nblk - b0, 0, per), 0)
        tail = (b0 + nsteps == nblk) & (lax.rem(seq_len, jnp.int32(B)) != 0) & (nsteps > 0)
        n_full = nsteps - tail.astype(jnp.int32)

        @pl.when((wg == 0) & active)
        def _consumer():
            plgpu.copy_gmem_to_smem(q_ref.at[s, h], q_smem, q_bar)
            if quant:
                plgpu.copy_gmem_to_smem(qsc_ref.at[s, h], qsc_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            qsc = plgpu.load(qsc_smem, layout=col) if quant else None
            m_i = plgpu.layout_cast(jnp.full((NQ,), -jnp.inf, jnp.float32), col)
            l_i = plgpu.layout_cast(jnp.full((NQ,), 0.0, jnp.float32), col)
            acc = plgpu.layout_cast(jnp.full((D, NQ), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def kv_step(t, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(t, jnp.int32(stages))
                plgpu.barrier_wait(k_bars.at[slot])
                k_tile = k_smem.at[slot]
                if quant:   # logits (log2 domain) from Q's two e4m3 terms on the 8-bit tile
                    def qk(hi_ref, lo_ref):
                        plgpu.wgmma(hi_ref, k_tile, q_smem.at[0].transpose((1, 0)))
                        plgpu.wgmma(lo_ref, k_tile, q_smem.at[1].transpose((1, 0)))
                        return hi_ref[...], lo_ref[...]
                    hi, lo = pl.run_scoped(qk, plgpu.ACC((B, NQ), jnp.float32),
                                           plgpu.ACC((B, NQ), jnp.float32))
                    ks = plgpu.load(ks_smem.at[slot], layout=row)
                    sc = ((hi + lo * (1.0 / 16.0)) * lax.broadcast_in_dim(ks, hi.shape, [0])
                          * lax.broadcast_in_dim(qsc, hi.shape, [1]))
                else:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, k_tile, q_smem.transpose((1, 0)))
                        return acc_ref[...]
                    sc = pl.run_scoped(qk, plgpu.ACC((B, NQ), jnp.float32)) * c_log2
                plgpu.barrier_arrive(k_cons.at[slot])
                if masked:
                    keys = plgpu.broadcasted_iota(jnp.int32, (B, NQ), 0,
                                                  layout=plgpu.Layout.WGMMA)
                    sc = jnp.where(keys + (b0 + t) * B < seq_len, sc, -jnp.inf)
                m_new = jnp.maximum(m_i, sc.max(axis=0))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [1]))
                l_i = l_i * alpha + p.sum(axis=0)
                p_smem[...] = p.astype(dtype)
                plgpu.barrier_wait(v_bars.at[slot])
                v_tile = v_smem.at[slot]
                if quant:
                    convert(v_tile, vs_smem.at[slot], v16)
                    plgpu.barrier_arrive(v_cons.at[slot])
                    v_tile = v16
                plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, v_tile.transpose((1, 0)), p_smem)
                    return acc_ref[...]
                o_blk = pl.run_scoped(pv, plgpu.ACC((D, NQ), jnp.float32))
                if not quant:
                    plgpu.barrier_arrive(v_cons.at[slot])
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [1]) + o_blk, m_new, l_i

            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(n_full, nsteps, functools.partial(kv_step, masked=True),
                                          carry)
            has = l_i > 0.0     # a split past its sequence's end saw no key: O = 0, lse = NEG
            l_safe = jnp.where(has, l_i, 1.0)
            o_smem[...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [1])
            lse_smem[...] = jnp.where(has, m_i + jnp.log2(l_safe), NEG)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, h, j])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[s, h, j])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _producer():
            last_col, last_page = pt_ref.shape[1] - 1, k_ref.shape[0] - 1

            def page_ids(t):   # the n_cp page ids of block t, clamped (masked keys past the end)
                return tuple(
                    jnp.clip(pt_ref[s, jnp.minimum(lax.div((b0 + t) * B + c * rows_cp,
                                                           jnp.int32(page_size)), last_col)],
                             0, last_page)
                    for c in range(n_cp))

            def issue(t, slot, pool, smem, bar, pages, scales, scale_smem):
                for c, page in enumerate(pages):
                    if n_cp > 1 or B == page_size:
                        keys = pl.ds(0, rows_cp)
                    else:   # page_size > block_kv: the block is a slice of one page
                        off = lax.rem((b0 + t) * B, jnp.int32(page_size))
                        keys = pl.ds(pl.multiple_of(off, B), rows_cp)
                    dst = smem.at[slot, pl.ds(c * rows_cp, rows_cp)] if n_cp > 1 else smem.at[slot]
                    plgpu.copy_gmem_to_smem(pool.at[page, keys, h], dst, bar.at[slot])
                    if quant:   # a bulk copy (16-byte aligned ends), as decode_mgpu does
                        plgpu.copy_gmem_to_smem(scales.at[page, h, keys],
                                                scale_smem.at[slot, pl.ds(c * rows_cp, rows_cp)],
                                                bar.at[slot],
                                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

            def kv_loop(t, pages):
                slot = lax.rem(t, jnp.int32(stages))
                nxt = page_ids(t + 1)
                for pool, smem, bars_, cons_, sc_ref, sc_smem in (
                        (k_ref, k_smem, k_bars, k_cons, ks_ref, ks_smem),
                        (v_ref, v_smem, v_bars, v_cons, vs_ref, vs_smem)):
                    @pl.when(t >= stages)
                    def _():
                        plgpu.barrier_wait(cons_.at[slot])
                    issue(t, slot, pool, smem, bars_, pages, sc_ref, sc_smem)
                return nxt

            @pl.when(nsteps > 0)
            def _stream():
                lax.fori_loop(0, nsteps, kv_loop, page_ids(0))

            @pl.loop(jnp.maximum(nsteps - stages, 0), nsteps)
            def _drain(t):      # observe every release (parity tracking needs each phase)
                slot = lax.rem(t, jnp.int32(stages))
                plgpu.barrier_wait(k_cons.at[slot])
                plgpu.barrier_wait(v_cons.at[slot])

    def entry(sl_ref, qs_ref, pt_ref, q_ref, qsc_ref, k_ref, v_ref, *refs):
        ks_ref, vs_ref, o_ref, lse_ref = refs if quant else (None, None, *refs)
        sw128 = lambda item: (plgpu.TilingTransform((8, 128 // item)),  # noqa: E731
                              plgpu.SwizzleTransform(128))
        kv_item = jnp.dtype(kv_dtype).itemsize
        q_smem = (plgpu.SMEM((2, NQ, D), FP8, transforms=sw128(1)) if quant
                  else plgpu.SMEM((NQ, D), dtype, transforms=sw128(2)))
        bufs = (q_smem, plgpu.SMEM((NQ,), jnp.float32),
                plgpu.SMEM((stages, B, D), kv_dtype, transforms=sw128(kv_item)),
                plgpu.SMEM((stages, B, D), kv_dtype, transforms=sw128(1) if quant else SW32),
                plgpu.SMEM((stages, B), jnp.float32) if quant else None,
                plgpu.SMEM((stages, B), jnp.float32) if quant else None,
                plgpu.SMEM((B, D), dtype, transforms=SW32) if quant else None,
                plgpu.SMEM((B, NQ), dtype, transforms=SW32),
                plgpu.SMEM((D, NQ), jnp.float32), plgpu.SMEM((NQ,), jnp.float32))
        copies = n_cp * (2 if quant else 1)
        pl.run_scoped(
            lambda b, bars, cons: kernel(sl_ref, qs_ref, pt_ref, q_ref, qsc_ref, k_ref, v_ref,
                                         ks_ref, vs_ref, o_ref, lse_ref, b, bars, cons),
            bufs,
            (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
             plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
             plgpu.Barrier(num_arrivals=2 if quant else 1)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
            collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((S, KVH, splits, D, NQ), jnp.float32),
                  jax.ShapeDtypeStruct((S, KVH, splits, NQ), jnp.float32)),
        grid=(S, KVH, splits), grid_names=("seq", "kvh", "split"),
        num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=REDUCE_SCRATCH),
        interpret=interpret)


def _queries(q, query_start, S, KVH, scale, quant):
    """Each sequence's query row as [S, KVH, NQ, D] (padding heads zero), and on e4m3 pages its
    two e4m3 terms [S, KVH, 2, NQ, D] with each row's s * scale * log2(e) [S, KVH, NQ]."""
    T, H, D = q.shape
    G = H // KVH
    rows = q[jnp.clip(query_start[:S], 0, T - 1)].reshape(S, KVH, G, D)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, NQ - G), (0, 0)))
    if not quant:
        return rows, jnp.zeros((S, KVH, NQ), jnp.float32)
    x = rows.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30)
    x = x * (448.0 / amax)
    hi = x.astype(FP8)
    lo = ((x - hi.astype(jnp.float32)) * 16.0).astype(FP8)
    return jnp.stack([hi, lo], axis=2), amax[..., 0] * (float(scale) * LOG2E / 448.0)


@functools.partial(jax.jit, static_argnames=("scale", "max_query_len", "interpret", "config"))
def paged_decode_swap(q, k_pages, v_pages, page_table, seq_lens, query_start, *, scale: float,
                      max_query_len: int = 1, interpret=False, config: SwapConfig | None = None,
                      k_scale=None, v_scale=None):
    """Paged decode attention, keys-major; the contract of `decode_mgpu.paged_decode_mgpu`."""
    T, H, D = q.shape
    _, page_size, KVH, _ = k_pages.shape
    S, max_pages = page_table.shape
    quant = k_scale is not None
    if not supported(q.shape, k_pages.shape, q.dtype, max_query_len, k_dtype=k_pages.dtype,
                     k_scale=k_scale) or (v_scale is None) == quant:
        raise ValueError(f"paged_decode_swap does not support q{q.shape} {q.dtype} / pages "
                         f"{k_pages.shape} {k_pages.dtype} (scales: {quant}) / max_query_len="
                         f"{max_query_len}: decode_mgpu's cases with <= {NQ} query heads per "
                         "KV head")
    cfg = config or choose_config(S, KVH, max_pages, page_size)
    cfg.validate(D, page_size, k_pages.dtype.itemsize)
    query_start = query_start.astype(jnp.int32)
    q_in, q_col_scale = _queries(q, query_start, S, KVH, scale, quant)
    kern = _build_kernel(S=S, KVH=KVH, D=D, page_size=page_size, cfg=cfg, scale=float(scale),
                         dtype=q.dtype, kv_dtype=k_pages.dtype,
                         interpret=interpret_params(interpret))
    scales = (k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)) if quant else ()
    o_sp, lse = kern(seq_lens.astype(jnp.int32), query_start, page_table.astype(jnp.int32),
                     q_in, q_col_scale, k_pages, v_pages, *scales)
    # Merge the splits (log2 domain); only active sequences' partials were written.
    active = query_start[1:] - query_start[:S] > 0
    w = jnp.exp2(lse - jnp.max(lse, axis=2, keepdims=True))               # [S, KVH, sp, NQ]
    o = (o_sp * w[:, :, :, None, :]).sum(2) / w.sum(2)[:, :, None, :]     # [S, KVH, D, NQ]
    o = jnp.swapaxes(o[..., :H // KVH], 2, 3).reshape(S, H, D).astype(q.dtype)
    rows = jnp.where(active, query_start[:S], T)                          # T: dropped
    return jnp.zeros((T, H, D), q.dtype).at[rows].set(o, mode="drop")
