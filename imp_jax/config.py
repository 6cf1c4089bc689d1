"""ModelConfig: one static description of a Llama-family decoder.

Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 and SmolLM2 differ only in a handful of flags (q/k/v bias,
q/k RMSNorm, tied embeddings, rope scaling, head_dim), so one frozen dataclass covers them all.
It is hashable, which lets jit treat it as a static argument.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# HF `architectures` / `model_type` values this decoder implements, and the flags they imply.
_HF_FAMILIES = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "mistral": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
}
_GGUF_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) or None.
    # A tuple, not a dict, so the config stays hashable.
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        e, m, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * per_layer + e + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(d["rope_scaling"])
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in _HF_FAMILIES:
            archs = hf.get("architectures")
            raise ValueError(f"{source}: unknown architecture model_type={model_type!r} "
                             f"(architectures={archs}); supported: {sorted(_HF_FAMILIES)}")
        if hf.get("attention_bias") and model_type != "qwen2":
            raise ValueError(f"{source}: attention_bias=True is not supported for {model_type}")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=True is not supported")
        heads = hf["num_attention_heads"]
        # transformers 5 moves rope_theta and the scaling into `rope_parameters`; older files use
        # `rope_theta` + `rope_scaling`. Read either.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(rope, source),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            **_HF_FAMILIES[model_type],
        )

    @classmethod
    def from_hf_file(cls, path: str) -> "ModelConfig":
        hf = read_json(path, required=True)
        if not isinstance(hf, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
        try:
            return cls.from_hf(hf, source=path)
        except KeyError as e:
            raise ValueError(f"{path}: missing key {e} (a Hugging Face config.json of a "
                             f"supported family has it)") from None

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str], source: str) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in _GGUF_FAMILIES:
            raise ValueError(f"{source}: unknown GGUF architecture {arch!r}; supported: "
                             f"{sorted(_GGUF_FAMILIES)}")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"{source}: missing GGUF metadata key {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        rope = None
        if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise ValueError(f"{source}: rope scaling type {meta[f'{arch}.rope.scaling.type']!r} "
                             "is not supported")
        family = _GGUF_FAMILIES[arch]
        return cls(
            family=family,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length", hidden // heads)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            **_HF_FAMILIES["llama" if family == "mistral" else family],
        )


def _rope_scaling(rope: dict[str, Any], source: str) -> tuple | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported; supported: llama3")


def rope_inv_freq(cfg: ModelConfig):
    """Inverse rotary frequencies [head_dim // 2] as float64 numpy, llama3 scaling applied."""
    import numpy as np

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv
    _, factor, low, high, original = cfg.rope_scaling
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def read_json(path: str, required: bool = False) -> Any:
    """A JSON file's contents; None when it does not exist (unless `required`). A malformed
    file raises a ValueError naming it (json's own message names only a line and column)."""
    if not required and not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
