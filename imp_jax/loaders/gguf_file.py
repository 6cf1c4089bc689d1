"""GGUF files (llama.cpp's format) through the `gguf` package, dequantized to the compute dtype."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from imp_jax.config import ModelConfig
from imp_jax.loaders.weights import build_params

# What the gguf package dequantizes and we have checked; anything else is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def to_hf_name(name: str) -> str | None:
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        hf = _LAYER_NAMES.get(rest)
        return f"model.layers.{layer}.{hf}" if hf else None
    return _TOP_NAMES.get(name)


def open_gguf(path: str):
    """Metadata and tensor directory of a GGUF file (a clear error for anything else)."""
    from imp_jax.loaders.gguf_reader import read_gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return read_gguf(path)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of attn_q/attn_k.

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates halves (x0, x_{d/2}).
    Its converter reorders each head's rows from halves to pairs; we reorder them back so the
    model keeps HF's rotate-half RoPE.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def load_gguf(path: str, dtype, shardings=None) -> tuple[ModelConfig, dict[str, Any],
                                                        dict[str, Any]]:
    """(config, params, metadata) from a GGUF file."""
    from gguf import GGMLQuantizationType, quants

    contents = open_gguf(path)
    meta, tensors = contents.metadata, contents.tensors
    cfg = ModelConfig.from_gguf(meta, set(tensors), source=path)
    by_hf = {}
    for name, t in tensors.items():
        hf = to_hf_name(name)
        if hf is not None:
            by_hf[hf] = t

    # llama.cpp permutes q/k only for the llama architecture (Mistral GGUFs use it too);
    # Qwen GGUFs keep HF's layout.
    permuted = meta.get("general.architecture") == "llama"

    def get(hf_name: str) -> np.ndarray:
        t = by_hf[hf_name]
        if t.type_name not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {t.name} has quantization type {t.type_name}, "
                             f"supported: {', '.join(SUPPORTED_TYPES)}")
        try:
            w = quants.dequantize(t.data, GGMLQuantizationType[t.type_name]).astype(np.float32)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {t.name} ({t.type_name}, shape "
                             f"{list(t.shape)}): {e}") from e
        if permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads
            if w.shape[0] == heads * cfg.head_dim:  # else build_params reports the bad shape
                w = unpermute_rope(w, heads)
        return w

    params = build_params(cfg, get, lambda n: n in by_hf, path, dtype, shardings)
    return cfg, params, meta
