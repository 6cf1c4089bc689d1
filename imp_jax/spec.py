"""One description of every array: shape, logical axes and how to initialise it.

`param_specs(cfg)` returns a nested dict of `ArraySpec` with exactly the structure of the params
pytree (docs/architecture.md has the table). Random init, loading (shape checks), sharding
(logical axes -> mesh axes) and quantization (which axis is contracted) all read it, so a new
weight is added in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis name per dimension
    init: str = "normal"  # "normal" (fan-in scaled) | "ones" | "zeros"
    # Dimensions contracted by the matmul that uses this weight (quantization scales reduce them).
    contract: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")

    def initializer(self, key, dtype) -> jax.Array:
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        if self.init == "zeros":
            return jnp.zeros(self.shape, dtype)
        fan_in = int(np.prod([self.shape[d] for d in self.contract])) if self.contract else 1
        std = 1.0 if not self.contract else fan_in ** -0.5
        return (std * jax.random.normal(key, self.shape, jnp.float32)).astype(dtype)


def _dense(shape, axes, contract):
    return ArraySpec(tuple(shape), tuple(axes), "normal", tuple(contract))


def _norm(dim, axis):
    return ArraySpec((dim,), (axis,), "ones")


@functools.lru_cache(maxsize=None)
def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    e, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn: dict[str, Any] = {
        "q": {"kernel": _dense((e, h, d), ("embed", "heads", "head_dim"), (0,))},
        "k": {"kernel": _dense((e, kv, d), ("embed", "kv_heads", "head_dim"), (0,))},
        "v": {"kernel": _dense((e, kv, d), ("embed", "kv_heads", "head_dim"), (0,))},
        "o": {"kernel": _dense((h, d, e), ("heads", "head_dim", "embed"), (0, 1))},
    }
    if cfg.qkv_bias:
        attn["q"]["bias"] = ArraySpec((h, d), ("heads", "head_dim"), "zeros")
        attn["k"]["bias"] = ArraySpec((kv, d), ("kv_heads", "head_dim"), "zeros")
        attn["v"]["bias"] = ArraySpec((kv, d), ("kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": _norm(d, "head_dim")}
        attn["k_norm"] = {"scale": _norm(d, "head_dim")}
    layer = {
        "attn_norm": {"scale": _norm(e, "embed")},
        "attn": attn,
        "mlp_norm": {"scale": _norm(e, "embed")},
        "mlp": {
            "gate": {"kernel": _dense((e, m), ("embed", "mlp"), (0,))},
            "up": {"kernel": _dense((e, m), ("embed", "mlp"), (0,))},
            "down": {"kernel": _dense((m, e), ("mlp", "embed"), (0,))},
        },
    }
    specs: dict[str, Any] = {"embed": {"embedding": _dense((v, e), ("vocab", "embed"), ())}}
    specs.update({f"layers_{i}": layer for i in range(cfg.num_layers)})
    specs["final_norm"] = {"scale": _norm(e, "embed")}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = {"kernel": _dense((e, v), ("embed", "vocab"), (0,))}
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ArraySpec)


def map_specs(fn: Callable[[tuple[str, ...], ArraySpec], Any], specs) -> Any:
    """tree_map over specs with the path ('layers_0', 'attn', 'q', 'kernel') of each leaf."""

    def go(path, node):
        if is_spec(node):
            return fn(path, node)
        return {k: go(path + (k,), child) for k, child in node.items()}

    return go((), specs)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random params for `cfg`: benchmarks of a named shape and tests need no downloads."""

    return map_specs(lambda path, spec: spec.initializer(leaf_key(key, path), dtype),
                     param_specs(cfg))


def get_path(tree, path: tuple[str, ...]):
    """The node of a nested dict (params, shardings) at a spec path."""
    for k in path:
        tree = tree[k]
    return tree


def leaf_key(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """The random key of one param leaf: any subset of leaves can be generated alone."""
    # crc32, not hash(): str hashes change from process to process.
    return jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) % (2**31))


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, Any]:
    """ShapeDtypeStructs of the params: memory planning and orbax restore targets."""
    return map_specs(lambda _, s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg))


def param_bytes(cfg: ModelConfig, itemsize: int) -> int:
    leaves = jax.tree.leaves(param_specs(cfg), is_leaf=is_spec)
    return sum(int(np.prod(s.shape)) for s in leaves) * itemsize


def kv_page_spec(num_pages: int, page_size: int, cfg: ModelConfig) -> ArraySpec:
    """One layer's K (or V) page pool."""
    return ArraySpec((num_pages, page_size, cfg.num_kv_heads, cfg.head_dim),
                     ("pages", None, "kv_heads", "head_dim"), "zeros")
