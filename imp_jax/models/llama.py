"""The Llama-family decoder as pure Flax modules.

One implementation serves Llama 2/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm) and
SmolLM2 (tied embeddings); `ModelConfig` flags choose. Parameter shapes come from `spec.py`, so
the module tree and the params pytree can never disagree. The forward pass is a pure function:

    logits, cache = Transformer(cfg).apply({"params": params}, tokens, positions, cache, meta)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.attention import paged_attention
from imp_jax.cache import AttentionMetadata, KVCache, write_kv
from imp_jax.config import ModelConfig, rope_inv_freq
from imp_jax.quant import PendingActivation, QuantArray, materialize
from imp_jax.spec import param_specs


def _spec_param(module: nn.Module, cfg: ModelConfig, name: str):
    """Declare the parameter `name` of `module` with the shape spec.py gives its path."""
    spec = _spec_of(module, cfg)[name]
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, QuantArray):  # codes stored K-major: Flax's check would compare
            if value.shape != spec.shape:  # q's shape, so check the weight's shape here
                raise ValueError(f"{'/'.join(module.scope.path + (name,))}: quantized weight "
                                 f"of shape {value.shape}, spec {spec.shape}")
            return value
    return module.param(name, lambda key: spec.initializer(key, jnp.float32))


def dense(x: jax.Array, w, dims: int = 1) -> jax.Array:
    """x[..., in...] @ w[in..., out...], contracting the last `dims` axes of x.

    Every matmul goes through here, so a quantized weight type only has to teach this function.
    x may be a PendingActivation (RMSNorm / SiLU-and-mul not yet run): a quantized weight may
    fuse its producer into the activations' quantization, anything else takes its value.
    """
    if hasattr(w, "quantized_dot"):  # quantized weights carry their own matmul
        return w.quantized_dot(x, dims)
    x = materialize(x)
    contract = (tuple(range(x.ndim - dims, x.ndim)), tuple(range(dims)))
    # Output in x's dtype: GEMMs accumulate in f32 and round once either way, but an f32
    # output makes a cuBLAS GEMM write f32 and XLA add a convert kernel after it (GPU profile,
    # session 8: ~1.4 ms of a 1024-row decode step).
    return jax.lax.dot_general(x, w.astype(x.dtype), (contract, ((), ())),
                               preferred_element_type=x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * w in float32, output in x.dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def silu_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU(gate) * up in float32, rounded once to gate.dtype."""
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _fused(name: str):
    """A fused producer + quantization kernel of pallas_kernels.fused_quant (imported when a
    W8A8 dot asks for one)."""
    from pallas_kernels import fused_quant

    return getattr(fused_quant, name)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, pending: bool = False):
        """pending: return a PendingActivation for matmuls (see `dense`), not the array."""
        scale, eps = _spec_param(self, self.cfg, "scale"), self.cfg.rms_norm_eps
        if not pending:
            return rms_norm(x, scale, eps)
        return PendingActivation(lambda: rms_norm(x, scale, eps),
                                 lambda interpret: _fused("rms_norm_quant")(
                                     x, scale, eps, interpret=interpret),
                                 x.shape, x.dtype)


def _spec_of(module: nn.Module, cfg: ModelConfig) -> dict:
    spec = param_specs(cfg)
    for key in module.scope.path:
        spec = spec[key]
    return spec


class Dense(nn.Module):
    """A matmul with the optional bias spec.py declares for it (Qwen2's q/k/v)."""

    cfg: ModelConfig
    dims: int = 1  # how many trailing input axes are contracted

    @nn.compact
    def __call__(self, x):
        y = dense(x, _spec_param(self, self.cfg, "kernel"), self.dims)
        if "bias" in _spec_of(self, self.cfg):
            y = y + _spec_param(self, self.cfg, "bias").astype(y.dtype)
        return y


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF `rotate_half` layout: x [T, heads, head_dim], positions [T].

    x * [cos, cos] + swap_halves(x) * [-sin, sin]: the halves are swapped by a flip, which
    fuses, instead of a concatenate of the rotated halves, which XLA ran as its own kernel on
    the GPU (the same arithmetic: x1 cos - x2 sin, x2 cos + x1 sin)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)  # [T, 1, D]
    x32 = x.astype(jnp.float32)
    T, H, D = x.shape
    swapped = jnp.flip(x32.reshape(T, H, 2, D // 2), axis=2).reshape(T, H, D)
    return (x32 * cos + swapped * sin).astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    attn_impl: str = "auto"
    attn_mesh: Any = None  # set by imp_jax.sharding: attention runs per device on its heads
    attn_heads_axis: Any = None

    @nn.compact
    def __call__(self, x, positions, pools: tuple, meta: AttentionMetadata):
        """pools: this layer's (k_pages, v_pages, k_scale, v_scale); scales None unless FP8."""
        cfg = self.cfg
        q = Dense(cfg, name="q")(x)  # [T, heads, head_dim]
        k = Dense(cfg, name="k")(x)  # [T, kv_heads, head_dim]
        v = Dense(cfg, name="v")(x)
        if cfg.qk_norm:  # Qwen3 normalises each head before the rotation
            q = RMSNorm(cfg, name="q_norm")(q)
            k = RMSNorm(cfg, name="k_norm")(k)
        inv_freq = rope_inv_freq(cfg)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        pools = write_kv(*pools[:2], k, v, meta.slot_mapping, *pools[2:])
        k_pages, v_pages, k_scale, v_scale = pools
        out = paged_attention(q, k_pages, v_pages, meta, scale=cfg.head_dim ** -0.5,
                              sliding_window=cfg.sliding_window, impl=self.attn_impl,
                              k_scale=k_scale, v_scale=v_scale, mesh=self.attn_mesh,
                              heads_axis=self.attn_heads_axis)
        return Dense(cfg, dims=2, name="o")(out), pools


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        gate = Dense(self.cfg, name="gate")(x)
        up = Dense(self.cfg, name="up")(x)
        h = PendingActivation(lambda: silu_mul(gate, up),
                              lambda interpret: _fused("silu_mul_quant")(
                                  gate, up, interpret=interpret),
                              gate.shape, gate.dtype)
        return Dense(self.cfg, name="down")(h)


class Block(nn.Module):
    cfg: ModelConfig
    attn_impl: str = "auto"
    attn_mesh: Any = None
    attn_heads_axis: Any = None

    @nn.compact
    def __call__(self, x, positions, pools, meta):
        with jax.named_scope("attention"):
            h, pools = Attention(self.cfg, self.attn_impl, self.attn_mesh, self.attn_heads_axis,
                                 name="attn")(
                RMSNorm(self.cfg, name="attn_norm")(x, pending=True), positions, pools, meta)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x, pending=True))
        return x, pools


class Transformer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32  # activation dtype
    attn_impl: str = "auto"
    attn_mesh: Any = None  # see Attention; imp_jax.sharding sets both
    attn_heads_axis: Any = None

    def token_sharding(self, n: int):
        """Where a step's n tokens live: None on one device (imp_jax.sharding's model names a
        NamedSharding, which the runner commits host tokens to)."""
        return None

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                 meta: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """tokens/positions int32[T] -> (float32 logits [N, vocab] at meta.logits_indices, cache)."""
        cfg = self.cfg
        embed = Embed(cfg, name="embed")
        x = embed(tokens).astype(self.dtype)
        layers = []
        for i in range(cfg.num_layers):
            with jax.named_scope(f"layer_{i}"):
                x, pools = Block(cfg, self.attn_impl, self.attn_mesh, self.attn_heads_axis,
                                 name=f"layers_{i}")(
                    x, positions, cache.layer(i), meta)
            layers.append(pools)
        k, v, k_scale, v_scale = (list(t) for t in zip(*layers))
        cache = KVCache(k, v, None if cache.k_scale is None else k_scale,
                        None if cache.k_scale is None else v_scale)
        x = RMSNorm(cfg, name="final_norm")(x[meta.logits_indices])
        with jax.named_scope("lm_head"):
            if cfg.tie_word_embeddings:
                logits = embed.attend(x)
            else:
                logits = Dense(cfg, name="lm_head")(x)
        return logits.astype(jnp.float32), cache


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.embedding = _spec_param(self, self.cfg, "embedding")

    def __call__(self, tokens):
        table = self.embedding
        if hasattr(table, "quantized_take"):
            return table.quantized_take(tokens)
        return jnp.take(table, tokens, axis=0)

    def attend(self, x):
        """Tied head: logits = x @ embedding.T."""
        table = self.embedding
        if hasattr(table, "quantized_dot_t"):
            return table.quantized_dot_t(x)
        return jax.lax.dot_general(x, table.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
