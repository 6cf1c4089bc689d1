"""Mosaic GPU prefill flash attention (pallas_kernels/flash_prefill.py) vs the jnp reference.

CPU (no GPU needed):
  * the work table (pure jnp): every real token row is covered exactly once, padding rows are
    zero-filled, tiles are sorted longest-first;
  * Mosaic GPU lowering for Hopper of the *compiled* kernel (every default / benchmarked config):
    `jit(...).lower(lowering_platforms=("cuda",))` runs Pallas -> Mosaic GPU dialect, layout
    inference and the Mosaic GPU dialect lowering (TMA descriptors, wgmma shapes, SMEM
    transforms) on the CPU. It does not run the C++ passes / ptxas;
  * numerics in GPU *interpret* mode (`InterpretGPUParams`) on small ragged cases. Interpret mode
    runs the kernel's `compat` PV path (P staged through SMEM, PV into a fresh accumulator that is
    added) because it cannot run `pl.run_state` nor a register-LHS wgmma; everything else (work
    table, paged TMA gathers, barriers / warp specialization, causal masks, ragged output ladder)
    is the code the GPU runs. One case also runs under the interpreter's happens-before race
    detector (it catches TMA-vs-compute races on the K/V ring, e.g. a missing consumed-barrier
    wait; it does not model wgmma / commit_smem proxy fences). The interpreter runs each
    warpgroup as a separate XLA CPU computation whose barrier waits block threads of the XLA CPU
    client's thread pool; on a 2-core machine that pool starves and a multi-warpgroup kernel
    hangs intermittently (4 of 6 runs of one case; 0 of 5 with NPROC=8), so the interpret cases
    run in one subprocess with NPROC=16 (the pool size).
GPU (`-m gpu`): the compiled kernel (default and alternative configs) vs the reference on the
same cases, plus an 8k-token causal case checked on sampled rows against a float32 dense
computation.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import mgpu_interpret  # noqa: E402
from pallas_kernels.flash_prefill import (ATTN, EMPTY, ZERO, FlashConfig,  # noqa: E402
                                          build_work_table, flash_prefill, supported)
from pallas_kernels.reference import ragged_paged_attention_ref  # noqa: E402

TOL = 2e-2
gpu = pytest.mark.gpu

# (name, qlens, seq_lens, H, KVH, D, page, T_pad, S_pad). seq_len >= qlen; seq_len - qlen is a
# cached prefix. Small enough for interpret mode (each ~3-10 s on 2 CPUs).
CASES = [
    ("ragged_gqa4_d64_p16", [100, 37, 1], [100, 60, 17], 4, 1, 64, 16, 23, 1),
    ("mha_d128_p16_prefix", [130], [200], 2, 2, 128, 16, 0, 0),
    ("g1_d64_p64_longctx", [70, 64], [70, 300], 2, 2, 64, 64, 0, 0),
    ("gqa4_d128_p128_gt_block", [65, 9], [193, 9], 4, 1, 128, 128, 5, 1),
    ("gqa2_d128_p16_short", [3, 64, 128], [40, 64, 150], 4, 2, 128, 16, 2, 0),
]


make_case = mgpu_interpret.paged_case
rel = mgpu_interpret.rel


def run_case(case, *, interpret, config=None):
    """(rel err vs reference, max |padding rows|, any NaN)."""
    name, qlens, seq_lens, H, KVH, D, page, T_pad, S_pad = case
    args = make_case(0, qlens, seq_lens, H, KVH, D, page, T_pad, S_pad)
    Q = max(qlens)
    scale = D ** -0.5
    out = flash_prefill(*args, scale=scale, max_query_len=Q, interpret=interpret, config=config)
    ref = ragged_paged_attention_ref(*args, scale=scale, max_query_len=Q)
    n_real = int(np.asarray(args[5])[-1])
    out32 = np.asarray(out.astype(jnp.float32))
    pad_max = float(np.abs(out32[n_real:]).max(initial=0.0))
    return rel(out, ref), pad_max, bool(np.isnan(out32).any())


# ------------------------------------------------------------------------------------------------
# CPU: work table
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_work_table_covers_rows(case):
    name, qlens, seq_lens, H, KVH, D, page, T_pad, S_pad = case
    q, kp, vp, pt, sl, qs = make_case(0, qlens, seq_lens, H, KVH, D, page, T_pad, S_pad)
    T = q.shape[0]
    tile, B = 128, 128
    tab = np.asarray(build_work_table(sl, qs, T=T, max_query_len=max(qlens), tile=tile,
                                      block_kv=B))
    cover = np.zeros(T, np.int32)
    qs_np, sl_np = np.asarray(qs), np.asarray(sl)
    works = []
    for tok0, nval, pos0, seq, kind, *_ in tab:
        if kind == EMPTY:
            assert nval == 0
            works.append(-1)
            continue
        assert 0 < nval <= tile
        cover[tok0:tok0 + nval] += 1
        if kind == ATTN:
            assert qs_np[seq] <= tok0 and tok0 + nval <= qs_np[seq + 1]
            qlen = qs_np[seq + 1] - qs_np[seq]
            assert pos0 == sl_np[seq] - qlen + (tok0 - qs_np[seq])
            works.append(-(-(pos0 + nval) // B))
        else:
            assert kind == ZERO and tok0 >= qs_np[-1]
            works.append(0)
    assert (cover == 1).all(), cover
    assert works == sorted(works, reverse=True)


# ------------------------------------------------------------------------------------------------
# CPU: Mosaic GPU lowering (Hopper) of the compiled kernel
# ------------------------------------------------------------------------------------------------

LOWER_CONFIGS = [
    (128, 16, 4, FlashConfig()),
    (128, 64, 4, FlashConfig()),
    (128, 16, 1, FlashConfig(block_kv=64)),
    (128, 16, 4, FlashConfig(block_kv=64, num_stages=3)),
    (128, 16, 4, FlashConfig(schedule_barrier=False)),
    (128, 16, 4, FlashConfig(lpt=False, heads_fastest=False)),
    (128, 16, 4, FlashConfig(block_kv=64, compat=True)),
    (128, 128, 4, FlashConfig(block_kv=64)),
    (64, 16, 1, FlashConfig(num_stages=3)),
    (64, 32, 2, FlashConfig(block_kv=64, compat=True)),
]


@pytest.mark.parametrize("D,page,G,cfg", LOWER_CONFIGS,
                         ids=[f"D{d}-p{p}-G{g}-{c.block_kv}x{c.num_stages}"
                              f"{'-compat' if c.compat else ''}"
                              f"{'-nosched' if not c.schedule_barrier else ''}"
                              f"{'-nolpt-tilesfirst' if not c.lpt else ''}"
                              for d, p, g, c in LOWER_CONFIGS])
def test_lowers_for_hopper(D, page, G, cfg):
    T, KVH, S, max_pages = 512, 2, 3, -(-640 // page)
    H = KVH * G
    shapes = mgpu_interpret.paged_shapes(T, H, KVH, D, S, max_pages, page)
    f = jax.jit(lambda *a: flash_prefill(*a, scale=D ** -0.5, max_query_len=T, config=cfg))
    text = f.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_supported():
    assert supported((10, 32, 128), (9, 16, 8, 128))
    assert supported((10, 8, 64), (9, 64, 8, 64))
    assert not supported((10, 32, 256), (9, 16, 8, 256))     # D=256: SMEM, see notes
    assert not supported((10, 32, 96), (9, 16, 8, 96))
    assert not supported((10, 30, 128), (9, 16, 8, 128))     # H % KVH
    assert not supported((10, 32, 128), (9, 4, 8, 128))      # page < 8-row SMEM tile
    assert not supported((10, 32, 128), (9, 16, 8, 128), jnp.float32)


# ------------------------------------------------------------------------------------------------
# CPU: interpret mode (numerics), in one subprocess with a big enough XLA CPU pool
# ------------------------------------------------------------------------------------------------

def _interpret_worker():
    mgpu_interpret.worker(CASES, run_case, CASES[0])


interpret_results, test_interpret_vs_reference, test_interpret_no_races = \
    mgpu_interpret.make_tests(__file__, CASES, TOL)


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernel
# ------------------------------------------------------------------------------------------------

GPU_CONFIGS = [None, FlashConfig(block_kv=64), FlashConfig(block_kv=64, compat=True),
               FlashConfig(schedule_barrier=False), FlashConfig(lpt=False, heads_fastest=False)]


@gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS,
                         ids=["default", "bkv64", "compat", "nosched", "nolpt-tilesfirst"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_vs_reference(case, cfg):
    if cfg is not None and cfg.block_kv < case[6] and case[6] % cfg.block_kv:
        pytest.skip("page/block mismatch")
    err, pad_max, has_nan = run_case(case, interpret=False, config=cfg)
    assert not has_nan
    assert pad_max == 0.0
    assert err < TOL, err


def dense_rows_ref(q, k, v, rows, scale):
    """float32 causal attention for selected query rows of one sequence (q at positions 0..T-1)."""
    T, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    qr = q[rows].astype(jnp.float32).reshape(len(rows), KVH, G, D)
    s = jnp.einsum("rkgd,tkd->rkgt", qr, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    mask = jnp.arange(T)[None, :] <= jnp.asarray(rows)[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("rkgt,tkd->rkgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return o.reshape(len(rows), H, D)


@gpu
@pytest.mark.parametrize("page", [16, 64])
def test_gpu_8k_causal(page):
    T, H, KVH, D = 8192, 32, 8, 128
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (T, H, D), jnp.bfloat16)
    k = jax.random.normal(k2, (T, KVH, D), jnp.bfloat16)
    v = jax.random.normal(k3, (T, KVH, D), jnp.bfloat16)
    n = T // page
    perm = jax.random.permutation(k4, n) + 1
    kp = jnp.zeros((n + 1, page, KVH, D), jnp.bfloat16).at[perm].set(k.reshape(n, page, KVH, D))
    vp = jnp.zeros((n + 1, page, KVH, D), jnp.bfloat16).at[perm].set(v.reshape(n, page, KVH, D))
    pt = perm[None].astype(jnp.int32)
    out = flash_prefill(q, kp, vp, pt, jnp.array([T], jnp.int32), jnp.array([0, T], jnp.int32),
                        scale=D ** -0.5, max_query_len=T)
    rows = np.concatenate([np.arange(0, 64), np.arange(4000, 4100), np.arange(T - 130, T)])
    ref = dense_rows_ref(q, k, v, rows, D ** -0.5)
    assert not bool(jnp.isnan(out).any())
    assert rel(out[rows], ref) < TOL


if __name__ == "__main__":
    if "--interpret-worker" in sys.argv:
        _interpret_worker()


def test_dispatch_sends_only_covered_prompt_steps_to_flash_prefill(monkeypatch):
    import jax.numpy as jnp

    from pallas_kernels import use_flash_prefill

    q = jnp.zeros((256, 32, 128), jnp.bfloat16)
    pages = jnp.zeros((64, 16, 8, 128), jnp.bfloat16)
    assert use_flash_prefill(q, pages, 256)
    assert not use_flash_prefill(q, pages, 1)  # decode: the split-K kernel
    assert not use_flash_prefill(q, pages, 256, soft_cap=30.0)
    assert not use_flash_prefill(q, pages, 256, sliding_window=128)
    assert not use_flash_prefill(q, pages.astype(jnp.float8_e4m3fn), 256, k_scale=jnp.ones(1))
    monkeypatch.setenv("IMP_JAX_PREFILL", "triton")
    assert not use_flash_prefill(q, pages, 256)
    monkeypatch.setenv("IMP_JAX_PREFILL", "mosiac")
    with pytest.raises(ValueError, match="IMP_JAX_PREFILL='mosiac'"):
        use_flash_prefill(q, pages, 256)
