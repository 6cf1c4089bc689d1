"""Orbax checkpoints of imp_jax params (+ config.json + tokenizer): `imp-jax convert` writes them.

They reload faster than the source formats: no dequantization, no transposes, one array per
parameter already in our layout and dtype, restorable straight into target shardings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from imp_jax.config import ModelConfig, read_json
from imp_jax.spec import abstract_params

CONFIG = "imp_jax_config.json"
PARAMS = "params"


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def save(path: str, cfg: ModelConfig, params: dict[str, Any], extra: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS), params, force=True)
    from imp_jax.quant import QuantArray, quant_meta

    is_q = lambda a: isinstance(a, QuantArray)  # noqa: E731
    dtype = str(next(a for a in jax.tree.leaves(params, is_leaf=is_q) if not is_q(a)).dtype)
    quant = quant_meta(params)  # None unless some weights are QuantArrays
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump({"config": cfg.to_dict(), "dtype": dtype,
                   **({"quant": quant} if quant else {}), **extra}, f, indent=1)


def _sharded(a, sharding):
    """A restore target leaf placed by its weight's `sharding`: a QuantArray's codes and scale
    each get theirs (`sharding.leaf_shardings`: the codes' dims are stored K-major)."""
    from imp_jax.sharding import leaf_shardings

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        a, leaf_shardings(sharding, a))


def load(path: str, dtype, shardings=None) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta = read_json(os.path.join(path, CONFIG), required=True)
    cfg = ModelConfig.from_dict(meta["config"])
    target = abstract_params(cfg, dtype)
    if meta.get("quant"):  # a QuantArray tree: q/scale keep their stored dtypes
        from imp_jax.quant import abstract_from_meta

        target = abstract_from_meta(cfg, dtype, meta["quant"])
    if callable(shardings):  # cfg -> shardings (the caller does not know cfg yet)
        shardings = shardings(cfg)
    if shardings is not None:  # restore each array straight into its shards
        from imp_jax.quant import QuantArray

        target = jax.tree.map(_sharded, target, shardings,
                              is_leaf=lambda a: isinstance(a, QuantArray))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS), target)
    return cfg, params, meta
