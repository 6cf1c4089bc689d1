"""What Mosaic GPU lowers for 8-bit K/V tiles (CPU, Hopper target): the building blocks of the
planned 8-bit-page decode kernel (docs/kernels_notes.md). e4m3 -> bf16 conversion is not
among them on this toolchain (the ptxas in use converts e4m3 to f16 only), so the plan computes
in f16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

FP8, F16 = jnp.float8_e4m3fn, jnp.float16
B, D, N, M = 64, 128, 16, 64
SW8 = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))   # 8-bit rows of 128
SW16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))   # 16-bit rows of 64
SW16_N = (plgpu.TilingTransform((8, N)), plgpu.SwizzleTransform(N * 2))  # 16-bit rows of N


def _lowers(entry, out_shape, *in_shapes):
    kernel = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32))
    text = jax.jit(kernel).trace(*in_shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _load_two(a_ref, b_ref, a_smem, b_smem, bar):
    plgpu.copy_gmem_to_smem(a_ref, a_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(b_ref, b_smem, bar.at[1])
    plgpu.barrier_wait(bar.at[0])
    plgpu.barrier_wait(bar.at[1])


def _store(o_smem, o_ref, value):
    o_smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref)
    plgpu.wait_smem_to_gmem(0)


@pytest.mark.parametrize("softmax_max", [False, True])
def test_fp8_k_as_f16_register_lhs_and_a_max_over_keys(softmax_max):
    """S^T [keys, queries] = K [keys, D] (e4m3 upcast to f16 in registers) @ Q^T [D, queries]
    (the swap-A/B orientation: few query rows in wgmma's N), then the softmax max over keys,
    the accumulator's M axis."""
    def entry(k_ref, q_ref, o_ref):
        def body(k_smem, q_smem, o_smem, bar):
            _load_two(k_ref, q_ref, k_smem, q_smem, bar)
            k = k_smem[...].astype(F16)

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, k, q_smem)
                return acc_ref[...]
            st = pl.run_scoped(mm, plgpu.ACC((B, N), jnp.float32))
            if softmax_max:
                st = st - jax.lax.broadcast_in_dim(st.max(axis=0), st.shape, [1])
            _store(o_smem, o_ref, st)
        pl.run_scoped(body, plgpu.SMEM((B, D), FP8, transforms=SW8),
                      plgpu.SMEM((D, N), F16, transforms=SW16_N),
                      plgpu.SMEM((B, N), jnp.float32), plgpu.Barrier(num_barriers=2))
    _lowers(entry, (B, N), jax.ShapeDtypeStruct((B, D), FP8), jax.ShapeDtypeStruct((D, N), F16))


def test_fp8_v_converted_to_an_f16_smem_tile_for_pv():
    """O [64, D] = P [64, keys] (f16 registers) @ V [keys, D]: V is MN-major for this product, so
    its e4m3 tile is converted into an f16 SMEM tile first (8-bit wgmma operands must be
    K-major, and a register V^T needs a transpose Mosaic GPU does not lower)."""
    def entry(v_ref, p_ref, o_ref):
        def body(v8, v16, p_smem, o_smem, bar):
            _load_two(v_ref, p_ref, v8, p_smem, bar)
            v16[...] = v8[...].astype(F16)
            plgpu.commit_smem()
            p = p_smem[...]

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, p, v16)
                return acc_ref[...]
            _store(o_smem, o_ref, pl.run_scoped(mm, plgpu.ACC((M, D), jnp.float32)))
        pl.run_scoped(body, plgpu.SMEM((B, D), FP8, transforms=SW8),
                      plgpu.SMEM((B, D), F16, transforms=SW16),
                      plgpu.SMEM((M, B), F16, transforms=SW16),
                      plgpu.SMEM((M, D), jnp.float32), plgpu.Barrier(num_barriers=2))
    _lowers(entry, (M, D), jax.ShapeDtypeStruct((B, D), FP8), jax.ShapeDtypeStruct((M, B), F16))


def test_per_key_scales_from_a_contiguous_smem_vector():
    """S [64, keys] (f16 wgmma) times each key's scale, a contiguous f32 [keys] SMEM vector
    broadcast over S's columns: what a stage needs if the scale pools are page-contiguous per
    KV head ([P, KVH, page]: one >= 16-byte TMA box per page)."""
    def entry(q_ref, k_ref, s_ref, o_ref):
        def body(q_smem, k_smem, sc_smem, o_smem, bar):
            _load_two(q_ref, k_ref, q_smem, k_smem, bar)
            plgpu.copy_gmem_to_smem(s_ref, sc_smem, bar.at[2])
            plgpu.barrier_wait(bar.at[2])

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]
            st = pl.run_scoped(mm, plgpu.ACC((M, B), jnp.float32))
            sc = plgpu.load(sc_smem, layout=plgpu.Layout.WGMMA.reduce(0))
            _store(o_smem, o_ref, st * jax.lax.broadcast_in_dim(sc, st.shape, [1]))
        pl.run_scoped(body, plgpu.SMEM((M, D), F16, transforms=SW16),
                      plgpu.SMEM((B, D), F16, transforms=SW16), plgpu.SMEM((B,), jnp.float32),
                      plgpu.SMEM((M, B), jnp.float32), plgpu.Barrier(num_barriers=3))
    _lowers(entry, (M, B), jax.ShapeDtypeStruct((M, D), F16), jax.ShapeDtypeStruct((B, D), F16),
            jax.ShapeDtypeStruct((B,), jnp.float32))


SW8_64 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(64))   # 8-bit rows of 64


def test_fp8_pv_on_a_transposed_v_tile():
    """O [64, D] = P [64, keys] @ V [keys, D] as one e4m3 wgmma, with V stored transposed
    ([D, keys], keys contiguous: K-major for this product) and P staged in SMEM in e4m3. What
    8-bit P V needs (session 13 probes): P as an 8-bit register LHS, a transposed ref store
    (V [keys, D] -> [D, keys] in SMEM) and TMA boxes narrower than the swizzle tile (16- or
    32-key pages into a 64-key V^T tile) did not lower; whole 64-key pages do (below)."""
    def entry(p_ref, vt_ref, o_ref):
        def body(p8, vt, o_smem, bar):
            _load_two(p_ref, vt_ref, p8, vt, bar)

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, p8, vt.transpose((1, 0)))
                return acc_ref[...]
            _store(o_smem, o_ref, pl.run_scoped(mm, plgpu.ACC((M, D), jnp.float32)))
        pl.run_scoped(body, plgpu.SMEM((M, B), FP8, transforms=SW8_64),
                      plgpu.SMEM((D, B), FP8, transforms=SW8_64),
                      plgpu.SMEM((M, D), jnp.float32), plgpu.Barrier(num_barriers=2))
    _lowers(entry, (M, D), jax.ShapeDtypeStruct((M, B), FP8), jax.ShapeDtypeStruct((D, B), FP8))


def test_a_transposed_64_key_page_lands_in_a_v_tile():
    """A transposed page [D, 64 keys] of a [pages, D, 64] pool, TMA'd into a [D, 64] e4m3 tile
    swizzled by 64 bytes (the B operand above): one box per page, so transposed V pages of
    64 keys fit the e4m3 P V product."""
    def entry(pool_ref, o_ref):
        def body(vt, o_smem, bar):
            plgpu.copy_gmem_to_smem(pool_ref.at[1], vt, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            _store(o_smem, o_ref, vt[...].astype(jnp.float32))
        pl.run_scoped(body, plgpu.SMEM((D, B), FP8, transforms=SW8_64),
                      plgpu.SMEM((D, B), jnp.float32), plgpu.Barrier(num_barriers=1))
    _lowers(entry, (D, B), jax.ShapeDtypeStruct((3, D, B), FP8))


@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="jax 0.11.2: layout inference fails for an e4m3 register LHS made "
                          "from a WGMMA accumulator")
def test_pinned_limit_e4m3_p_from_the_accumulator_as_register_lhs():
    """What keeps P in SMEM for an e4m3 P V: the softmax's P (the f32 accumulator's layout)
    cast to e4m3 does not lower as wgmma's register operand. Strict xfail: a JAX that lowers
    it makes this test fail, so the SMEM round trip can be dropped then."""
    def entry(p_ref, vt_ref, o_ref):
        def body(pf, vt, o_smem, bar):
            _load_two(p_ref, vt_ref, pf, vt, bar)
            p = plgpu.load(pf, layout=plgpu.Layout.WGMMA).astype(FP8)

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, p, vt.transpose((1, 0)))
            acc = pl.run_state(mm)(plgpu.ACC.init(jnp.zeros((M, D), jnp.float32)))
            _store(o_smem, o_ref, acc)
        pl.run_scoped(body, plgpu.SMEM((M, B), jnp.float32),
                      plgpu.SMEM((D, B), FP8, transforms=SW8_64),
                      plgpu.SMEM((M, D), jnp.float32), plgpu.Barrier(num_barriers=2))
    _lowers(entry, (M, D), jax.ShapeDtypeStruct((M, B), jnp.float32),
            jax.ShapeDtypeStruct((D, B), FP8))


@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="jax 0.11.2: a TMA slice must cover whole swizzle tiles")
def test_pinned_limit_16_key_page_boxes_into_a_v_tile():
    """Why transposed e4m3 V pages need 64 keys: four 16-key page boxes into the column slices
    of one [D, 64] V^T tile do not lower (strict xfail, as above)."""
    def entry(pool_ref, o_ref):
        def body(vt, o_smem, bar):
            for c in range(B // 16):
                plgpu.copy_gmem_to_smem(pool_ref.at[c], vt.at[:, pl.ds(c * 16, 16)], bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            _store(o_smem, o_ref, vt[...].astype(jnp.float32))
        pl.run_scoped(body, plgpu.SMEM((D, B), FP8, transforms=SW8_64),
                      plgpu.SMEM((D, B), jnp.float32),
                      plgpu.Barrier(num_arrivals=B // 16, num_barriers=1))
    _lowers(entry, (D, B), jax.ShapeDtypeStruct((B // 16, D, 16), FP8))
