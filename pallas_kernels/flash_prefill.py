"""Prefill flash attention over the paged KV cache: a Pallas **Mosaic GPU** kernel for Hopper.

Contract: exactly `reference.ragged_paged_attention_ref` (docs/architecture.md), causal, no
soft-cap / sliding window:

    flash_prefill(q[T,H,D], k_pages[P,page,KVH,D], v_pages, page_table i32[S,max_pages],
                  seq_lens i32[S], query_start i32[S+1], *, scale, max_query_len) -> [T,H,D]

Query j of sequence s (qlen_s = query_start[s+1] - query_start[s]) sits at position
`seq_lens[s] - qlen_s + j` and attends keys 0..position. Tokens at or beyond query_start[S]
(padding) get zeros. Assumes query_start[0] == 0 (the runner's layout). bf16 / f16, head_dim 64
or 128 (256 does not fit SMEM with this layout), any GQA group, page_size a multiple of 8 that
divides or is divided by block_kv (16 and 64 both work; no pool re-layout needed).

Design (FlashAttention-3 style; jax's attention_mgpu example shows the pattern):

* Work list. The ragged batch is cut into *tiles* of 2 * block_q query rows of one sequence
  (one CTA per (q head, tile)); a small int32 table built with jnp outside the kernel gives
  each tile its first token, number of valid rows, position of its first row, sequence index and
  kind (attention / zero-fill of padding rows / empty). Tiles are sorted by descending KV work
  (longest-processing-time first) so the causal triangle leaves no long tail. The grid is
  (tiles bound, H), launched row-major (heads fastest): the G query heads sharing a KV head run
  side by side and hit the same K/V in L2. CTAs past the real tile count exit at once.
* Three warpgroups per CTA: two compute warpgroups (block_q = 64 rows each; wgmma with f32
  accumulators in registers; online softmax in f32 with exp2, scale * log2(e) folded into one
  FMA) and one memory warpgroup that streams K/V blocks of block_kv keys into a
  num_stages-deep SMEM ring with TMA. A KV block is gathered from pages: block_kv / page_size
  TMA boxes of [page_size, D] (`pool.at[page, :, kv_head]`, a strided 2-D box of the pool, no
  re-layout) land in consecutive 8-row tiles of the stage buffer and complete one mbarrier
  initialized with that many arrivals. Page ids are scalar GMEM loads issued before the wait
  for the stage's release, so their latency hides behind it; K and V share them.
* Causal: a warpgroup walks only the KV blocks up to its last valid row; blocks entirely below
  the diagonal run unmasked, only diagonal blocks (ragged positions can straddle two) pay for
  the iota mask. The two compute warpgroups ping-pong on a schedule barrier (one's softmax
  overlaps the other's wgmmas); the one that finishes its causal range early keeps waiting on /
  releasing the remaining stages, so every thread that waits on a barrier observes each of its
  phases (hardware parity tracking and interpret mode both require it).
* Q in / O out. Mosaic only TMAs into a tiled (swizzled) SMEM buffer at GMEM row offsets it can
  prove are multiples of the 8-row tile, and ragged token offsets are arbitrary; so Q arrives in
  an unswizzled staging buffer and is re-laid out once (registers) into the swizzled buffer
  wgmma reads, and the output leaves through the same staging buffer as a ladder of
  power-of-two-row TMA stores (one 64-row store for a full block), never touching rows of
  another sequence.
* `compat=True`: the interpret-mode-safe PV step. P goes through SMEM (not registers) into a
  fresh zero accumulator that is added to the running one, because GPU interpret mode can run
  neither `pl.run_state` nor a register-LHS wgmma. It also compiles and runs on the GPU (slower,
  and more SMEM: block_kv 64 for D=128). The default keeps P in registers and accumulates in
  place through `pl.run_state`, as the FA3 example does.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
SMEM_BYTES_H100 = 227 * 1024

# Tile kinds in the work table.
EMPTY, ATTN, ZERO = 0, 1, 2
# Work-table columns.
C_TOK0, C_NVALID, C_POS0, C_SEQ, C_KIND = range(5)
N_COLS = 8


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    block_q: int = 64          # query rows per compute warpgroup (a CTA holds 2 * block_q)
    block_kv: int = 128        # keys per pipeline stage
    num_stages: int = 2        # depth of the K/V SMEM ring
    compat: bool = False       # interpret-safe PV path (P via SMEM, separate accumulator)
    schedule_barrier: bool = True  # ping-pong the two compute warpgroups
    lpt: bool = True           # launch tiles longest-first (else in token order)
    heads_fastest: bool = True  # launch order: all heads of a tile, then the next tile

    def validate(self, D: int, page_size: int):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M per warpgroup), got {self.block_q}")
        check_ring(self, page_size, smem_bytes(self, D), min_stages=2)


def softmax_state(rows: int, D: int):
    """Online-softmax state in the WGMMA register layouts, as both Mosaic GPU attention kernels
    start it: running max -inf, running sum 0 (per row), f32 accumulator [rows, D] of zeros."""
    row = plgpu.Layout.WGMMA.reduce(1)
    return (plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), row),
            plgpu.layout_cast(jnp.full((rows, D), 0.0, jnp.float32), plgpu.Layout.WGMMA))


def check_ring(cfg, page_size: int, smem: int, min_stages: int) -> None:
    """The K/V ring rules both Mosaic GPU attention kernels share: blocks of whole 64-key
    wgmma tiles, pages that tile a block (or blocks a page), the SMEM budget."""
    if cfg.block_kv % 64 or cfg.block_kv <= 0:
        raise ValueError(f"block_kv must be a multiple of 64, got {cfg.block_kv}")
    if cfg.num_stages < min_stages:
        raise ValueError(f"num_stages must be >= {min_stages}, got {cfg.num_stages}")
    if not (cfg.block_kv % page_size == 0 or page_size % cfg.block_kv == 0):
        raise ValueError(f"block_kv={cfg.block_kv} and page_size={page_size} must divide one "
                         "another")
    if smem > SMEM_BYTES_H100:
        raise ValueError(f"config {cfg} needs {smem} B of SMEM (> {SMEM_BYTES_H100})")


def smem_bytes(cfg: FlashConfig, D: int, itemsize: int = 2) -> int:
    q = 2 * cfg.block_q * D * itemsize
    kv = 2 * cfg.num_stages * cfg.block_kv * D * itemsize
    stage = q                  # unswizzled Q-in / O-out staging buffer
    p = 2 * cfg.block_q * cfg.block_kv * itemsize if cfg.compat else 0
    return q + kv + stage + p + 2048  # barriers, reduction scratch


def default_config(D: int, page_size: int = 16, *, compat: bool = False) -> FlashConfig:
    if D <= 64:
        cfg = FlashConfig(block_kv=128, num_stages=3, compat=compat)
    else:
        cfg = FlashConfig(block_kv=128 if not compat else 64, num_stages=2, compat=compat)
    if page_size > cfg.block_kv and page_size % cfg.block_kv:
        cfg = dataclasses.replace(cfg, block_kv=page_size)
    return cfg


def supported(q_shape, k_pages_shape, dtype=None) -> bool:
    """Whether the Mosaic GPU prefill kernel covers these shapes (else use another path)."""
    if len(q_shape) != 3 or len(k_pages_shape) != 4:
        return False
    _, H, D = q_shape
    _, page, KVH, Dk = k_pages_shape
    if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                                                      jnp.dtype(jnp.float16)):
        return False
    # D=256 does not fit SMEM with two compute warpgroups + the staging buffer (see notes).
    if D != Dk or D not in (64, 128) or KVH <= 0 or H % KVH:
        return False
    # A page is copied as [page, D] boxes into 8-row SMEM tiles; blocks of 64/128 keys.
    if page % 8 or not (128 % page == 0 or page % 128 == 0 or 64 % page == 0 or page % 64 == 0):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Work table (plain jnp, outside the kernel)
# ---------------------------------------------------------------------------------------------

def num_tiles_bound(T: int, S: int, max_query_len: int, tile: int) -> int:
    """Static bound on attention tiles + zero-fill tiles (the grid's tile axis).

    sum_s cdiv(qlen_s, tile) + cdiv(T - sum_s qlen_s, tile) <= (T + (S + 1) * (tile - 1)) / tile;
    every CTA past the real count exits at once (empty tiles cost a launch each, so the bound is
    kept tight: one sequence of 8192 tokens in 128-row tiles gives 65 tiles for 64 real ones).
    """
    del max_query_len  # qlen_s <= max_query_len is implied by sum_s qlen_s <= T
    return max(1, (T + (S + 1) * (tile - 1)) // tile)


def build_work_table(seq_lens, query_start, *, T: int, max_query_len: int, tile: int,
                     block_kv: int, lpt: bool = True):
    """int32 [NT, 8] table: (tok0, nvalid, pos0, seq, kind, 0, 0, 0) per tile, longest first
    (lpt) or in token order (attention tiles, then zero-fill tiles, then empty ones)."""
    S = seq_lens.shape[0]
    NT = num_tiles_bound(T, S, max_query_len, tile)
    qs = query_start.astype(jnp.int32)
    seq_lens = seq_lens.astype(jnp.int32)
    qlen = jnp.maximum(qs[1:] - qs[:-1], 0)
    ntile = (qlen + tile - 1) // tile                       # tiles per sequence
    cum = jnp.cumsum(ntile)                                 # inclusive
    n_attn = cum[-1]
    i = jnp.arange(NT, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(cum, i, side="right").astype(jnp.int32), 0, S - 1)
    j = i - (cum[s] - ntile[s])
    is_attn = i < n_attn
    tok0_a = qs[s] + j * tile
    nval_a = jnp.clip(qlen[s] - j * tile, 0, tile)
    pos0_a = seq_lens[s] - qlen[s] + j * tile
    # Zero-fill tiles for the padding rows [query_start[S], T).
    pad0 = jnp.clip(qs[-1], 0, T)
    z = i - n_attn
    tok0_z = pad0 + z * tile
    nval_z = jnp.clip(T - tok0_z, 0, tile)
    is_zero = (~is_attn) & (nval_z > 0)
    tok0 = jnp.where(is_attn, tok0_a, jnp.where(is_zero, tok0_z, 0))
    nval = jnp.where(is_attn, nval_a, jnp.where(is_zero, nval_z, 0))
    pos0 = jnp.where(is_attn, pos0_a, 0)
    kind = jnp.where(is_attn & (nval > 0), ATTN, jnp.where(is_zero, ZERO, EMPTY))
    seq = jnp.where(is_attn, s, 0)
    work = jnp.where(kind == ATTN, (pos0 + nval + block_kv - 1) // block_kv,
                     jnp.where(kind == ZERO, 0, -1))
    zeros = jnp.zeros_like(tok0)
    table = jnp.stack([tok0, nval, pos0, seq, kind, zeros, zeros, zeros], axis=1)
    if lpt:
        table = table[jnp.argsort(-work, stable=True)]
    return table.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

def _build_kernel(*, T, H, D, KVH, page_size, n_tiles, cfg: FlashConfig, scale: float, dtype,
                  interpret):
    G = H // KVH
    bq, B, stages = cfg.block_q, cfg.block_kv, cfg.num_stages
    tile = 2 * bq
    if B >= page_size:
        n_cp, rows_cp = B // page_size, page_size
    else:
        n_cp, rows_cp = 1, B
    c_log2 = float(scale) * LOG2E
    compute_wgs = 2

    def kernel(tab_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, scoped):
        head = lax.axis_index("heads")
        tile_id = lax.axis_index("tiles")
        wg = lax.axis_index("wg")
        (qo_smem2, st_smem2, k_smem, v_smem, p_smem2), bars = scoped
        (k_bars, v_bars, q_bars), (k_cons, v_cons), sched = bars

        tok0 = tab_ref[tile_id, C_TOK0]
        nvalid = tab_ref[tile_id, C_NVALID]
        pos0 = tab_ref[tile_id, C_POS0]
        seq = tab_ref[tile_id, C_SEQ]
        kind = tab_ref[tile_id, C_KIND]
        is_attn = kind == ATTN
        # KV blocks the whole CTA needs: up to the last valid row's position.
        cta_steps = jnp.where(is_attn, lax.div(pos0 + nvalid + (B - 1), jnp.int32(B)), 0)

        def sched_barrier():
            if cfg.schedule_barrier:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(kind != EMPTY)
        def _work():

            @pl.when(wg < compute_wgs)
            def _compute_wg():
                plgpu.set_max_registers(232 if not cfg.compat else 224, action="increase")
                qo_smem = qo_smem2.at[wg]
                row0 = wg * bq                          # first row of this warpgroup in the tile
                nv = jnp.clip(nvalid - row0, 0, bq)     # its valid rows
                p_lo = pos0 + row0                      # position of its first row
                kv_steps = jnp.where(is_attn & (nv > 0),
                                     lax.div(p_lo + nv + (B - 1), jnp.int32(B)), 0)
                full_steps = jnp.minimum(lax.div(p_lo + 1, jnp.int32(B)), kv_steps)

                # Ragged token offsets are not multiples of the 8-row SMEM tile (Mosaic requires
                # that for a TMA into a tiled buffer), so Q arrives by TMA in the unswizzled
                # staging buffer and is re-laid out once into the swizzled buffer wgmma reads.
                stage = st_smem2.at[wg]
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tok0 + row0, bq), head], stage,
                                        q_bars.at[wg])
                plgpu.barrier_wait(q_bars.at[wg])
                qo_smem[...] = stage[...]
                plgpu.commit_smem()

                m_i, l_i, acc = softmax_state(bq, D)

                @pl.when(kv_steps > 0)
                def _():
                    plgpu.barrier_wait(k_bars.at[0])

                pl.when(wg == 1)(sched_barrier)

                def kv_step(t, carry, masked: bool):
                    acc, m_i, l_i = carry
                    slot = lax.rem(t, jnp.int32(stages))

                    def compute_qk(acc_ref):
                        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                        sched_barrier()
                        return acc_ref[...]
                    s = pl.run_scoped(compute_qk, plgpu.ACC((bq, B), jnp.float32))
                    plgpu.barrier_arrive(k_cons.at[slot])

                    if masked:
                        lay = plgpu.Layout.WGMMA
                        r_ids = plgpu.broadcasted_iota(jnp.int32, (bq, B), 0, layout=lay)
                        c_ids = plgpu.broadcasted_iota(jnp.int32, (bq, B), 1, layout=lay)
                        keep = (c_ids + t * B) <= (r_ids + p_lo)
                        s = jnp.where(keep, s, -jnp.inf)

                    # m lives in the log2 domain (scaled by scale*log2e): exp2(s*c - m) is an FMA.
                    m_new = jnp.maximum(m_i, s.max(axis=1) * c_log2)
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(s * c_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha
                    p16 = p.astype(dtype)

                    def end_softmax():
                        if cfg.schedule_barrier:
                            plgpu.barrier_arrive(sched)
                        plgpu.barrier_wait(v_bars.at[slot])
                        if cfg.schedule_barrier:
                            plgpu.barrier_wait(sched)

                    if D <= 128:
                        l_i = l_i + p.sum(axis=1)
                        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                        end_softmax()
                    else:
                        end_softmax()
                        l_i = l_i + p.sum(axis=1)

                    def wait_next_k():
                        @pl.when(t + 1 < kv_steps)
                        def _():
                            plgpu.barrier_wait(k_bars.at[lax.rem(t + 1, jnp.int32(stages))])

                    if not cfg.compat:
                        def compute_pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                            wait_next_k()
                        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                    else:
                        p_smem = p_smem2.at[wg]
                        p_smem[...] = p16
                        plgpu.commit_smem()

                        def compute_pv(acc_ref):
                            plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                            wait_next_k()
                            return acc_ref[...]
                        acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((bq, D), jnp.float32))
                    plgpu.barrier_arrive(v_cons.at[slot])
                    return acc, m_new, l_i

                def drain_step(t, _):
                    # Stages this warpgroup does not need (past its causal range) but the other
                    # one does: observe every barrier phase, release the stage, keep the
                    # ping-pong going.
                    slot = lax.rem(t, jnp.int32(stages))
                    plgpu.barrier_wait(k_bars.at[slot])
                    plgpu.barrier_wait(v_bars.at[slot])
                    plgpu.barrier_arrive(k_cons.at[slot])
                    plgpu.barrier_arrive(v_cons.at[slot])
                    sched_barrier()
                    sched_barrier()
                    return _

                carry = (acc, m_i, l_i)
                unmasked = functools.partial(kv_step, masked=False)
                masked = functools.partial(kv_step, masked=True)
                carry = lax.fori_loop(0, full_steps, unmasked, carry)     # below the diagonal
                carry = lax.fori_loop(full_steps, kv_steps, masked, carry)  # on the diagonal
                lax.fori_loop(kv_steps, cta_steps, drain_step, None)      # past it
                acc, m_i, l_i = carry
                pl.when(wg == 0)(sched_barrier)

                # Zero-fill tiles (and rows that saw nothing) get l == 0 and acc == 0 -> 0.
                l_safe = jnp.where(l_i > 0.0, l_i, 1.0)
                out = (acc / lax.broadcast_in_dim(l_safe, (bq, D), [0])).astype(dtype)
                dst_row = tok0 + row0

                @pl.when(nv > 0)
                def _store():
                    stage[...] = out
                    plgpu.commit_smem()
                    # TMA boxes are static: nv rows go out as a ladder of power-of-two row counts
                    # (one 64-row store for a full block), never touching another sequence's rows.
                    start = 0
                    n = bq
                    while n >= 1:
                        @pl.when((nv & n) != 0)
                        def _(start=start, n=n):
                            plgpu.copy_smem_to_gmem(stage.at[pl.ds(start, n)],
                                                    o_ref.at[pl.ds(dst_row + start, n), head])
                        start = start + (nv & n)
                        n //= 2

                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == compute_wgs)
            def _memory_wg():
                plgpu.set_max_registers(40, action="decrease")
                kv_head = lax.div(head, jnp.int32(G))

                def page_slices(t):
                    """The (page, row offset) of each of the n_cp TMA boxes of KV block t."""
                    out = []
                    for c in range(n_cp):
                        key0 = t * B + c * rows_cp
                        page = pt_ref[seq, lax.div(key0, jnp.int32(page_size))]
                        if n_cp > 1 or B == page_size:
                            out.append((page, None))
                        else:  # page_size > block_kv: a block is a slice of one page
                            off = lax.rem(key0, jnp.int32(page_size))
                            out.append((page, pl.multiple_of(off, B)))
                    return out

                def issue(slices, slot, pool, smem, bar):
                    for c, (page, off) in enumerate(slices):
                        if off is None:
                            src = pool.at[page, :, kv_head]
                        else:
                            src = pool.at[page, pl.ds(off, rows_cp), kv_head]
                        if n_cp > 1:
                            dst = smem.at[slot, pl.ds(c * rows_cp, rows_cp)]
                        else:
                            dst = smem.at[slot]
                        plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])

                @pl.loop(0, cta_steps)
                def _kv_loop(t):
                    slot = lax.rem(t, jnp.int32(stages))
                    # Page ids first (scalar GMEM loads, L2 hits): their latency overlaps the wait
                    # for the stage to be released. K and V share them.
                    slices = page_slices(t)

                    @pl.when(t >= stages)
                    def _():
                        plgpu.barrier_wait(k_cons.at[slot])
                    issue(slices, slot, k_ref, k_smem, k_bars)

                    @pl.when(t >= stages)
                    def _():
                        plgpu.barrier_wait(v_cons.at[slot])
                    issue(slices, slot, v_ref, v_smem, v_bars)

                # Observe the release of the last stages too (each phase is waited on once).
                @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
                def _drain(t):
                    slot = lax.rem(t, jnp.int32(stages))
                    plgpu.barrier_wait(k_cons.at[slot])
                    plgpu.barrier_wait(v_cons.at[slot])

    def entry(tab_ref, pt_ref, q_ref, k_ref, v_ref, o_ref):
        tiling = plgpu.TilingTransform((8, 64 if D >= 64 else D))
        swizzle = plgpu.SwizzleTransform(128 if D >= 64 else D * 2)
        qo = plgpu.SMEM((compute_wgs, bq, D), dtype, transforms=(tiling, swizzle))
        st = plgpu.SMEM((compute_wgs, bq, D), dtype)
        kb = plgpu.SMEM((stages, B, D), dtype, transforms=(tiling, swizzle))
        vb = plgpu.SMEM((stages, B, D), dtype, transforms=(tiling, swizzle))
        pb = (plgpu.SMEM((compute_wgs, bq, B), dtype, transforms=(tiling, swizzle))
              if cfg.compat else None)
        bufs = [qo, st, kb, vb, pb]

        def body(*args):
            smem, rest = args[:5], args[5:]
            kernel(tab_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, (tuple(smem), rest))

        pl.run_scoped(
            body,
            *bufs,
            (plgpu.Barrier(num_arrivals=n_cp, num_barriers=stages),
             plgpu.Barrier(num_arrivals=n_cp, num_barriers=stages),
             plgpu.Barrier(num_barriers=compute_wgs)),
            (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=compute_wgs),
            collective_axes="wg",
        )

    # Pallas Mosaic GPU launches the grid row-major (the last axis varies fastest).
    if cfg.heads_fastest:
        grid, grid_names = (n_tiles, H), ("tiles", "heads")
    else:
        grid, grid_names = (H, n_tiles), ("heads", "tiles")
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((T, H, D), dtype),
        grid=grid,
        grid_names=grid_names,
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )


def interpret_params(interpret):
    """`interpret` (False / True / a `plgpu.InterpretGPUParams`) as the Mosaic GPU kernels take
    it: None to compile for the GPU, else the interpret-mode parameters (shared by both
    Mosaic GPU attention kernels)."""
    if interpret is True:
        return plgpu.InterpretGPUParams()
    if interpret is False or interpret is None:
        return None
    return interpret


@functools.partial(jax.jit, static_argnames=("scale", "max_query_len", "interpret", "config"))
def flash_prefill(q, k_pages, v_pages, page_table, seq_lens, query_start, *, scale: float,
                  max_query_len: int, interpret=False, config: FlashConfig | None = None):
    """Causal ragged paged prefill attention (Mosaic GPU kernel); see the module docstring."""
    T, H, D = q.shape
    P, page_size, KVH, Dk = k_pages.shape
    S, max_pages = page_table.shape
    if not supported(q.shape, k_pages.shape, q.dtype):
        raise ValueError(f"flash_prefill does not support q{q.shape} {q.dtype} / pages "
                         f"{k_pages.shape}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError("q, k_pages and v_pages must share a dtype")
    interp = interpret_params(interpret)
    cfg = config if config is not None else default_config(D, page_size,
                                                           compat=interp is not None)
    if interp is not None and not cfg.compat:
        # Interpret mode runs neither pl.run_state nor a register-LHS wgmma: use the compat PV.
        cfg = dataclasses.replace(cfg, compat=True)
        if smem_bytes(cfg, D) > SMEM_BYTES_H100:
            cfg = dataclasses.replace(cfg, block_kv=64)
    cfg.validate(D, page_size)
    B = cfg.block_kv
    tile = 2 * cfg.block_q

    table = build_work_table(seq_lens, query_start, T=T, max_query_len=int(max_query_len),
                             tile=tile, block_kv=B, lpt=cfg.lpt)
    # Page table padded so any KV block up to the longest context has valid page ids (page 0).
    keys_pad = -(-(max_pages * page_size) // B) * B
    cols = max(-(-keys_pad // page_size), max_pages)
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, cols - max_pages)))

    kern = _build_kernel(T=T, H=H, D=D, KVH=KVH, page_size=page_size, n_tiles=table.shape[0],
                         cfg=cfg, scale=float(scale), dtype=q.dtype, interpret=interp)
    return kern(table, pt, q, k_pages, v_pages)
