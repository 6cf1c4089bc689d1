"""Hugging Face model directories: config.json + *.safetensors (single file or sharded)."""

from __future__ import annotations

import json
import os
from typing import Any

from imp_jax.config import ModelConfig
from imp_jax.loaders.weights import build_params


def _safetensors_files(path: str) -> dict[str, str]:
    """tensor name -> file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (and no "
                                "model.safetensors.index.json)")
    from safetensors import safe_open

    where = {}
    for file in files:
        full = os.path.join(path, file)
        with _open(full, safe_open) as f:
            where.update({name: full for name in f.keys()})
    return where


def _open(file: str, safe_open):
    try:
        # numpy (host) arrays; bf16 comes back as ml_dtypes.bfloat16
        return safe_open(file, framework="numpy")
    except Exception as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def load_hf_dir(path: str, dtype, shardings=None) -> tuple[ModelConfig, dict[str, Any]]:
    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    cfg = ModelConfig.from_hf_file(config_path)
    where = _safetensors_files(path)
    handles: dict[str, Any] = {}

    def get(name: str):
        file = where[name]
        if file not in handles:
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file}: listed in the index for {name} but missing")
            handles[file] = _open(file, safe_open)
        try:
            return handles[file].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {name} ({e}); is the file truncated?") \
                from e

    return cfg, build_params(cfg, get, lambda n: n in where, path, dtype, shardings)
