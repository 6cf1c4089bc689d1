"""The decode-time Mosaic GPU FP8 GEMM (pallas_kernels/skinny_fp8.py): yT = wq @ xq^T with the
weight as wgmma's M side.

On CPU: numerics through Mosaic GPU's interpret mode (fp8 wgmma included), against the jnp
reference; "lowers for cuda" runs the whole Pallas -> Mosaic GPU lowering (layout inference,
wgmma operand checks, the 227 KB SMEM budget) for every Llama-3-8B decode shape and M without a
GPU. @pytest.mark.gpu tests run the compiled kernel on the real shapes. Random inputs, never
zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_gemm as fg
from pallas_kernels import skinny_fp8 as sf
from tests.test_gemm import operands, rel  # per-token / per-channel fp8 operands

# Llama-3-8B decode weights [N, K] as (K, N); gate / up also separately
LLAMA8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
           "gate": (4096, 14336), "down": (14336, 4096), "lm_head": (4096, 128256)}
DECODE_M = (1, 4, 8, 16, 32, 64)
Cfg = sf.SkinnyFp8Config



def abstract_args(M, K, N):
    return (jax.ShapeDtypeStruct((M, K), sf.FP8), jax.ShapeDtypeStruct((M,), jnp.float32),
            jax.ShapeDtypeStruct((N, K), sf.FP8), jax.ShapeDtypeStruct((N,), jnp.float32))


def lower(M, K, N, cfg):
    return jax.jit(lambda *a: sf.skinny_fp8_matmul(*a, config=cfg)).trace(
        *abstract_args(M, K, N)).lower(lowering_platforms=("cuda",))


# ------------------------------------------------------------------------------- interpret


@pytest.mark.parametrize("M,K,N,cfg", [
    (1, 512, 256, Cfg(64, 128, 3, 1)),  # batch 1: Mp = 8, bf16 out, one kernel
    (5, 512, 256, Cfg(128, 128, 2, 2)),  # split-K: scaled f32 partials + XLA sum, Mp = 8
    (16, 512, 256, Cfg(256, 128, 4, 1)),  # 256-row weight tiles (4 wgmma row blocks)
    (33, 1024, 128, Cfg(64, 256, 2, 4)),  # Mp = 64, 256-wide K steps, 4-way split
    (64, 512, 192, Cfg(64, 128, 8, 1)),  # ring deeper than the K steps (clamped)
], ids=["m1", "m5_split2", "m16_tn256", "m33_tk256_split4", "m64_deep"])
def test_skinny_fp8_interpret_matches_reference(M, K, N, cfg):
    assert sf._valid(M, K, N, cfg)
    xq, xs, wq, ws = operands(M, K, N, key=M)
    y = sf.skinny_fp8_matmul(xq, xs, wq, ws, config=cfg, interpret=True)
    ref = sf.skinny_fp8_ref(xq, xs, wq, ws)
    assert y.shape == (M, N) and y.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert rel(y, ref) < 4e-3  # same products, f32 sums in another order, bf16 output
    # the reference is the float matmul of the dequantized operands
    deq = (xq.astype(jnp.float32) * xs[:, None]) @ (wq.astype(jnp.float32) * ws[:, None]).T
    assert rel(ref, deq) < 4e-3
    # the kernel's own layout, without the final transpose
    yt = sf.skinny_fp8_matmul_t(xq, xs, wq, ws, config=cfg, interpret=True)
    assert yt.shape == (N, M)
    np.testing.assert_array_equal(np.asarray(yt.T, np.float32), np.asarray(y, np.float32))


def test_skinny_fp8_default_config_and_scale_shapes():
    """config=None picks `choose_config`; [M, 1] / [1, N] scales (QuantArray's) are accepted;
    f32 output."""
    M, K, N = 3, 1024, 256
    xq, xs, wq, ws = operands(M, K, N, key=11)
    y = sf.skinny_fp8_matmul(xq, xs.reshape(M, 1), wq, ws.reshape(1, N), interpret=True,
                             out_dtype=jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (M, N)
    assert rel(y, sf.skinny_fp8_ref(xq, xs, wq, ws, out_dtype=jnp.float32)) < 1e-5


# ------------------------------------------------------------------------------- configs


def test_skinny_fp8_configs_for_llama_decode():
    for name, (K, N) in LLAMA8B.items():
        for M in DECODE_M:
            cfg = sf.choose_config(M, K, N)
            assert cfg is not None and sf.supported(M, K, N, cfg), (name, M)
            assert cfg.smem_bytes(M) <= fg.SMEM_LIMIT, (name, M, cfg)
            ctas = (N // cfg.tile_n) * cfg.splits
            assert ctas >= 64, (name, M, cfg)  # enough CTAs streaming for 132 SMs
            assert K // (cfg.splits * cfg.tile_k) >= 2, (name, M, cfg)
            if cfg.splits > 1:  # f32 partials (written + read) stay well below the weight bytes
                assert 2 * cfg.splits * sf.padded_m(M) * N * 4 <= K * N // 2, (name, M, cfg)
            # the model: at least half of the HBM rate on every shape
            assert sf.weight_bytes(K, N) / sf.estimate_us(M, K, N, cfg) / 1e6 > 0.5 * sf.HBM_TBS
            assert sf.candidate_configs(M, K, N)[0] == cfg or (K, N, sf.padded_m(M)) in sf.TUNED
    assert sf.choose_config(1, 4096, 4096, splits=4).splits == 4  # overrides
    assert sf.padded_m(1) == 8 and sf.padded_m(9) == 16 and sf.padded_m(64) == 64


def test_skinny_fp8_unsupported_shapes():
    assert not sf.supported(65, 4096, 4096)  # beyond MAX_M: the prefill kernel's job
    assert not sf.supported(1, 4096, 100)  # N not a multiple of 64 -> caller falls back to XLA
    assert not sf.supported(1, 4000, 4096)  # K not a multiple of 128 (x splits)
    assert not sf._valid(1, 4096, 4096, Cfg(256, 256, 12, 1))  # > 227 KB of SMEM
    with pytest.raises(ValueError, match="not tiled"):
        jax.eval_shape(sf.skinny_fp8_matmul, *abstract_args(1, 4000, 4096))


# ------------------------------------------------------------------------------- lowering


def test_skinny_fp8_lowers_for_cuda_every_llama_shape():
    """Pallas -> Mosaic GPU (layout inference, wgmma operand checks, SMEM size) on CPU for every
    Llama-3-8B decode shape x M with the chosen config."""
    n = 0
    for name, (K, N) in LLAMA8B.items():
        for M in DECODE_M:
            low = lower(M, K, N, sf.choose_config(M, K, N))
            assert "mosaic_gpu" in low.as_text()[:20000], (name, M)
            n += 1
    assert n == len(LLAMA8B) * len(DECODE_M)


@pytest.mark.parametrize("M,K,N,cfg", [
    (1, 4096, 4096, Cfg(128, 128, 8, 1)),
    (1, 4096, 4096, Cfg(64, 128, 12, 4)),
    (4, 14336, 4096, Cfg(128, 128, 10, 8)),
    (8, 4096, 6144, Cfg(256, 128, 6, 1)),
    (16, 4096, 28672, Cfg(128, 256, 6, 1)),
    (32, 14336, 4096, Cfg(64, 256, 4, 7)),
    (64, 4096, 128256, Cfg(64, 128, 6, 1)),
    (64, 4096, 4096, Cfg(256, 128, 4, 2)),
])
def test_skinny_fp8_lowers_for_cuda_configs(M, K, N, cfg):
    assert sf._valid(M, K, N, cfg)
    assert "mosaic_gpu" in lower(M, K, N, cfg).as_text()[:20000]


def test_skinny_fp8_smem_model_matches_lowering():
    """smem_bytes() is what `_valid` budgets with: an over-budget ring fails at lowering with
    the size our model predicts (within 2 KB of barriers / alignment)."""
    cfg = Cfg(256, 128, 20, 1)
    sf_valid = sf._valid
    try:  # bypass the guard to see the lowering's own check
        sf._valid = lambda *a: True
        with pytest.raises(Exception, match="shared memory") as e:
            lower(8, 4096, 4096, cfg)
    finally:
        sf._valid = sf_valid
    got = int(str(e.value).split("smem_bytes=")[1].split()[0])
    assert abs(got - cfg.smem_bytes(8, out_itemsize=2)) < 2048, (got, cfg.smem_bytes(8, 2))


# ------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16, 64])
@pytest.mark.parametrize("name", ["qkv", "o", "gate_up", "down", "lm_head"])
def test_skinny_fp8_gpu_llama(name, M):
    K, N = LLAMA8B[name]
    xq, xs, wq, ws = operands(M, K, N, key=M)
    y = jax.block_until_ready(sf.skinny_fp8_matmul(xq, xs, wq, ws))
    ref = sf.skinny_fp8_ref(xq, xs, wq, ws)
    assert y.shape == (M, N) and rel(y, ref) < 1e-2  # fp8 MMA accumulation is not plain f32


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [Cfg(128, 128, 8, 1), Cfg(64, 128, 12, 2), Cfg(128, 256, 6, 4),
                                 Cfg(256, 128, 4, 8)])
def test_skinny_fp8_gpu_configs(cfg):
    M, K, N = 8, 4096, 4096
    xq, xs, wq, ws = operands(M, K, N, key=3)
    y = sf.skinny_fp8_matmul(xq, xs, wq, ws, config=cfg)
    assert rel(y, sf.skinny_fp8_ref(xq, xs, wq, ws)) < 1e-2
