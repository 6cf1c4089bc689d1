"""Turn checkpoint tensors (HF names and [out, in] layout) into the params pytree of spec.py.

Every format is first renamed to Hugging Face tensor names, so one table and one set of shape
checks serve GGUF, safetensors and anything added later.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.config import ModelConfig
from imp_jax.spec import ArraySpec, map_specs, param_specs

_LAYER = {
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("attn", "q", "kernel"): "self_attn.q_proj.weight",
    ("attn", "k", "kernel"): "self_attn.k_proj.weight",
    ("attn", "v", "kernel"): "self_attn.v_proj.weight",
    ("attn", "o", "kernel"): "self_attn.o_proj.weight",
    ("attn", "q", "bias"): "self_attn.q_proj.bias",
    ("attn", "k", "bias"): "self_attn.k_proj.bias",
    ("attn", "v", "bias"): "self_attn.v_proj.bias",
    ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",
    ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
    ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down", "kernel"): "mlp.down_proj.weight",
}
_TOP = {
    ("embed", "embedding"): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head", "kernel"): "lm_head.weight",
}


def hf_name(path: tuple[str, ...]) -> str:
    """The Hugging Face tensor name of a params path such as ('layers_3', 'attn', 'q', 'kernel')."""
    if path[0].startswith("layers_"):
        return f"model.layers.{path[0][len('layers_'):]}.{_LAYER[path[1:]]}"
    return _TOP[path]


def source_shape(path: tuple[str, ...], spec: ArraySpec) -> tuple[int, ...]:
    """The shape a checkpoint stores this weight in: HF linear weights are [out, in], biases flat."""
    if path[-1] == "bias":
        return (int(np.prod(spec.shape)),)
    if not spec.contract:
        return spec.shape
    n_in = int(np.prod([spec.shape[d] for d in spec.contract]))
    return (int(np.prod(spec.shape)) // n_in, n_in)


def to_param(arr, path: tuple[str, ...], spec: ArraySpec, dtype, name: str,
             source: str) -> np.ndarray:
    """Check a checkpoint tensor against its spec and bring it into our layout and dtype, on the
    host: nothing reaches a device until `place` puts it (whole, or only each device's shard)."""
    expected = source_shape(path, spec)
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, expected "
                         f"{tuple(expected)} for params {spec.axes}")
    x = np.asarray(arr)
    if spec.contract:  # [out, in] -> [in..., out...]
        x = x.T
    return np.ascontiguousarray(x.reshape(spec.shape).astype(np.dtype(dtype)))


def build_params(cfg: ModelConfig, get: Callable[[str], Any], has: Callable[[str], bool],
                 source: str, dtype, shardings=None) -> dict[str, Any]:
    """Assemble the params pytree from a checkpoint given by `get(hf_name)` / `has(hf_name)`.

    `shardings` (a `cfg -> NamedSharding tree` callable): each weight goes from host memory
    straight into its shards, so a model larger than one device never sits whole on one."""
    tree = shardings(cfg) if shardings is not None else None

    def load(path, spec):
        name = hf_name(path)
        if not has(name):
            raise ValueError(f"{source}: missing tensor {name} (needed for "
                             f"{'/'.join(path)}, shape {source_shape(path, spec)})")
        x = to_param(get(name), path, spec, dtype, name, source)
        if tree is None:
            return jnp.asarray(x)
        sharding = tree
        for key in path:
            sharding = sharding[key]
        return jax.device_put(x, sharding)

    return map_specs(load, param_specs(cfg))
