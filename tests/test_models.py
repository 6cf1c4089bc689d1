"""Model parity against HF transformers (fixtures written by tests/reference/make_reference.py)
and paged-cache equivalences."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imp_jax.loaders.hf_dir import load_hf_dir
from imp_jax.runner import ModelRunner, StepSeq

DATA = os.path.join(os.path.dirname(__file__), "data")
FAMILIES = ["llama2", "llama3", "llama3_legacy", "mistral", "qwen2", "qwen3", "smollm2"]
PAGE = 4  # small pages so the short fixtures cross many page boundaries


def make_runner(name, num_pages=64):
    cfg, params = load_hf_dir(os.path.join(DATA, "tiny", name), jnp.float32)
    return ModelRunner(cfg, params, num_pages=num_pages, page_size=PAGE, max_model_len=128)


def pages_for(first, n_tokens):
    return list(range(first, first + -(-n_tokens // PAGE)))


def greedy(runner, ids, n, first_page=1):
    """Prefill then n-1 single-token decode steps through the paged cache."""
    from imp_jax.sampling import SamplingParams, SamplingTensors

    ids = list(ids)
    pages = pages_for(first_page, len(ids) + n)
    st = SamplingTensors.from_params([SamplingParams(temperature=0)], [0], [0])
    out = []
    chunk, start = ids, 0
    for _ in range(n):
        res = runner.step([StepSeq(chunk, start, pages)], st)
        tok = int(np.asarray(res.sample.tokens)[0])
        out.append(tok)
        start += len(chunk)
        chunk = [tok]
    return out


@pytest.mark.parametrize("name", FAMILIES + ["llama3_fp8", "llama3_ct_fp8"])
def test_logits_and_greedy_match_transformers(name):
    # llama3_fp8: llama3 as a fine-grained FP8 checkpoint (e4m3 weights + weight_scale_inv per
    # [16, 32] block), against transformers loading the same files (it dequantizes on CPU).
    # llama3_ct_fp8: llama3 written by compressed-tensors (weight_scale per tensor for the
    # attention, per channel for the MLP), against transformers loading it with dequantize=True
    ref = np.load(os.path.join(DATA, "reference", f"{name.replace('_legacy', '')}.npz"))
    runner = make_runner(name)
    check_against(runner, ref)


def check_against(runner, ref):
    for row in range(ref["input_ids"].shape[0]):
        ids = ref["input_ids"][row].tolist()
        out = runner.step([StepSeq(ids, 0, pages_for(1, len(ids)), all_logits=True)])
        logits = np.asarray(out.logits)[:len(ids)]
        np.testing.assert_allclose(logits, ref["logits"][row], atol=2e-4, rtol=1e-4)
        assert greedy(runner, ids, ref["greedy"].shape[1]) == ref["greedy"][row].tolist()


def test_compressed_tensors_fp8_runs_its_w8a8_scheme_exactly():
    """LLM(quantization="fp8") on a compressed-tensors FP8 checkpoint quantizes exactly the
    weights the checkpoint did, back to its own e4m3 codes and scales, and its W8A8 forward
    (activations per token on the fly) matches transformers running the checkpoint as shipped
    (compressed-tensors' forward quantizes each linear's input per token too)."""
    from imp_jax.llm import LLM
    from imp_jax.loaders.hf_dir import _header, _read_raw
    from imp_jax.quant import QuantArray

    path = os.path.join(DATA, "tiny", "llama3_ct_fp8")
    llm = LLM(path, quantization="fp8", dtype=jnp.float32, num_pages=64, page_size=PAGE,
              max_model_len=128)
    from safetensors import safe_open

    params, file = llm.runner.params, os.path.join(path, "model.safetensors")
    header, scales = _header(file), safe_open(file, framework="numpy")
    quantized = 0
    for i in range(llm.runner.cfg.num_layers):
        for module, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
            for n in names:
                w = params[f"layers_{i}"][module][n]["kernel"]
                hf = f"model.layers.{i}.{'self_attn' if module == 'attn' else 'mlp'}.{n}_proj"
                codes = _read_raw(file, header, hf + ".weight").astype(np.float32)  # [out, in]
                scale = scales.get_tensor(hf + ".weight_scale").reshape(-1)
                assert isinstance(w, QuantArray) and w.mode == "fp8"
                # K-major codes are HF's own [out, in] layout
                ours = np.asarray(w.q, np.float32).reshape(codes.shape[0], -1)
                np.testing.assert_array_equal(ours, codes)
                np.testing.assert_array_equal(
                    np.asarray(w.scale).reshape(-1),
                    np.broadcast_to(scale, (codes.shape[0],)))  # per tensor: one for all
                quantized += 1
    assert quantized == 2 * 7
    assert not isinstance(params["lm_head"]["kernel"], QuantArray)  # the checkpoint's ignore
    # the quantized tree replaces the loaded one: no full-precision copy stays resident, and
    # `imp-jax bench` counts the 8-bit bytes a step reads
    assert llm.model.params is params
    from imp_jax.bench import step_weight_bytes
    f32 = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(
        load_hf_dir(path, jnp.float32)[1]))
    assert step_weight_bytes(llm) < f32 - 14 * 0.75 * 64 * 64  # 14 weights at 1 byte, not 4
    check_against(llm.runner, np.load(os.path.join(DATA, "reference", "llama3_ct_fp8_w8a8.npz")))


def test_block_scaled_fp8_checkpoint_quantizes_every_fp8_weight():
    """The fine-grained checkpoint's block scales have no per-channel equivalent: with
    quantization="fp8" each of its FP8 weights (and only those) is quantized, absmax per
    channel, none left in full precision."""
    from imp_jax.loaders import load_model
    from imp_jax.quant import QuantArray, quantize_loaded

    loaded = load_model(os.path.join(DATA, "tiny", "llama3_fp8"), jnp.float32)
    assert len(loaded.fp8_scales) == 2 * 7 and all(v is None for v in loaded.fp8_scales.values())
    params = quantize_loaded(loaded.params, loaded.cfg, "fp8", loaded.fp8_scales)
    is_q = lambda x: isinstance(x, QuantArray)  # noqa: E731
    quantized = {"/".join(str(k.key) for k in path)
                 for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_q)
                 if is_q(leaf)}
    assert quantized == set(loaded.fp8_scales)


def test_prefill_plus_decode_equals_full_forward():
    runner = make_runner("qwen3")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, runner.cfg.vocab_size, 23).tolist()  # odd length, crosses pages
    full = np.asarray(runner.step([StepSeq(ids, 0, pages_for(1, 23), all_logits=True)]).logits)
    pages = pages_for(10, 23)
    split = 9  # first chunk ends mid-page
    runner.step([StepSeq(ids[:split], 0, pages)])
    for i in range(split, 23):
        out = runner.step([StepSeq([ids[i]], i, pages)], None)
        # decode logits come back for the one token: compare with the full forward's row i
        got = np.asarray(runner.step([StepSeq([ids[i]], i, pages, all_logits=True)]).logits)[0]
        np.testing.assert_allclose(got, full[i], atol=1e-4, rtol=1e-4)
        del out


def test_sequences_in_one_batch_do_not_affect_each_other():
    runner = make_runner("llama3")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 512, 13).tolist()
    b = rng.integers(0, 512, 4).tolist()
    c = rng.integers(0, 512, 8).tolist()  # exactly two pages
    alone = [np.asarray(runner.step([StepSeq(x, 0, pages_for(1, len(x)), all_logits=True)])
                        .logits)[:len(x)] for x in (a, b, c)]
    seqs = [StepSeq(a, 0, pages_for(20, 13), all_logits=True),
            StepSeq(b, 0, pages_for(30, 4), all_logits=True),
            StepSeq(c, 0, pages_for(40, 8), all_logits=True)]
    res = runner.step(seqs)
    logits = np.asarray(res.logits)
    for x, off, ref in zip((a, b, c), res.token_offsets, alone):
        np.testing.assert_allclose(logits[off:off + len(x)], ref, atol=1e-4, rtol=1e-4)
    # a mixed step: one sequence decoding from its cache while another prefills
    nxt = int(np.argmax(alone[0][-1]))
    mixed = runner.step([StepSeq([nxt], 13, pages_for(20, 14), all_logits=True),
                         StepSeq(b, 0, pages_for(50, 4), all_logits=True)])
    full_a = np.asarray(runner.step([StepSeq(a + [nxt], 0, pages_for(60, 14), all_logits=True)])
                        .logits)
    np.testing.assert_allclose(np.asarray(mixed.logits)[0], full_a[13], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(mixed.logits)[1:5], alone[1], atol=1e-4, rtol=1e-4)


def test_long_generation_stops_compiling_after_warmup():
    runner = make_runner("smollm2")
    ids = list(range(5, 12))
    greedy(runner, ids, 40)  # warm-up: crosses every page-table bucket up to 47 tokens
    compiled = runner.num_compiles
    greedy(runner, list(range(30, 37)), 40, first_page=20)
    assert runner.num_compiles == compiled
    assert compiled <= 6  # prefill + a handful of page-table buckets, not one per length


def test_fp8_fixture_is_llama3_within_fp8_rounding():
    """A check of the fixture, not the loader: transformers' logits on it differ from llama3's
    beyond float noise (it is quantized) and only by e4m3's rounding (it is llama3)."""
    fp8, plain = (np.load(os.path.join(DATA, "reference", f"{n}.npz"))["logits"]
                  for n in ("llama3_fp8", "llama3"))
    diff = np.abs(fp8 - plain).max()
    assert 1e-3 < diff < 0.25 * np.abs(plain).max(), diff


def test_fp8_checkpoint_errors_name_the_tensor(tmp_path):
    import json
    import shutil

    from imp_jax.loaders.hf_dir import _header, _read_raw, dequantize_fp8

    src = os.path.join(DATA, "tiny", "llama3_fp8")
    file = os.path.join(src, "model.safetensors")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    # an index that lists every tensor of the real file but one weight's scale
    header = _header(file)
    name = "model.layers.0.self_attn.q_proj.weight"
    weight_map = {n: file for n in header
                  if not n.startswith("__") and n != name + "_scale_inv"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"{name} is float8_e4m3fn but {name}_scale_inv is "
                                         "missing"):
        load_hf_dir(str(tmp_path), jnp.float32)
    q = _read_raw(file, header, name)
    with pytest.raises(ValueError, match=r"q_proj.weight: weight \(64, 64\) with scale \(3, 2\) "
                                         r"is not a grid of whole blocks"):
        dequantize_fp8(q, np.ones((3, 2), np.float32), name)
    with pytest.raises(ValueError, match=r"is not a grid of blocks \(16, 32\)"):
        dequantize_fp8(q, np.ones((3, 2), np.float32), name, (16, 32))
    # a scalar scale is one block; E8M0 bytes are powers of two
    np.testing.assert_array_equal(dequantize_fp8(q, np.float32(0.5), name),
                                  q.astype(np.float32) * 0.5)
    np.testing.assert_array_equal(dequantize_fp8(q, np.full((4, 2), 126, np.uint8), name),
                                  q.astype(np.float32) * 0.5)


def test_fp8_blocks_that_do_not_divide_the_weight_are_partial_at_the_edge():
    """weight_block_size [128, 128] on a 192 x 64 weight: a 2 x 1 grid whose second row of
    blocks covers rows 128-191 (not 96 + 96 rows, which the grid alone would suggest)."""
    import ml_dtypes

    from imp_jax.loaders.hf_dir import dequantize_fp8

    q = np.random.default_rng(0).uniform(-2, 2, (192, 64)).astype(ml_dtypes.float8_e4m3fn)
    got = dequantize_fp8(q, np.array([[1.0], [2.0]], np.float32), "w", (128, 128))
    want = q.astype(np.float32) * np.where(np.arange(192) < 128, 1.0, 2.0)[:, None]
    np.testing.assert_array_equal(got, want)


def test_other_quantized_checkpoints_are_refused_by_method(tmp_path):
    import json
    import shutil

    src = os.path.join(DATA, "tiny", "llama3")
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported; supported: "
                                         "unquantized checkpoints, transformers' fine-grained "
                                         "FP8 .*; compressed-tensors FP8"):
        load_hf_dir(str(tmp_path), jnp.float32)


def test_quantization_configs_outside_the_supported_layouts_name_the_value(tmp_path):
    import json
    import shutil

    from imp_jax.loaders.hf_dir import fp8_scheme

    cfg = json.load(open(os.path.join(DATA, "tiny", "llama3_ct_fp8", "config.json")))
    quant = cfg["quantization_config"]
    assert fp8_scheme(quant, "x") == ("_scale", None)
    with pytest.raises(ValueError, match="sparsity_config 'sparse-24-bitmask' is not supported"):
        fp8_scheme({**quant, "sparsity_config": {"format": "sparse-24-bitmask"}}, "x")
    int4 = json.loads(json.dumps(quant))
    int4["config_groups"]["group_1"].update(format="pack-quantized")
    int4["config_groups"]["group_1"]["weights"].update(num_bits=4, type="int")
    with pytest.raises(ValueError, match=r"group 'group_1' \(format 'pack-quantized', weights "
                                         r"4-bit 'int', symmetric=True, strategy 'channel'\) is "
                                         r"not supported; supported: format 'float-quantized'"):
        fp8_scheme(int4, "x")
    blocks = json.loads(json.dumps(quant))
    for g in blocks["config_groups"].values():
        g["weights"].update(strategy="block", block_structure=[16, 32])
    assert fp8_scheme(blocks, "x") == ("_scale", (16, 32))  # dequantized per block
    for i, g in enumerate(blocks["config_groups"].values()):
        g["weights"].update(strategy="block", block_structure=[16, 16 * (i + 1)])
    with pytest.raises(ValueError, match=r"different block structures \[\(16, 16\), \(16, 32\)\]"):
        fp8_scheme(blocks, "x")
    # a weight whose scale is missing: named, with the layouts that are supported
    src = os.path.join(DATA, "tiny", "llama3_ct_fp8")
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    file = os.path.join(src, "model.safetensors")
    from imp_jax.loaders.hf_dir import _header

    name = "model.layers.1.mlp.down_proj.weight"
    weight_map = {n: file for n in _header(file) if not n.startswith("__")
                  and n != name + "_scale"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"{name} is float8_e4m3fn but {name}_scale is missing; "
                                         "supported FP8 layouts: transformers' fine-grained"):
        load_hf_dir(str(tmp_path), jnp.float32)
