"""Weight quantization (imp_jax/quant.py): error bounds, the quantized matmuls, the model end to
end on a tiny random config, the policy, checkpoints. Random weights, never zeros."""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax import quant
from imp_jax.config import ModelConfig
from imp_jax.quant import (FP8_MAX, MODES, QuantArray, QuantPolicy, abstract_from_meta,
                           abstract_quantized, cast_unquantized, quant_meta, quantize,
                           quantize_activations, quantize_params)
from imp_jax.runner import ModelRunner, StepSeq
from imp_jax.spec import init_params, param_specs

TINY = ModelConfig("llama", 256, 64, 128, 3, 4, 2, 16, tie_word_embeddings=True)
TINY_UNTIED = ModelConfig("qwen2", 256, 64, 128, 3, 4, 2, 16, qkv_bias=True)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rand(key, shape, scale=1.0):
    # heavy-ish tails and per-channel magnitudes that differ, like trained weights
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    w = jax.random.t(k1, 5.0, shape) * scale
    return w * jnp.exp(jax.random.normal(k2, (1,) * (len(shape) - 1) + shape[-1:]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,contract", [((96, 40), (0,)), ((4, 16, 48), (0, 1)),
                                            ((64, 3, 8), (0,))])
def test_quantize_error_bounds(mode, shape, contract):
    w = rand(1, shape, 0.05)
    qa = quantize(w, mode, contract)
    assert qa.shape == w.shape
    # codes K-major: the output dims first, the contracted ones last
    axes = quant.stored_axes(len(shape), contract)
    assert qa.q.shape == tuple(shape[d] for d in axes)
    codes = quant._quantize_with(jnp.asarray(w, jnp.float32), qa.scale, mode)  # weight layout
    np.testing.assert_array_equal(np.asarray(qa.q, np.float32),
                                  np.transpose(np.asarray(codes, np.float32), axes))
    np.testing.assert_array_equal(np.asarray(qa.codes(), np.float32) * np.asarray(qa.scale),
                                  np.asarray(qa.dequantize(), np.float32))
    assert qa.q.dtype == (jnp.int8 if mode == "int8" else jnp.float8_e4m3fn)
    assert qa.scale.dtype == jnp.float32
    assert qa.scale.shape == tuple(1 if d in contract else n for d, n in enumerate(shape))
    w32 = np.asarray(w, np.float64)
    err = np.abs(np.asarray(qa.dequantize(), np.float64) - w32)
    scale = np.asarray(qa.scale, np.float64)
    if mode == "int8":
        bound = 0.5 * scale * (1 + 1e-5)  # round to nearest step of `scale`
    else:  # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative; subnormal step 2^-9 * scale
        bound = np.maximum(2.0 ** -4 * np.abs(w32), 2.0 ** -10 * scale) * (1 + 1e-5)
    assert np.all(err <= bound), float((err / bound).max())
    # the largest magnitude of every output channel is represented exactly (scale = amax / qmax)
    amax = np.abs(w32).max(axis=contract, keepdims=True)
    deq_amax = np.abs(np.asarray(qa.dequantize(), np.float64)).max(axis=contract, keepdims=True)
    np.testing.assert_allclose(deq_amax, amax, rtol=1e-6)


def test_activation_quantization_is_per_token():
    x = rand(2, (5, 7, 32)) * jnp.array([1e-3, 1.0, 10.0, 300.0, 1e4])[:, None, None]
    xq, s = quantize_activations(x, 1)
    assert xq.dtype == jnp.float8_e4m3fn and s.shape == (5, 7)
    np.testing.assert_allclose(np.abs(np.asarray(xq, np.float32)).max(-1), FP8_MAX)
    back = np.asarray(xq, np.float32) * np.asarray(s)[..., None]
    assert rel(back, x) < 0.04


# relative error of quantized_dot vs the float matmul, by mode (measured ~0.03 / 0.025 / 0.004)
DOT_TOL = {"fp8": 0.06, "fp8-weight-only": 0.045, "int8": 0.01}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_dot_matches_float(mode, dtype):
    from imp_jax.models.llama import dense

    x = rand(3, (2, 9, 64)).astype(dtype)
    w = rand(4, (64, 4, 16), 0.1)  # q-projection layout: [embed, heads, head_dim]
    qa = quantize(w, mode, (0,))
    ref = dense(x.astype(jnp.float32), w)
    y = dense(x, qa)  # through the model's entry point
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel(y, ref) < DOT_TOL[mode] + (0.01 if dtype == jnp.bfloat16 else 0)
    # o-projection layout: two contracted dims
    xo = rand(5, (9, 4, 16)).astype(dtype)
    wo = rand(6, (4, 16, 64), 0.1)
    yo = dense(xo, quantize(wo, mode, (0, 1)), dims=2)
    assert yo.shape == (9, 64)
    assert rel(yo, dense(xo.astype(jnp.float32), wo, dims=2)) < DOT_TOL[mode] + 0.01
    # jit: QuantArray is a pytree, mode a static field
    yj = jax.jit(lambda x, w: w.quantized_dot(x, 1))(x, qa)
    np.testing.assert_allclose(np.asarray(yj, np.float32), np.asarray(y, np.float32),
                               rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_embedding_take_and_tied_head(mode):
    table = rand(7, (256, 64), 0.5)
    qa = quantize(table, mode, (1,))  # per-row scales
    assert qa.scale.shape == (256, 1)
    ids = jnp.array([0, 5, 255, 5, 17])
    assert rel(qa.quantized_take(ids), table[ids]) < DOT_TOL["fp8-weight-only"]
    x = rand(8, (6, 64))
    ref = x @ table.T
    assert rel(qa.quantized_dot_t(x), ref) < DOT_TOL[mode] + 0.01


def test_bad_mode_names_value_and_allowed():
    w = rand(9, (8, 8))
    with pytest.raises(ValueError, match=r"'fp4'.*fp8, fp8-weight-only, int8"):
        quantize(w, "fp4")
    with pytest.raises(ValueError, match="'nf4'"):
        quantize_params(init_params(TINY, jax.random.PRNGKey(0)), TINY, "nf4")


def kinds(params, cfg):
    """'/'-joined path -> 'Q' for a quantized weight, 'F' otherwise (one entry per spec leaf)."""
    from imp_jax.spec import map_specs

    flat = {}

    def one(path, _):
        node = params
        for k in path:
            node = node[k]
        flat["/".join(path)] = "Q" if isinstance(node, QuantArray) else "F"

    map_specs(one, param_specs(cfg))
    return flat


def test_policy_selects_layers():
    p = init_params(TINY_UNTIED, jax.random.PRNGKey(0))
    k = kinds(quantize_params(p, TINY_UNTIED, "int8"), TINY_UNTIED)  # default: keep first + last
    assert k["layers_0/attn/q/kernel"] == "F" and k["layers_2/mlp/down/kernel"] == "F"
    assert k["layers_1/attn/q/kernel"] == "Q"
    k = kinds(quantize_params(p, TINY_UNTIED, "int8", QuantPolicy()), TINY_UNTIED)
    assert k["embed/embedding"] == "F" and k["lm_head/kernel"] == "F"
    assert all(v == "F" for n, v in k.items() if not n.endswith("kernel"))  # norms, biases
    assert all(v == "Q" for n, v in k.items() if n.startswith("layers_") and n.endswith("kernel"))

    pol = QuantPolicy(keep_first=1, keep_last=1, keep=("layers_*/mlp/down/kernel",),
                      quantize_lm_head=True, quantize_embedding=True)
    qp = quantize_params(p, TINY_UNTIED, "fp8", pol)
    k = kinds(qp, TINY_UNTIED)
    assert k["embed/embedding"] == "Q" and k["lm_head/kernel"] == "Q"
    for n, v in k.items():
        if not n.startswith("layers_") or not n.endswith("kernel"):
            continue
        keep = n.startswith(("layers_0/", "layers_2/")) or n.endswith("mlp/down/kernel")
        assert v == ("F" if keep else "Q"), n
    # kept leaves are the very same arrays
    assert qp["layers_0"]["attn"]["q"]["kernel"] is p["layers_0"]["attn"]["q"]["kernel"]
    assert qp["layers_1"]["attn"]["q"]["bias"] is p["layers_1"]["attn"]["q"]["bias"]
    # the abstract tree (orbax restore target) has the same structure, shapes and dtypes
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shapes(abstract_quantized(TINY_UNTIED, jnp.float32, "fp8", pol)) == shapes(qp)


def run_logits(cfg, params, ids, dtype=jnp.float32):
    r = ModelRunner(cfg, params, num_pages=8, page_size=16, max_model_len=64, dtype=dtype)
    return np.asarray(r.step([StepSeq(ids, 0, [1, 2], all_logits=True)]).logits)[:len(ids)]


# logits relative error on the tiny random model (measured ~0.07 / 0.05 / 0.012, f32 activations)
MODEL_TOL = {"fp8": 0.12, "fp8-weight-only": 0.09, "int8": 0.025}


@pytest.mark.parametrize("cfg", [TINY, TINY_UNTIED], ids=["tied", "untied_bias"])
def test_quantized_model_close_to_float(cfg):
    p = init_params(cfg, jax.random.PRNGKey(1))
    ids = list(range(3, 30))
    ref = run_logits(cfg, p, ids)  # through ModelRunner: jit + Transformer.apply
    for mode in MODES:
        pol = QuantPolicy(quantize_embedding=True, quantize_lm_head=True)
        got = run_logits(cfg, quantize_params(p, cfg, mode, pol), ids)
        assert np.all(np.isfinite(got))
        assert rel(got, ref) < MODEL_TOL[mode], mode
    # bf16 serving: unquantized leaves cast, activations bf16
    qp = cast_unquantized(quantize_params(p, cfg, "fp8"), jnp.bfloat16)
    assert qp["final_norm"]["scale"].dtype == jnp.bfloat16
    assert rel(run_logits(cfg, qp, ids, jnp.bfloat16), ref) < MODEL_TOL["fp8"] + 0.03


def test_transformer_apply_direct():
    """Flax's param shape check accepts a QuantArray (q is its first leaf)."""
    from imp_jax.cache import AttentionMetadata, KVCache
    from imp_jax.models.llama import Transformer

    p = quantize_params(init_params(TINY, jax.random.PRNGKey(2)), TINY, "fp8")
    T = 8
    cache = KVCache.create(TINY, 4, 16, jnp.float32)
    meta = AttentionMetadata(jnp.arange(16, 16 + T, dtype=jnp.int32), jnp.array([[1]], jnp.int32),
                             jnp.array([T], jnp.int32), jnp.array([0, T], jnp.int32),
                             jnp.arange(T, dtype=jnp.int32), T)
    logits, _ = Transformer(TINY).apply({"params": p}, jnp.arange(T, dtype=jnp.int32),
                                        jnp.arange(T, dtype=jnp.int32), cache, meta)
    assert logits.shape == (T, TINY.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    pol = QuantPolicy(quantize_embedding=True)
    p = init_params(TINY, jax.random.PRNGKey(3))
    qp = quantize_params(p, TINY, "fp8", pol)
    path = os.path.join(tmp_path, "params")
    with ocp.StandardCheckpointer() as ck:
        ck.save(path, qp)
    with ocp.StandardCheckpointer() as ck:
        back = ck.restore(path, abstract_quantized(TINY, jnp.float32, "fp8", pol))
    assert jax.tree.structure(back) == jax.tree.structure(qp)
    # the recorded metadata rebuilds the same target (what orbax_ckpt.load needs)
    meta = json.loads(json.dumps(quant_meta(qp)))
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shapes(abstract_from_meta(TINY, jnp.float32, meta)) == shapes(qp)
    assert quant_meta(p) is None
    # a checkpoint saved before the codes were stored K-major records no layout: refused by name
    old = {k: v for k, v in meta.items() if k != "layout"}
    with pytest.raises(ValueError, match=r"layout \[in, out\] \(none recorded\).*'k-major'.*"
                                         r"imp-jax convert SOURCE OUT --quantization fp8"):
        abstract_from_meta(TINY, jnp.float32, old)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(qp)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("M", [1, 5, 16, 33])
def test_skinny_gemm_interpret_matches_reference(mode, M):
    from pallas_kernels.skinny_gemm import choose_config, skinny_gemm, skinny_gemm_ref

    K, N = 512, 192
    x = rand(10 + M, (M, K)).astype(jnp.bfloat16)
    qa = quantize(rand(11, (K, N), 0.05), mode, (0,))
    # small tiles and a K split so the interpreted grid has several programs and partials
    cfg = choose_config(M, K, N, block_n=64, block_k=64, target_programs=12)
    assert cfg.splits > 1
    y = skinny_gemm(x, qa.q, qa.scale, config=cfg, interpret=True, w_layout="nk")
    ref = skinny_gemm_ref(x, qa.q, qa.scale, w_layout="nk")
    assert y.shape == (M, N) and y.dtype == jnp.bfloat16
    assert rel(y, ref) < 1e-2  # same math, f32 accumulation order differs; output bf16
    # and the reference is the QuantArray weight-only matmul
    wo = QuantArray(qa.q, qa.scale, "fp8-weight-only" if mode == "fp8" else "int8", (0,))
    assert rel(ref, wo.quantized_dot(x, 1)) < 1e-2


# ------------------------------------------------------------------------------- scale choice


@pytest.mark.parametrize("mode", MODES)
def test_mse_scales_never_worse_per_channel(mode):
    w = rand(12, (128, 48), 0.05)
    w32 = np.asarray(w, np.float64)
    err = {m: ((np.asarray(quantize(w, mode, (0,), m).dequantize(), np.float64) - w32) ** 2)
           .sum(0) for m in ("absmax", "mse")}
    assert np.all(err["mse"] <= err["absmax"] * (1 + 1e-6))  # absmax is one of the candidates
    if mode != "int8":  # the search finds better alignments of the e4m3 grid (int8: clipping
        assert err["mse"].sum() < 0.97 * err["absmax"].sum()  # rarely pays on 128 values)
    qa = quantize(w, mode, (0,), "mse")
    assert qa.scale.shape == (1, 48) and np.all(np.isfinite(np.asarray(qa.q, np.float32)))


def test_mse_scales_find_the_grid_absmax_misses():
    """A channel whose values lie on the e4m3 grid with its max at 256 (not 448): absmax rescales
    256 -> 448 and re-rounds, the search finds the multiplier 448 / 256 = 1.75 and is exact."""
    grid = np.unique(np.abs(np.asarray(jnp.arange(256, dtype=jnp.uint8).view(jnp.float8_e4m3fn),
                                       np.float32)))
    grid = grid[np.isfinite(grid) & (grid <= 256) & (grid >= 1)]
    vals = np.random.default_rng(0).choice(grid, (64, 3)) * np.array([1e-3, 0.5, 7.0])
    vals[0] = 256 * np.array([1e-3, 0.5, 7.0])  # every channel's max is its 256
    vals *= np.random.default_rng(1).choice([-1, 1], vals.shape)
    w = jnp.asarray(vals, jnp.float32)
    exact = quantize(w, "fp8", (0,), "mse").dequantize()
    np.testing.assert_allclose(np.asarray(exact), vals, rtol=1e-6)
    assert rel(quantize(w, "fp8", (0,), "absmax").dequantize(), vals) > 1e-3
    with pytest.raises(ValueError, match="'l2'.*absmax, mse"):
        quantize(w, "fp8", (0,), "l2")


def test_policy_scales_reach_quantize_params():
    p = init_params(TINY, jax.random.PRNGKey(4))
    w = p["layers_1"]["mlp"]["down"]["kernel"]
    for scales in ("absmax", "mse"):
        qp = quantize_params(p, TINY, "fp8", QuantPolicy(scales=scales))
        np.testing.assert_array_equal(np.asarray(qp["layers_1"]["mlp"]["down"]["kernel"].scale),
                                      np.asarray(quantize(w, "fp8", (0,), scales).scale))


def test_block_fraction():
    from checkpoints.presets import SHAPES

    assert QuantPolicy().block_fraction(TINY) == 1.0
    assert QuantPolicy(keep_first=1, keep_last=1).block_fraction(TINY) == pytest.approx(1 / 3)
    # per block (embed 64, mlp 128, 4 heads / 2 kv heads of 16): q, o 64*64; k, v 64*32;
    # gate, up, down 64*128
    per = {"q": 4096, "k": 2048, "v": 2048, "o": 4096, "gate": 8192, "up": 8192, "down": 8192}
    pol = QuantPolicy(keep=("layers_*/attn/k/kernel", "layers_*/attn/v/kernel"))
    assert pol.block_fraction(TINY) == pytest.approx(1 - 4096 / sum(per.values()))
    # Llama-3-8B: one block of 32 kept = 1/32 of the block bytes
    assert QuantPolicy(keep_last=1).block_fraction(SHAPES["llama3-8b"]) == pytest.approx(31 / 32)


def test_random_shapes_are_generated_already_quantized(monkeypatch):
    # Init + quantize leaf by leaf (no full-precision copy alive at once) gives exactly what
    # quantizing the plain random weights gives, and an LLM runs on it. (The tiny shape has 2
    # blocks, which the default policy's keep-first/last would both keep.)
    import imp_jax
    from imp_jax import loaders
    from imp_jax.loaders import load_model

    policy = QuantPolicy(keep_first=0, keep_last=0)
    fused = load_model("random:tiny", "bfloat16", random_quantization="fp8",
                       random_policy=policy)
    plain = load_model("random:tiny", "bfloat16")
    want = quantize_params(plain.params, plain.cfg, "fp8", policy)
    assert jax.tree.structure(fused.params) == jax.tree.structure(want)
    assert sum(isinstance(x, QuantArray) for x in jax.tree.leaves(
        fused.params, is_leaf=lambda x: isinstance(x, QuantArray))) == 2 * 7
    assert any(isinstance(x, QuantArray) for x in jax.tree.leaves(
        fused.params, is_leaf=lambda x: isinstance(x, QuantArray)))
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # the LLM's policy reaches the generator (else quantize_loaded would make up the difference
    # with the same values, and the full-precision blocks would have been alive meanwhile)
    seen = []
    real = loaders.random_params
    def spy(*args, **kwargs):
        seen.append(inspect.signature(real).bind(*args, **kwargs).arguments["quant_policy"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loaders, "random_params", spy)
    llm = imp_jax.LLM("random:tiny", dtype="bfloat16", quantization="fp8", max_model_len=32,
                      quant_policy="keep_first=0,keep_last=0")
    assert seen == [policy]
    assert jax.tree.structure(llm.model.params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(llm.model.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    out = llm.generate([[5, 6, 7]], max_tokens=4, ignore_eos=True, temperature=0,
                       use_tqdm=False)
    assert len(out[0].token_ids) == 4


def test_parse_policy():
    from imp_jax.quant import DEFAULT_POLICY, parse_policy

    assert parse_policy(None) is None and parse_policy(DEFAULT_POLICY) is DEFAULT_POLICY
    assert parse_policy("default") == DEFAULT_POLICY
    assert parse_policy(" all ") == QuantPolicy(quantize_lm_head=True)
    got = parse_policy("keep_first=2, lm_head=1,embedding=1,scales=mse,"
                       "keep=layers_*/attn/k/kernel;layers_*/attn/v/kernel")
    assert got == QuantPolicy(keep_first=2, keep_last=DEFAULT_POLICY.keep_last,
                              keep=("layers_*/attn/k/kernel", "layers_*/attn/v/kernel"),
                              quantize_embedding=True, quantize_lm_head=True, scales="mse")
    p = init_params(TINY_UNTIED, jax.random.PRNGKey(0))  # "all": every block and the lm_head
    k = kinds(quantize_params(p, TINY_UNTIED, "int8", parse_policy("all")), TINY_UNTIED)
    assert k["lm_head/kernel"] == "Q" and k["layers_0/attn/q/kernel"] == "Q"
    assert k["layers_2/mlp/down/kernel"] == "Q" and k["embed/embedding"] == "F"
    assert parse_policy("all,lm_head=0") == QuantPolicy()  # a preset, then overrides
    assert parse_policy("default,keep_first=2").keep_last == DEFAULT_POLICY.keep_last
    for bad, match in (("bogus", "bad quantization policy item 'bogus'.*default, all.*keep_first"),
                       ("keep_first=1,all", "bad quantization policy item 'all'.*first"),
                       ("keep_first=-1", "keep_first must be an integer >= 0, got '-1'"),
                       ("keep_first=\u00b2", "keep_first must be an integer >= 0"),
                       ("lm_head=1,lm_head=0", "sets lm_head twice"),
                       ("lm_head=yes", "lm_head must be 0 or 1, got 'yes'"),
                       ("scales=max", "scales must be one of absmax, mse, got 'max'"),
                       ("keep_last", "bad quantization policy item 'keep_last'"),
                       (" , ", "empty quantization policy")):
        with pytest.raises(ValueError, match=match):
            parse_policy(bad)
    with pytest.raises(TypeError, match="QuantPolicy or a string"):
        parse_policy(3)


def test_llm_quant_policy_errors():
    import imp_jax

    with pytest.raises(ValueError, match="quant_policy='all' needs quantization="):
        imp_jax.LLM("random:tiny", quant_policy="all")
    with pytest.raises(ValueError, match="lm_head must be 0 or 1"):
        imp_jax.LLM("random:tiny", quantization="int8", quant_policy="lm_head=2")
    for pat in ("layers_*/attn/kk", "layers_*/attn_norm*"):  # no weight / not a quantizable one
        with pytest.raises(ValueError, match=f"keep pattern '{pat.replace('*', '.')}' matches no "
                                             "quantizable weight .*such as 'layers_0/"):
            imp_jax.LLM("random:tiny", quantization="int8", quant_policy=f"keep={pat}")
    # checked from the config, before the weights: a 70B shape would not even fit this machine
    with pytest.raises(ValueError, match="keep pattern 'lm_head/kernel2' matches no"):
        imp_jax.LLM("random:llama3-70b", quantization="int8", quant_policy="keep=lm_head/kernel2")
    src = os.path.join(os.path.dirname(__file__), "data", "tiny", "llama3_ct_fp8")
    with pytest.raises(ValueError, match="already FP8.*policy cannot apply"):
        imp_jax.LLM(src, quantization="fp8", quant_policy="all", max_model_len=32)


def _block_scales_script():
    """benchmarks/quant_block_scales.py as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quant_block_scales.py")
    spec = importlib.util.spec_from_file_location("quant_block_scales", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_term_activation_simulation():
    """benchmarks/quant_block_scales.py --act-split: inside `split_activations`, the dots it
    names take two-term values (far closer to x than one e4m3 term), the others the shipped
    e4m3 codes; on exit the shipped quantizer is back."""
    from imp_jax import quant

    mod = _block_scales_script()
    shipped = quant._fp8_activations
    x = jax.random.normal(jax.random.key(3), (8, 64), jnp.float32).astype(jnp.bfloat16)
    xq, s = shipped(x, 1)
    err = lambda a: float(jnp.linalg.norm(a - x.astype(jnp.float32)))  # noqa: E731
    one = err(xq.astype(jnp.float32) * s[:, None])
    with mod.split_activations("all", 64):
        two, ones = quant._fp8_activations(x, 1)
        assert err(two) < one / 8 and bool(jnp.all(ones == 1))
    with mod.split_activations("mlp", 64):   # K = 64 is the hidden size here: shipped
        kept, _ = quant._fp8_activations(x, 1)
        assert kept.dtype == quant.FP8
    assert quant._fp8_activations is shipped


def test_block_scale_simulation_with_one_group_is_per_channel_fp8(monkeypatch):
    """benchmarks/quant_block_scales.py: with one group spanning the contracted dims, its
    simulated weights equal dequantizing the real per-channel fp8 QuantArrays; smaller groups
    fit the weights at least as well (each group's scale is <= the channel's)."""
    from imp_jax import quant
    from imp_jax.loaders import load_model
    from imp_jax.spec import get_path, map_specs, param_specs

    monkeypatch.setattr(quant, "DEFAULT_POLICY", QuantPolicy(keep_first=0, keep_last=0))
    mod = _block_scales_script()
    m = load_model("random:tiny", "bfloat16")
    policy = quant.DEFAULT_POLICY
    whole = mod.block_fp8(m.params, m.cfg, 10**9, policy)
    grouped = mod.block_fp8(m.params, m.cfg, 16, policy)
    real = quantize_params(m.params, m.cfg, "fp8-weight-only", policy)
    checked = []

    def one(p, s):
        q = get_path(real, p)
        if not isinstance(q, QuantArray):
            return
        deq = q.dequantize(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(get_path(whole, p), np.float32),
                                      np.asarray(deq, np.float32))
        w = np.asarray(get_path(m.params, p), np.float32)
        err = lambda a: float(np.sum((np.asarray(a, np.float32) - w) ** 2))  # noqa: E731
        assert err(get_path(grouped, p)) <= err(deq) * 1.01
        checked.append("/".join(p))

    map_specs(one, param_specs(m.cfg))
    assert len(checked) >= 7


def test_grouped_activation_simulation_with_one_group_is_per_token():
    """benchmarks/quant_block_scales.py --act-groups: with one group spanning the contracted
    dims (1 or 2 of them) the simulated activations equal the shipped per-token e4m3
    quantization, dequantized; groups of 16 fit them at least as well; the shipped function
    is back in place afterwards."""
    import importlib.util

    from imp_jax import quant

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quant_block_scales.py")
    spec = importlib.util.spec_from_file_location("quant_block_scales", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = quant._fp8_activations
    x = jax.random.normal(jax.random.key(3), (3, 4, 64), jnp.float32) * jnp.linspace(0.1, 9, 64)
    for dims in (1, 2):
        xq, s = quant.quantize_activations(x, dims)
        per_token = xq.astype(jnp.float32) * s.reshape(s.shape + (1,) * dims)
        with mod.grouped_activations(int(np.prod(x.shape[-dims:]))):   # one group of K
            whole, ones = quant._fp8_activations(x, dims)
        with mod.grouped_activations(16):
            fine, _ = quant._fp8_activations(x, dims)
        assert ones.shape == s.shape and bool(jnp.all(ones == 1.0))
        np.testing.assert_allclose(np.asarray(whole), np.asarray(per_token), rtol=1e-6)
        assert float(jnp.sum((fine - x) ** 2)) <= float(jnp.sum((whole - x) ** 2))
        assert float(jnp.max(jnp.abs(fine - whole))) > 0      # the groups did change something
    assert quant._fp8_activations is shipped
