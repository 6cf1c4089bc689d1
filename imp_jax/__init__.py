"""imp_jax: a functional LLM inference engine in JAX.

    import imp_jax
    outs = imp_jax.generate(["The capital of France is"], max_tokens=32)
    llm = imp_jax.LLM("smollm2-135m")

Heavy modules load on first use, so `import imp_jax` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "LLM": "imp_jax.llm",
    "generate": "imp_jax.llm",
    "SamplingParams": "imp_jax.sampling",
    "RequestOutput": "imp_jax.engine.llm_engine",
    "CompletionOutput": "imp_jax.engine.llm_engine",
    "ModelConfig": "imp_jax.config",
    "make_mesh": "imp_jax.sharding",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from imp_jax.config import ModelConfig
    from imp_jax.engine.llm_engine import CompletionOutput, RequestOutput
    from imp_jax.llm import LLM, generate
    from imp_jax.sampling import SamplingParams
    from imp_jax.sharding import make_mesh


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imp_jax' has no attribute {name!r}")
