"""Find and load a model: a preset name, a .gguf file, a Hugging Face dir or an orbax dir."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from imp_jax.config import ModelConfig, read_json


def default_dtype():
    """bf16 on GPU, float32 elsewhere (CPUs have no fast bf16 matmul and tests want exactness)."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


# Weights and activations: float dtypes the model runs in (8-bit weights are `quantization=`).
DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "fp32": jnp.float32,
          "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "f16": jnp.float16, "fp16": jnp.float16}


def parse_dtype(dtype) -> jnp.dtype:
    """None (bf16 on GPU, float32 elsewhere), a name in DTYPES or a float dtype -> the dtype."""
    if dtype is None:
        return jnp.dtype(default_dtype())
    name = dtype.strip().lower() if isinstance(dtype, str) else None
    if name in DTYPES:
        return jnp.dtype(DTYPES[name])
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d not in {jnp.dtype(t) for t in DTYPES.values()}:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: float32, bfloat16, "
                         f"float16 (or f32 / bf16 / f16; 8-bit weights: quantization=)")
    return d


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict[str, Any]
    tokenizer: Any  # imp_jax.tokenizer.Tokenizer, or None for random weights of a named shape
    generation_config: dict[str, Any]  # HF generation_config.json (eos ids, sampling defaults)
    source: str
    # {"/"-joined params path: float32 [out] or None}: an FP8 checkpoint's quantized weights
    # and their per-tensor / per-channel scales (None: per block), so that quant.quantize_loaded
    # re-quantizes exactly those weights, to their exact codes where a scale is given
    fp8_scales: dict[str, Any] = dataclasses.field(default_factory=dict)


def checkpoint_scales(cfg: ModelConfig, by_hf_name: dict[str, Any]) -> dict[str, Any]:
    """{HF weight name: scale} -> {params path: scale}."""
    from imp_jax.loaders.weights import hf_name
    from imp_jax.spec import map_specs, param_specs

    found = {}

    def one(path, spec):
        name = hf_name(path)
        if name in by_hf_name:
            found["/".join(path)] = by_hf_name[name]

    map_specs(one, param_specs(cfg))
    return found


def random_params(cfg, dtype, shardings=None, quantization: str | None = None,
                  quant_policy=None):
    """`spec.init_params(cfg, key 0)` (quantized like `quant.quantize_params` when `quantization`
    is set, the weights `quant_policy` selects, default `quant.DEFAULT_POLICY`), generated one
    leaf at a time, each straight into its sharding: the peak is one
    leaf's temporaries, where one jitted call for the whole tree held every weight in float32
    at once (33 GB per device for the 8B shape in fp8 at tp=2; a 70B shape ran out of memory)."""
    from imp_jax import quant
    from imp_jax.sharding import leaf_shardings
    from imp_jax.spec import get_path, leaf_key, map_specs, param_specs

    if quantization is not None:
        quant.check_mode(quantization)
    policy = quant.DEFAULT_POLICY if quant_policy is None else quant_policy
    key, dtype = jax.random.key(0), jnp.dtype(dtype)

    def one(path, spec):
        mode = quantization if quantization and policy.selects(path, spec, cfg) else None
        sharding = None if shardings is None else get_path(shardings, path)
        contract = ()
        if mode:
            contract = (1,) if path[-1] == "embedding" else spec.contract
            if sharding is not None:  # q split like the weight, the scale's reduced axes replicated
                target = quant.abstract_quantized_leaf(spec, dtype, mode, contract)
                sharding = leaf_shardings(sharding, target)
                sharding = (sharding.q, sharding.scale)
        return _random_leaf(leaf_key(key, path), spec=spec, dtype=dtype, mode=mode,
                            contract=contract, scales=policy.scales, sharding=sharding)

    return map_specs(one, param_specs(cfg))


@functools.partial(jax.jit, static_argnames=("spec", "dtype", "mode", "contract", "scales",
                                             "sharding"))
def _random_leaf(key, *, spec, dtype, mode, contract, scales, sharding):
    """One leaf: the same shape, spec and sharding share one compiled program."""
    w = spec.initializer(key, dtype)
    if mode is None:
        return w if sharding is None else jax.lax.with_sharding_constraint(w, sharding)
    from imp_jax.quant import quantize

    w = quantize(w, mode, contract, scales)
    if sharding is not None:
        w = dataclasses.replace(w, q=jax.lax.with_sharding_constraint(w.q, sharding[0]),
                                scale=jax.lax.with_sharding_constraint(w.scale, sharding[1]))
    return w


def read_config(model: str) -> ModelConfig:
    """The ModelConfig of anything `load_model` takes, without loading weights (`imp-jax info`,
    a policy checked before a long load)."""
    from checkpoints.presets import PRESETS, SHAPES, resolve_preset

    if model.startswith("random:"):
        shape = model[len("random:"):]
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        return SHAPES[shape]
    if model in PRESETS:
        model = resolve_preset(model)
    if model.endswith(".gguf"):
        from imp_jax.loaders.gguf_file import open_gguf

        contents = open_gguf(model)
        return ModelConfig.from_gguf(contents.metadata, set(contents.tensors), model)
    from imp_jax.loaders import orbax_ckpt

    if orbax_ckpt.is_orbax_dir(model):
        return ModelConfig.from_dict(read_json(os.path.join(model, orbax_ckpt.CONFIG))["config"])
    if not os.path.isdir(model):
        load_model(model)  # raises its error, which lists the forms a model may take
    return ModelConfig.from_hf_file(os.path.join(model, "config.json"))


def load_model(model: str, dtype=None, shardings=None,
               random_quantization: str | None = None, random_policy=None) -> LoadedModel:
    """shardings: optional `cfg -> NamedSharding tree` (imp_jax.sharding.param_shardings): every
    format then places each weight straight into its shards (orbax restores into them; GGUF and
    safetensors go host -> shards; random weights are generated sharded), so no device ever
    holds a whole copy of a model that only fits across several.

    random_quantization: for "random:<shape>" only, generate the weights already quantized
    (imp_jax.quant modes), each leaf initialised and quantized on its own (`random_params`),
    so the full-precision weights are never all alive at once (a 70B shape in fp8 on 2 GPUs);
    the values equal quantizing the plain random weights; random_policy: the
    `quant.QuantPolicy` selecting them (default `quant.DEFAULT_POLICY`)."""
    from checkpoints.presets import PRESETS, SHAPES, resolve_preset
    from imp_jax.tokenizer import Tokenizer

    dtype = parse_dtype(dtype)
    if model in PRESETS:
        model = resolve_preset(model)
    if model.startswith("random:"):
        cfg = read_config(model)
        params = random_params(cfg, dtype, shardings(cfg) if shardings is not None else None,
                               random_quantization, random_policy)
        return LoadedModel(cfg, params, None, {}, model)
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

        scales: dict[str, Any] = {}
        cfg, params = load_hf_dir(model, dtype, shardings, fp8_scales=scales)
        gen = read_json(os.path.join(model, "generation_config.json")) or {}
        return LoadedModel(cfg, params, Tokenizer.from_dir(model), gen, model,
                           checkpoint_scales(cfg, scales))
    raise ValueError(
        f"cannot load model {model!r}: expected a preset name ({', '.join(sorted(PRESETS))}), "
        f"'random:<shape>' ({', '.join(sorted(SHAPES))}), a .gguf file, a Hugging Face directory "
        "(config.json + *.safetensors) or a directory written by `imp-jax convert`")


__all__ = ["LoadedModel", "load_model", "default_dtype"]
