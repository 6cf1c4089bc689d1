"""Find and load a model: a preset name, a .gguf file, a Hugging Face dir or an orbax dir."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from imp_jax.config import ModelConfig, read_json


def default_dtype():
    """bf16 on GPU, float32 elsewhere (CPUs have no fast bf16 matmul and tests want exactness)."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict[str, Any]
    tokenizer: Any  # imp_jax.tokenizer.Tokenizer, or None for random weights of a named shape
    generation_config: dict[str, Any]  # HF generation_config.json (eos ids, sampling defaults)
    source: str


def load_model(model: str, dtype=None, shardings=None,
               random_quantization: str | None = None) -> LoadedModel:
    """shardings: optional `cfg -> NamedSharding tree` (imp_jax.sharding.param_shardings): every
    format then places each weight straight into its shards (orbax restores into them; GGUF and
    safetensors go host -> shards; random weights are generated sharded), so no device ever
    holds a whole copy of a model that only fits across several.

    random_quantization: for "random:<shape>" only, generate the weights already quantized
    (imp_jax.quant modes), init and quantization in one jitted call, so the full-precision
    weights are never all alive at once (a 70B shape in fp8 on 2 x 80 GB); the values equal
    quantizing the plain random weights."""
    from checkpoints.presets import PRESETS, SHAPES, resolve_preset
    from imp_jax.tokenizer import Tokenizer

    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    if model in PRESETS:
        model = resolve_preset(model)
    if model.startswith("random:"):
        from imp_jax.spec import init_params

        shape = model[len("random:"):]
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        cfg = SHAPES[shape]
        out = shardings(cfg) if shardings is not None else None

        def init(key):
            params = init_params(cfg, key, dtype)
            if random_quantization is None:
                return params
            from imp_jax.quant import quantize_params

            return quantize_params(params, cfg, random_quantization)

        if out is not None and random_quantization is not None:
            from imp_jax.quant import abstract_quantized
            from imp_jax.sharding import leaf_shardings

            target = abstract_quantized(cfg, dtype, random_quantization)
            out = jax.tree.map(leaf_shardings, out, target)  # a QuantArray where out has a leaf
        init = jax.jit(init, out_shardings=out)
        return LoadedModel(cfg, init(jax.random.key(0)), None, {}, model)
    if os.path.isfile(model) and model.endswith(".gguf"):
        from imp_jax.loaders.gguf_file import load_gguf

        cfg, params, meta = load_gguf(model, dtype, shardings)
        return LoadedModel(cfg, params, Tokenizer.from_gguf(meta), {}, model)
    if os.path.isdir(model):
        from imp_jax.loaders import orbax_ckpt

        if orbax_ckpt.is_orbax_dir(model):
            cfg, params, meta = orbax_ckpt.load(model, dtype, shardings)
            return LoadedModel(cfg, params, Tokenizer.from_dir(model),
                               meta.get("generation_config", {}), model)
        from imp_jax.loaders.hf_dir import load_hf_dir

        cfg, params = load_hf_dir(model, dtype, shardings)
        gen = read_json(os.path.join(model, "generation_config.json")) or {}
        return LoadedModel(cfg, params, Tokenizer.from_dir(model), gen, model)
    raise ValueError(
        f"cannot load model {model!r}: expected a preset name ({', '.join(sorted(PRESETS))}), "
        f"'random:<shape>' ({', '.join(sorted(SHAPES))}), a .gguf file, a Hugging Face directory "
        "(config.json + *.safetensors) or a directory written by `imp-jax convert`")


__all__ = ["LoadedModel", "load_model", "default_dtype"]
