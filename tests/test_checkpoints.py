"""Checkpoint formats end to end.

* GGUF files written here with `gguf.GGUFWriter` the way llama.cpp's convert_hf_to_gguf.py writes
  them (arch "llama", its metadata keys and tensor names, attn_q/attn_k rows permuted) from the
  tiny HF checkpoints: F32 logits equal the transformers fixtures (proves the un-permutation),
  quantized types load to exactly gguf's own dequantization in our layout, tied heads.
* Bad files fail with ValueError/FileNotFoundError naming the file (and tensor, and expectation).
* Sharded vs single-file HF dirs, orbax conversion (`imp-jax convert`), `imp-jax info`, and the
  real preset GGUF read by our fast header reader vs `gguf.GGUFReader`.

Everything written lives in pytest tmp dirs; nothing big is committed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, quants
from safetensors.numpy import load_file

from imp_jax.config import ModelConfig
from imp_jax.loaders import load_model
from imp_jax.loaders.gguf_file import load_gguf
from imp_jax.loaders.hf_dir import load_hf_dir
from imp_jax.loaders.weights import build_params
from imp_jax.runner import ModelRunner, StepSeq

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY = os.path.join(DATA, "tiny")
PAGE = 4
F32 = jnp.float32

# HF tensor names -> llama.cpp's (written independently of imp_jax.loaders.gguf_file's table).
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        return f"blk.{layer}.{_GGUF_LAYER[rest]}"
    return _GGUF_TOP[hf]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llamacpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llamacpp_permute via its index permutation (not the loader's formula)."""
    idx = llamacpp_permute(np.arange(w.shape[0]), n_head)  # permuted[i] = w[idx[i]]
    out = np.empty_like(w)
    out[idx] = w
    return out


def read_hf(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json and all tensors (float32 numpy, HF names) of a tiny checkpoint dir."""
    path = os.path.join(TINY, name)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    tensors = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, file)))
    return hf, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def tokenizer_meta(name: str) -> dict:
    """llama.cpp's gpt2-style tokenizer metadata for the tiny byte-level BPE tokenizer.json."""
    path = os.path.join(TINY, name)
    with open(os.path.join(path, "tokenizer.json")) as f:
        tj = json.load(f)
    vocab = dict(tj["model"]["vocab"])
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    control = {t["id"] for t in tj["added_tokens"] if t["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    return {"tokens": tokens, "types": [3 if i in control else 1 for i in range(len(tokens))],
            "merges": merges, "bos": vocab["<|endoftext|>"], "eos": vocab["<|im_end|>"]}


def write_gguf(path, hf: dict, tensors: dict, *, qtype=QT.F32, arch: str = "llama",
               tokenizer: dict | None = None, raw: dict | None = None) -> dict:
    """Write a llama.cpp-style GGUF. `tensors`: HF name -> float [out, in] (q/k get permuted, 2-D
    ones quantized to `qtype`, 1-D ones F32); `raw`: HF name -> (bytes [rows, row_bytes], type)
    written as is (already "permuted"). Returns GGUF name -> (type, written array)."""
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    rope = hf.get("rope_parameters") or {}
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", hf["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", hf["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", hf["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", hf["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv)
    w.add_float32(f"{arch}.rope.freq_base", float(hf.get("rope_theta", rope.get("rope_theta"))))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    w.add_uint32(f"{arch}.vocab_size", hf["vocab_size"])
    w.add_uint32(f"{arch}.rope.dimension_count", hf.get("head_dim") or hf["hidden_size"] // heads)
    if tokenizer is not None:
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt2")
        w.add_array("tokenizer.ggml.tokens", tokenizer["tokens"])
        w.add_array("tokenizer.ggml.token_type", tokenizer["types"])
        w.add_array("tokenizer.ggml.merges", tokenizer["merges"])
        w.add_uint32("tokenizer.ggml.bos_token_id", tokenizer["bos"])
        w.add_uint32("tokenizer.ggml.eos_token_id", tokenizer["eos"])
        w.add_bool("tokenizer.ggml.add_bos_token", False)
    written = {}
    for hf_name, x in tensors.items():
        x = np.asarray(x, np.float32)
        if hf_name.endswith("q_proj.weight"):
            x = llamacpp_permute(x, heads)
        elif hf_name.endswith("k_proj.weight"):
            x = llamacpp_permute(x, kv)
        t = qtype if x.ndim == 2 else QT.F32
        data = quants.quantize(x, t)
        w.add_tensor(gguf_name(hf_name), data, raw_dtype=None if t in (QT.F32, QT.F16) else t)
        written[gguf_name(hf_name)] = (t, data)
    for hf_name, (data, t) in (raw or {}).items():
        # uint8 data: GGUFWriter derives the shape from the bytes; other dtypes keep theirs
        w.add_tensor(gguf_name(hf_name), data, raw_dtype=t,
                     raw_shape=None if data.dtype == np.uint8 else data.shape)
        written[gguf_name(hf_name)] = (t, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def expected_params(cfg: ModelConfig, written: dict):
    """gguf's own dequantization of the written bytes, un-permuted, in our layout."""
    hf_of = {gguf_name(n): n for n in _all_hf_names(cfg)}
    tensors = {}
    for name, (t, data) in written.items():
        x = np.asarray(quants.dequantize(data, t), np.float32)
        if name.endswith("attn_q.weight"):
            x = llamacpp_unpermute(x, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            x = llamacpp_unpermute(x, cfg.num_kv_heads)
        tensors[hf_of[name]] = x
    return build_params(cfg, tensors.__getitem__, tensors.__contains__, "expected", F32)


def _all_hf_names(cfg: ModelConfig):
    names = list(_GGUF_TOP)
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{k}" for k in _GGUF_LAYER]
    return names


def assert_trees_equal(a, b):
    """Same tree, dtypes, shapes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def ref_logits(name: str):
    ref = np.load(os.path.join(DATA, "reference", f"{name}.npz"))
    return ref["input_ids"], ref["logits"]


def logits_of(cfg: ModelConfig, params, input_ids) -> np.ndarray:
    runner = ModelRunner(cfg, params, num_pages=64, page_size=PAGE, max_model_len=128)
    out = []
    for ids in input_ids.tolist():
        pages = list(range(1, 1 + -(-len(ids) // PAGE)))
        res = runner.step([StepSeq(ids, 0, pages, all_logits=True)])
        out.append(np.asarray(res.logits)[:len(ids)])
    return np.stack(out)


# ---------------------------------------------------------------------------- GGUF round trips
@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def llama2_f32(gguf_dir):
    """A valid F32 llama2 GGUF with tokenizer metadata (also the base of the bad-file tests)."""
    hf, tensors = read_hf("llama2")
    path = gguf_dir / "llama2-f32.gguf"
    write_gguf(path, hf, tensors, tokenizer=tokenizer_meta("llama2"))
    return path


@pytest.mark.parametrize("name", ["llama2", "smollm2", "mistral"])
def test_gguf_f32_matches_transformers(name, gguf_dir, llama2_f32):
    hf, tensors = read_hf(name)
    path = llama2_f32 if name == "llama2" else gguf_dir / f"{name}-f32.gguf"
    if name != "llama2":
        write_gguf(path, hf, tensors)
    cfg, params, meta = load_gguf(str(path), F32)
    assert meta["general.architecture"] == "llama"

    hf_cfg, hf_params = load_hf_dir(os.path.join(TINY, name), F32)
    # llama.cpp converts Mistral as "llama" and stores the epsilon as float32
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)
    assert cfg == dataclasses.replace(hf_cfg, family="llama", rms_norm_eps=cfg.rms_norm_eps)
    assert_trees_equal(params, hf_params)  # bit-identical: the un-permutation is exact

    input_ids, want = ref_logits(name)
    np.testing.assert_allclose(logits_of(cfg, params, input_ids), want, atol=1e-4, rtol=1e-4)


def test_gguf_tied_head_without_output_weight(gguf_dir):
    hf, tensors = read_hf("smollm2")
    assert "lm_head.weight" not in tensors
    path = gguf_dir / "smollm2-tied.gguf"
    written = write_gguf(path, hf, tensors)
    assert "output.weight" not in written and "token_embd.weight" in written
    cfg, params, _ = load_gguf(str(path), F32)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    input_ids, want = ref_logits("smollm2")
    np.testing.assert_allclose(logits_of(cfg, params, input_ids), want, atol=1e-4, rtol=1e-4)


def test_gguf_load_model_builds_tokenizer(llama2_f32):
    """load_model on a .gguf: params as load_gguf, tokenizer from the GGUF metadata encodes like
    the HF tokenizer.json it was written from."""
    from imp_jax.tokenizer import Tokenizer

    model = load_model(str(llama2_f32), F32)
    assert model.cfg.family == "llama" and not model.cfg.tie_word_embeddings
    hf_tok = Tokenizer.from_dir(os.path.join(TINY, "llama2"))
    for text in ("Hello world, this is a test.", "<|im_start|>user\nhi there<|im_end|>\n",
                 "  spaces\tand 1234 numbers!"):
        assert model.tokenizer.encode(text) == hf_tok.encode(text), text
    assert model.tokenizer.eos_token_id == hf_tok.eos_token_id == 2


# RMS(logits - float logits) / std(float logits) per type; measured on llama2: F16 6e-4,
# BF16 5e-3, Q8_0 1.8e-2, Q5_0/Q5_1 1.2e-1, Q4_0 2.4e-1, Q4_1 2.6e-1 (random tiny weights are
# harsh on 4-5 bit blocks). The bit-exactness of the loaded weights is checked separately.
QUANT_TOL = {QT.F16: 2e-3, QT.BF16: 1.5e-2, QT.Q8_0: 4e-2, QT.Q5_0: 0.2, QT.Q5_1: 0.2,
             QT.Q4_0: 0.4, QT.Q4_1: 0.4}


@pytest.mark.parametrize("qtype", list(QUANT_TOL), ids=lambda t: t.name)
def test_gguf_quantized_types(qtype, gguf_dir):
    name = "llama2"
    hf, tensors = read_hf(name)
    path = gguf_dir / f"{name}-{qtype.name}.gguf"
    written = write_gguf(path, hf, tensors, qtype=qtype)
    assert written["blk.0.attn_q.weight"][0] == qtype
    cfg, params, meta = load_gguf(str(path), F32)
    # exactly gguf's dequantization of the bytes on disk, un-permuted, in our layout
    assert_trees_equal(params, expected_params(cfg, written))

    _, hf_params = load_hf_dir(os.path.join(TINY, name), F32)
    input_ids, _ = ref_logits(name)
    want = logits_of(cfg, hf_params, input_ids)  # same cfg: one compiled program
    got = logits_of(cfg, params, input_ids)
    rel = np.sqrt(np.mean((got - want) ** 2)) / want.std()
    assert 0 < rel < QUANT_TOL[qtype], rel


# A synthetic llama whose every matrix row is 256 long: the k-quants' super-block size.
K_HF = {"num_hidden_layers": 1, "max_position_embeddings": 64, "hidden_size": 256,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32}


def _k_shapes():
    e, m, v, d = 256, 256, 32, 64
    shapes = {"model.embed_tokens.weight": (v, e), "lm_head.weight": (v, e),
              "model.layers.0.self_attn.q_proj.weight": (4 * d, e),
              "model.layers.0.self_attn.k_proj.weight": (2 * d, e),
              "model.layers.0.self_attn.v_proj.weight": (2 * d, e),
              "model.layers.0.self_attn.o_proj.weight": (e, 4 * d),
              "model.layers.0.mlp.gate_proj.weight": (m, e),
              "model.layers.0.mlp.up_proj.weight": (m, e),
              "model.layers.0.mlp.down_proj.weight": (e, m)}
    norms = {"model.norm.weight": (e,), "model.layers.0.input_layernorm.weight": (e,),
             "model.layers.0.post_attention_layernorm.weight": (e,)}
    return shapes, norms


def random_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Random bytes that form valid blocks: the f16 scales are set to small finite values."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    n = cols // block
    b = rng.integers(0, 256, (rows, n, size), dtype=np.uint8)

    def f16(shape):
        return rng.uniform(1e-3, 2e-2, shape).astype(np.float16).view(np.uint8).reshape(
            *shape[:-1], 2 * shape[-1])

    if qtype == QT.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        b[..., 0:4] = f16((rows, n, 2))
    elif qtype == QT.Q6_K:  # ql[128], qh[64], int8 scales[16], d (f16)
        b[..., 208:210] = f16((rows, n, 1))
    elif qtype == QT.IQ2_XXS:  # d (f16), 64 bytes of grid indices/signs
        b[..., 0:2] = f16((rows, n, 1))
    return b.reshape(rows, n * size)


def write_k_model(path, qtype, rng, override=None):
    shapes, norms = _k_shapes()
    raw = {n: (random_blocks(rng, (override or {}).get(n, qtype), *s),
               (override or {}).get(n, qtype)) for n, s in shapes.items()}
    floats = {n: rng.uniform(0.5, 1.5, s).astype(np.float32) for n, s in norms.items()}
    return write_gguf(path, K_HF, floats, raw=raw)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_gguf_k_quants_from_raw_blocks(qtype, gguf_dir):
    path = gguf_dir / f"synthetic-{qtype.name}.gguf"
    written = write_k_model(path, qtype, np.random.default_rng(int(qtype)))
    cfg, params, _ = load_gguf(str(path), F32)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (256, 4, 2, 64)
    expected = expected_params(cfg, written)
    assert_trees_equal(params, expected)
    assert np.isfinite(np.asarray(params["layers_0"]["attn"]["q"]["kernel"])).all()
    # the un-permutation really moved rows (q of head 0: rows 0..63 in HF order)
    q_written = quants.dequantize(written["blk.0.attn_q.weight"][1], qtype)
    assert not np.array_equal(np.asarray(params["layers_0"]["attn"]["q"]["kernel"])[:, 0, :].T,
                              q_written[:64])


# ---------------------------------------------------------------------------- bad files
def _match(*parts: str) -> str:
    return ".*".join(re.escape(str(p)) for p in parts)


def test_gguf_truncated(llama2_f32, tmp_path):
    data = llama2_f32.read_bytes()
    half = tmp_path / "half.gguf"
    half.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=_match(half, "tensor", "runs past the end", "truncated")):
        load_gguf(str(half), F32)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    with pytest.raises(ValueError, match=_match(head, "truncated")):
        load_gguf(str(head), F32)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=_match(empty, "not a GGUF file")):
        load_gguf(str(empty), F32)
    with pytest.raises(FileNotFoundError, match=_match(tmp_path / "missing.gguf")):
        load_gguf(str(tmp_path / "missing.gguf"), F32)


def test_gguf_wrong_magic(llama2_f32, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + llama2_f32.read_bytes()[4:])
    with pytest.raises(ValueError, match=_match(bad, "not a GGUF file", "GGUF")):
        load_gguf(str(bad), F32)


def test_gguf_unsupported_and_unknown_types(gguf_dir, tmp_path):
    path = tmp_path / "iq2.gguf"
    write_k_model(path, QT.Q4_K, np.random.default_rng(0),
                  override={"model.layers.0.mlp.up_proj.weight": QT.IQ2_XXS})
    with pytest.raises(ValueError, match=_match(path, "blk.0.ffn_up.weight", "IQ2_XXS",
                                                "supported", "Q4_K")):
        load_gguf(str(path), F32)

    # a type id no GGML version defines: patch the tensor-info record of blk.0.ffn_up.weight
    data = bytearray(path.read_bytes())
    key = b"blk.0.ffn_up.weight"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(QT.IQ2_XXS)
    data[type_at:type_at + 4] = (999).to_bytes(4, "little")
    unknown = tmp_path / "unknown-type.gguf"
    unknown.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=_match(unknown, "blk.0.ffn_up.weight", "999")):
        load_gguf(str(unknown), F32)


def test_gguf_row_not_a_whole_number_of_blocks(tmp_path):
    hf, tensors = read_hf("llama2")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    # Q4_K's blocks hold 256 values; this tensor claims 64-long rows
    raw = {"model.layers.0.mlp.up_proj.weight": (np.zeros((128, 64), np.int8), QT.Q4_K)}
    path = tmp_path / "blocks.gguf"
    write_gguf(path, hf, tensors, raw=raw)
    with pytest.raises(ValueError, match=_match(path, "blk.0.ffn_up.weight", "Q4_K", "[64, 128]",
                                                "not a multiple of the block size 256")):
        load_gguf(str(path), F32)


def test_gguf_missing_tensor(tmp_path):
    hf, tensors = read_hf("llama2")
    del tensors["model.layers.0.mlp.up_proj.weight"]  # blk.0.ffn_up.weight
    path = tmp_path / "missing.gguf"
    assert "blk.0.ffn_up.weight" not in write_gguf(path, hf, tensors)
    with pytest.raises(ValueError, match=_match(path, "missing tensor",
                                                "model.layers.0.mlp.up_proj.weight", "(128, 64)")):
        load_gguf(str(path), F32)


def test_gguf_shape_mismatch(tmp_path):
    hf, tensors = read_hf("llama2")
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 64), np.float32)
    path = tmp_path / "shape.gguf"
    write_gguf(path, hf, tensors)
    with pytest.raises(ValueError, match=_match(path, "model.layers.0.mlp.up_proj.weight",
                                                "(64, 64)", "expected (128, 64)")):
        load_gguf(str(path), F32)
    # a q/k tensor whose rows can't be un-permuted must fail the same way, not in a reshape
    hf, tensors = read_hf("llama2")
    bad_k = tensors.pop("model.layers.1.self_attn.k_proj.weight")[:36]
    path = tmp_path / "shape-k.gguf"
    write_gguf(path, hf, tensors,
               raw={"model.layers.1.self_attn.k_proj.weight": (bad_k.view(np.uint8), QT.F32)})
    with pytest.raises(ValueError, match=_match(path, "model.layers.1.self_attn.k_proj.weight",
                                                "(36, 64)", "expected (64, 64)")):
        load_gguf(str(path), F32)


def test_gguf_unknown_architecture(tmp_path):
    hf, tensors = read_hf("llama2")
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, hf, tensors, arch="gpt2")
    with pytest.raises(ValueError, match=_match(path, "unknown GGUF architecture", "gpt2",
                                                "supported", "llama")):
        load_gguf(str(path), F32)


def _copy_tiny(name, tmp_path) -> str:
    dst = tmp_path / name
    shutil.copytree(os.path.join(TINY, name), dst)
    return str(dst)


def test_hf_unknown_architecture(tmp_path):
    path = _copy_tiny("llama2", tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with open(cfg_path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=_match(cfg_path, "unknown architecture", "gpt2",
                                                "supported", "llama")):
        load_hf_dir(path, F32)
    with pytest.raises(ValueError, match=_match(cfg_path, "gpt2")):
        load_model(path, F32)


def test_hf_truncated_safetensors(tmp_path):
    path = _copy_tiny("llama2", tmp_path)
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    for cut in (len(data) // 2, 100, 4):
        with open(file, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match=_match(file, "safetensors")):
            load_hf_dir(path, F32)


def test_hf_missing_shard(tmp_path):
    path = _copy_tiny("llama3", tmp_path)
    shard = os.path.join(path, "model-00002-of-00003.safetensors")
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=_match(shard, "missing")):
        load_hf_dir(path, F32)


def test_hf_missing_config(tmp_path):
    path = _copy_tiny("llama2", tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match=_match(path, "config.json")):
        load_hf_dir(path, F32)
    with pytest.raises(FileNotFoundError, match=_match(path, "config.json")):
        load_model(path, F32)


def test_load_model_unknown_source():
    with pytest.raises(ValueError) as e:
        load_model("no/such/thing")
    msg = str(e.value)
    for accepted in ("no/such/thing", "preset", "smollm2-135m", "random:", "llama3-8b", ".gguf",
                     "Hugging Face", "imp-jax convert"):
        assert accepted in msg, (accepted, msg)


# ---------------------------------------------------------------------------- HF directories
def test_sharded_and_legacy_hf_dirs_agree():
    sharded = os.path.join(TINY, "llama3")
    legacy = os.path.join(TINY, "llama3_legacy")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    cfg_a = ModelConfig.from_hf_file(os.path.join(sharded, "config.json"))
    cfg_b = ModelConfig.from_hf_file(os.path.join(legacy, "config.json"))
    assert cfg_a == cfg_b
    assert cfg_a.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64) and cfg_a.rope_theta == 500000.0
    cfg_a2, params_a = load_hf_dir(sharded, F32)
    cfg_b2, params_b = load_hf_dir(legacy, F32)
    assert cfg_a2 == cfg_b2 == cfg_a
    assert_trees_equal(params_a, params_b)


# ---------------------------------------------------------------------------- orbax + CLI
@pytest.fixture(scope="module")
def qwen2_orbax(tmp_path_factory):
    from imp_jax.cli import main

    dst = tmp_path_factory.mktemp("orbax") / "qwen2"
    assert main(["convert", os.path.join(TINY, "qwen2"), str(dst)]) == 0
    return dst


def test_orbax_convert_round_trip(qwen2_orbax):
    src = load_model(os.path.join(TINY, "qwen2"))
    dst = load_model(str(qwen2_orbax))
    assert dst.cfg == src.cfg and dst.cfg.qkv_bias
    assert_trees_equal(dst.params, src.params)
    text = "Hello world, this is a test.\n<|im_start|>user\nhi<|im_end|>"
    assert dst.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert dst.tokenizer.eos_token_ids == src.tokenizer.eos_token_ids
    assert dst.generation_config.get("eos_token_id") == src.generation_config.get("eos_token_id")


def test_orbax_generate_matches_source(qwen2_orbax):
    from imp_jax import LLM

    prompts = ["Hello world", "The quick brown fox", "a"]

    def run(model):
        llm = LLM(model, max_model_len=64, num_pages=32, page_size=4)
        outs = llm.generate(prompts, max_tokens=4, temperature=0, use_tqdm=False)
        return [(o.prompt_token_ids, o.outputs[0].token_ids, o.outputs[0].text) for o in outs]

    want = run(os.path.join(TINY, "qwen2"))
    assert all(len(ids) >= 1 for _, ids, _ in want)
    assert run(str(qwen2_orbax)) == want


def test_convert_fp8_checkpoint_keeps_its_codes(tmp_path):
    """`imp-jax convert CT_FP8 DST --quantization fp8` saves the checkpoint's own e4m3 codes and
    scales on exactly the weights it quantized (the LLM(quantization="fp8") path), and reloads
    them unchanged."""
    from imp_jax.cli import main
    from imp_jax.quant import QuantArray, quantize_loaded

    src = os.path.join(TINY, "llama3_ct_fp8")
    assert main(["convert", src, str(tmp_path / "ct"), "--quantization", "fp8"]) == 0
    loaded = load_model(src)
    assert len(loaded.fp8_scales) == 2 * 7  # per tensor (attention) and per channel (MLP)
    want = quantize_loaded(loaded.params, loaded.cfg, "fp8", loaded.fp8_scales)
    got = load_model(str(tmp_path / "ct")).params
    assert_trees_equal(got, want)
    is_q = lambda x: isinstance(x, QuantArray)  # noqa: E731
    assert sum(map(is_q, jax.tree.leaves(got, is_leaf=is_q))) == 2 * 7


def test_convert_with_a_quant_policy(tmp_path, capsys):
    """`imp-jax convert SRC DST --quantization int8 --quant-policy ...`: the policy picks the
    8-bit weights (here every block and the lm_head; the default keeps blocks 0 and 1), the
    checkpoint records them and reloads them as saved."""
    from imp_jax.cli import main
    from imp_jax.quant import QuantArray, parse_policy, quantize_params

    src = os.path.join(TINY, "qwen2")
    assert main(["convert", src, str(tmp_path / "q"), "--quantization", "int8",
                 "--quant-policy", "all"]) == 0
    loaded = load_model(src)
    want = quantize_params(loaded.params, loaded.cfg, "int8", parse_policy("all"))
    got = load_model(str(tmp_path / "q")).params
    assert_trees_equal(got, want)
    is_q = lambda x: isinstance(x, QuantArray)  # noqa: E731
    assert is_q(got["layers_0"]["attn"]["q"]["kernel"]) and is_q(got["lm_head"]["kernel"])
    # a policy or a mode the saved 8-bit weights do not follow is refused, not ignored
    import imp_jax

    dst = str(tmp_path / "q")
    kw = dict(max_model_len=32)
    with pytest.raises(ValueError, match="weights are already quantized \\(int8\\) that this "
                                         "policy keeps unquantized: .*layers_0/.*drop the policy"):
        imp_jax.LLM(dst, quantization="int8", quant_policy="default", **kw)
    with pytest.raises(ValueError, match="already quantized to 'int8'.*quantization='int8'"):
        imp_jax.LLM(dst, quantization="fp8", **kw)
    llm = imp_jax.LLM(dst, quantization="int8", quant_policy="all", **kw)
    assert_trees_equal(llm.model.params, want)
    # without a policy a converted checkpoint loads as saved, whatever the default would pick
    assert main(["convert", src, str(tmp_path / "k"), "--quantization", "fp8",
                 "--quant-policy", "keep_first=0,keep_last=0,keep=layers_1/mlp/*"]) == 0
    saved = load_model(str(tmp_path / "k")).params
    assert not is_q(saved["layers_1"]["mlp"]["up"]["kernel"])
    for mode in ("fp8", "fp8-weight-only"):  # the same e4m3 codes, relabelled
        got = imp_jax.LLM(str(tmp_path / "k"), quantization=mode, **kw).model.params
        leaves = [x for x in jax.tree.leaves(got, is_leaf=is_q) if is_q(x)]
        assert leaves and all(x.mode == mode for x in leaves)
        as_fp8 = jax.tree.map(lambda x: dataclasses.replace(x, mode="fp8") if is_q(x) else x,
                              got, is_leaf=is_q)
        assert_trees_equal(as_fp8, saved)
    with pytest.raises(ValueError, match="already quantized"):  # the same through loaded=
        imp_jax.LLM(dst, loaded=llm.model, quantization="int8", quant_policy="default", **kw)
    # bad flags fail before the source is read (here it does not even exist)
    for argv, msg in ((["--quant-policy", "all"], "--quant-policy needs --quantization"),
                      (["--quantization", "int8", "--quant-policy", "lm_hed=1"],
                       "bad quantization policy item 'lm_hed=1'")):
        capsys.readouterr()
        assert main(["convert", os.path.join(TINY, "nowhere"), str(tmp_path / "x"), *argv]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_info(qwen2_orbax, capsys):
    from imp_jax.cli import main

    for model in (os.path.join(TINY, "llama3"), str(qwen2_orbax)):
        assert main(["info", model]) == 0
        out = capsys.readouterr().out
        family = "qwen2" if model == str(qwen2_orbax) else "llama"
        assert re.search(rf"^family\s+{family}$", out, re.M), out
        assert re.search(r"^params\s+0\.\d M$", out, re.M), out
        assert re.search(r"^layers\s+2, hidden 64, mlp 128", out, re.M), out


def _preset_path():
    from checkpoints.presets import resolve_preset

    try:
        return resolve_preset("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_cli_info_preset(capsys):
    from imp_jax.cli import main

    _preset_path()
    assert main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^family\s+llama$", out, re.M), out
    assert re.search(r"^params\s+13\d\.\d M$", out, re.M), out
    assert re.search(r"^layers\s+30, hidden 576, mlp 1536, heads 9/3 x 64", out, re.M), out


# ---------------------------------------------------------------------------- the real file
def test_fast_reader_matches_gguf_reader_on_preset_file():
    from gguf import GGUFReader, GGUFValueType

    from imp_jax.loaders.gguf_reader import read_gguf

    path = _preset_path()
    ours = read_gguf(path)
    theirs = GGUFReader(path)

    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in t.shape), t.name
        assert mine.type_name == t.tensor_type.name, t.name
        # same bytes at the same offsets
        assert np.array_equal(mine.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))

    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():  # scalars, and every element of the token/merge arrays
        assert ours.metadata[key] == field.contents(), (key, field.types)
    assert any(f.types[0] == GGUFValueType.ARRAY for f in fields.values())
    assert ours.metadata["general.architecture"] == "llama"
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == ours.metadata["llama.vocab_size"]
