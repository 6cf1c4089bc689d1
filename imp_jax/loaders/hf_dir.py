"""Hugging Face model directories: config.json + *.safetensors (single file or sharded)."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from imp_jax.config import ModelConfig, read_json
from imp_jax.loaders.weights import build_params


FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def _safetensors_files(path: str) -> dict[str, str]:
    """tensor name -> file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = (read_json(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object (tensor name -> file)")
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


# safetensors dtypes its numpy reader lacks, read from the raw bytes: e4m3 weights and E8M0
# scales (one exponent byte each, decoded by dequantize_fp8)
RAW_DTYPES = {"F8_E4M3": FP8, "F8_E8M0": np.dtype(np.uint8)}


def _read_raw(file: str, header: dict, name: str) -> np.ndarray:
    """A tensor straight from the safetensors layout: an 8-byte little-endian header length,
    the JSON header (each tensor's dtype, shape and byte range after the header), the data."""
    info = header[name]
    begin, end = info["data_offsets"]
    with open(file, "rb") as f:
        f.seek(header["__start__"] + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


def _header(file: str) -> dict:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {**json.loads(f.read(n)), "__start__": 8 + n}


def dequantize_fp8(q: np.ndarray, scale: np.ndarray, name: str,
                   block: tuple[int, int] | None = None) -> np.ndarray:
    """An FP8 weight (float8_e4m3fn [out, in]) and its scale -> float32: each value times its
    block's scale. Transformers' "fp8" quant_method (Qwen3-*-FP8, DeepSeek) stores
    `weight_scale_inv` per block (despite the name, the multiplier); compressed-tensors stores
    `weight_scale` per tensor ([1] or []), per output channel ([out, 1]: blocks of one row) or
    per block.

    block: config.json's `weight_block_size`; the scale grid is then the weight's shape over it,
    rounded up (edge blocks are partial: DeepSeek's 576-row projections at 128). Without it, a
    scalar scale is one block, else the grid must divide the weight. E8M0 scales (uint8)
    mean 2**(byte - 127)."""
    scale = np.asarray(scale)
    s = np.exp2(scale.astype(np.float32) - 127) if scale.dtype == np.uint8 else \
        scale.astype(np.float32)
    rows, cols = q.shape
    if s.size == 1:
        return q.astype(np.float32) * s.reshape(())
    if block is not None:
        bm, bn = block
        grid = (-(-rows // bm), -(-cols // bn))
    elif s.ndim == 2 and rows % s.shape[0] == 0 and cols % s.shape[1] == 0:
        bm, bn = rows // s.shape[0], cols // s.shape[1]
        grid = s.shape
    else:
        grid = None
    if grid is None or s.shape != tuple(grid):
        raise ValueError(f"{name}: weight {q.shape} with scale {tuple(scale.shape)} is not a "
                         f"grid of {'blocks ' + str(tuple(block)) if block else 'whole blocks'}")
    full = np.repeat(np.repeat(s, bm, axis=0), bn, axis=1)[:rows, :cols]
    return q.astype(np.float32) * full


FP8_LAYOUTS = ("transformers' fine-grained FP8 (quant_method 'fp8': weight + weight_scale_inv)",
               "compressed-tensors FP8 (quant_method 'compressed-tensors', format "
               "'float-quantized': weight + weight_scale per tensor, channel or block)")


def fp8_scheme(quant: dict, path: str) -> tuple[str, tuple[int, int] | None]:
    """(scale tensor suffix, block shape or None) of a checkpoint's quantization_config; {} is an
    unquantized checkpoint. Raises for anything else, naming the value and what is supported.

    compressed-tensors FP8 is what llm-compressor writes (RedHatAI's *-FP8 / *-FP8-dynamic
    models): its `input_activations` (dynamic per token, or static `input_scale`) are not read;
    weights are dequantized at load like every FP8 layout, and `quantization="fp8"` then
    quantizes the activations per token on the fly."""
    method = quant.get("quant_method")
    if method is None:
        return "_scale_inv", None
    if method == "fp8":
        block = quant.get("weight_block_size")
        return "_scale_inv", tuple(block) if block else None
    if method != "compressed-tensors":  # GPTQ, AWQ, bitsandbytes, fbgemm_fp8, ...
        raise ValueError(f"{path}: quantization_config.quant_method={method!r} is not supported; "
                         f"supported: unquantized checkpoints, {'; '.join(FP8_LAYOUTS)}. To "
                         "quantize at load, pass an unquantized checkpoint with quantization="
                         "'fp8' / 'fp8-weight-only' / 'int8'")
    if quant.get("sparsity_config"):
        raise ValueError(f"{path}: compressed-tensors sparsity_config "
                         f"{quant['sparsity_config'].get('format')!r} is not supported; "
                         "supported: dense float-quantized FP8")
    blocks = set()
    for name, group in (quant.get("config_groups") or {}).items():
        fmt = group.get("format") or quant.get("format")
        w = group.get("weights") or {}
        strategy = w.get("strategy")
        scheme = (fmt, w.get("num_bits"), w.get("type"), w.get("symmetric"))
        if scheme != ("float-quantized", 8, "float", True) or \
                strategy not in ("tensor", "channel", "block"):
            raise ValueError(
                f"{path}: compressed-tensors group {name!r} (format {fmt!r}, weights "
                f"{w.get('num_bits')}-bit {w.get('type')!r}, symmetric={w.get('symmetric')}, "
                f"strategy {strategy!r}) is not supported; supported: format 'float-quantized', "
                "8-bit symmetric float weights per tensor, channel or block")
        if strategy == "block":
            blocks.add(tuple(w.get("block_structure") or ()))
    if len(blocks) > 1:
        raise ValueError(f"{path}: compressed-tensors groups with different block structures "
                         f"{sorted(blocks)}; supported: one")
    return "_scale", blocks.pop() if blocks else None


def load_hf_dir(path: str, dtype, shardings=None,
                fp8_scales: dict[str, np.ndarray] | None = None
                ) -> tuple[ModelConfig, dict[str, Any]]:
    """fp8_scales: if a dict, filled with {HF weight name: float32 [out] or None} for each FP8
    weight: its scale when stored one per tensor or per output channel, None for block scales.
    Every weight is dequantized; re-quantizing with these scales (`quant.quantize_loaded`) gives
    back the checkpoint's exact codes, where absmax scales per channel would round the e4m3
    values a second time (per-tensor checkpoints)."""
    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    cfg = ModelConfig.from_hf_file(config_path)
    quant = read_json(config_path).get("quantization_config") or {}
    suffix, block = fp8_scheme(quant, path)
    where = _safetensors_files(path)
    handles: dict[str, Any] = {}
    headers: dict[str, dict] = {}

    def get(name: str):
        x = read(name)
        if x.dtype == FP8:  # a pre-quantized checkpoint: dequantized here, once, on the host
            scale = name + suffix
            if scale not in where:
                raise ValueError(f"{path}: {name} is float8_e4m3fn but {scale} is missing; "
                                 f"supported FP8 layouts: {'; '.join(FP8_LAYOUTS)}")
            s = np.asarray(read(scale))
            if fp8_scales is not None:  # every FP8 weight; its scale when one per output row
                exact = s.dtype != np.uint8 and (s.size == 1 or s.shape == (x.shape[0], 1))
                fp8_scales[name] = (np.broadcast_to(s.astype(np.float32).reshape(-1),
                                                    (x.shape[0],)).copy() if exact else None)
            x = dequantize_fp8(x, s, name, block)
        return x

    def read(name: str):
        file = where[name]
        if file not in handles:
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file}: listed in the index for {name} but missing")
            handles[file] = _open(file, safe_open)
        try:
            if handles[file].get_slice(name).get_dtype() in RAW_DTYPES:
                if file not in headers:  # safetensors' numpy reader has no float8
                    headers[file] = _header(file)
                return _read_raw(file, headers[file], name)
            return handles[file].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {name} ({e}); is the file truncated?") \
                from e

    return cfg, build_params(cfg, get, lambda n: n in where, path, dtype, shardings)
