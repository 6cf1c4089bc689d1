"""Tensor and data parallelism: a ("dp", "tp") device mesh, logical-axis rules, placement.

Every array already carries logical axis names in `spec.py` ("vocab", "embed", "heads",
"kv_heads", "head_dim", "mlp"; the KV pools ("pages", None, "kv_heads", "head_dim")). A
`ShardingRules` maps each logical axis to a mesh axis (or None = replicated); everything else
follows from that table:

    from imp_jax import sharding
    mesh = sharding.make_mesh(tp=4)                    # axes ("dp", "tp"), 1 x 4
    rules = sharding.tensor_parallel()                 # Megatron
    sharding.shard_runner(runner, mesh, rules)         # params + cache re-placed, step re-jitted
    print(sharding.memory_plan(cfg, "tp=4", rules, dtype="bfloat16", kv_pages=4096, page_size=16))

Megatron tensor parallelism (`tensor_parallel()`): q/k/v are split by heads (column parallel),
o by heads (row parallel: one all-reduce of [T, embed] after it), gate/up by mlp (column), down by
mlp (row: one all-reduce after it), embedding and lm_head by vocab. Norm scales and everything on
"embed"/"head_dim" are replicated. Attention itself needs no communication: each device owns
whole heads and the KV pages of the KV heads those query heads read.

KV heads when tp > num_kv_heads (`ShardingRules.kv_heads_fallback`):
  "repeat" (default) -- when tp is a multiple of num_kv_heads, each KV head is repeated
      r = tp / num_kv_heads times (k/v kernels, biases and the cache), which is exactly the same
      model with num_kv_heads = tp: query head h reads repeated head h // (H/tp), a copy of the
      original head h // (H/kv). Each device then holds ONE KV head -- its own query heads' -- of
      weights and cache, computes no K/V it does not read, and attention stays local. This is
      what vLLM does. Costs: the effective config differs (`effective_config`), and the global
      (logical) cache holds r copies, but per device it is 1/kv of the fully replicated layout.
  "replicate" -- keep num_kv_heads and replicate the kv_heads axis on every device (every device
      computes and stores all KV heads). Simple, also the fallback when neither divides the other.
  "error" -- refuse, naming the array and axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imp_jax.cache import POOL_FILLS, is_quantized, scale_pool_shape
from imp_jax.config import ModelConfig
from imp_jax.spec import ArraySpec, get_path, kv_page_spec, map_specs, param_specs

MESH_AXES = ("dp", "tp")
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "pages", "batch")
KV_FALLBACKS = ("repeat", "replicate", "error")

MeshAxes = str | tuple[str, ...] | None


# ----------------------------------------------------------------------------------- the mesh


def make_mesh(tp: int | None = None, dp: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ("dp", "tp") over `devices` (default: every device of every process).

    Defaults: all devices on "tp". Given one of tp/dp the other is what remains. "tp" is the
    minor (fastest-varying) axis, and devices are ordered by (process, id), so a tp group stays
    inside one host whenever tp <= devices per host: the per-layer all-reduces never cross hosts.
    """
    explicit = devices is not None
    devices = list(devices) if explicit else list(jax.devices())
    n = len(devices)
    for name, value in (("tp", tp), ("dp", dp)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"mesh {name} must be a positive integer, got {value!r}")
    if tp is None and dp is None:
        tp, dp = n, 1
    elif tp is None:
        if n % dp:
            raise ValueError(f"mesh dp={dp} does not divide the {n} visible devices")
        tp = n // dp
    elif dp is None:
        if n % tp:
            raise ValueError(f"mesh tp={tp} does not divide the {n} visible devices; pass dp= "
                             f"or devices=jax.devices()[:{tp}]")
        dp = n // tp
    need = tp * dp
    if need > n:
        raise ValueError(f"mesh tp={tp} x dp={dp} needs {need} devices, {n} visible")
    if need != n:
        hint = "" if explicit else f"; pass devices=jax.devices()[:{need}] to use a subset"
        raise ValueError(f"mesh tp={tp} x dp={dp} uses {need} devices but {n} are "
                         f"{'given' if explicit else 'visible'}{hint}")
    if not explicit:
        devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(dp, tp), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """'tp=4', 'tp=2,dp=4', 'tp=2xdp=4' -> {'tp': 4} / {'tp': 2, 'dp': 4}: only the axes given,
    so `make_mesh(**parse_mesh(s))` fills the other from the visible devices."""
    out = {}
    for part in re.split(r"[,x ]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(tp|dp)=(\d+)", part)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"bad mesh spec {text!r}: expected e.g. 'tp=4' or 'tp=2,dp=4'")
        out[m.group(1)] = int(m.group(2))
    if not out:
        raise ValueError(f"bad mesh spec {text!r}: expected e.g. 'tp=4' or 'tp=2,dp=4'")
    return out


def _mesh_shape(mesh: Mesh | Mapping[str, int] | str) -> dict[str, int]:
    if isinstance(mesh, Mesh):
        return dict(mesh.shape)
    if isinstance(mesh, str):
        return {"tp": 1, "dp": 1, **parse_mesh(mesh)}
    return {"tp": 1, "dp": 1, **dict(mesh)}


# ----------------------------------------------------------------------------------- the rules


@dataclasses.dataclass
class ShardingRules:
    """Logical axis -> mesh axis (a name, a tuple of names, or None = replicated).

    Edit freely: `rules.axes["vocab"] = None` keeps embedding and lm_head replicated.
    Logical axes: "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp" (weights), "pages"
    (the KV pools' page axis) and "batch" (the step's flat token axis T). Unknown names and
    mesh axes the mesh lacks are errors; an axis missing from the table is replicated.
    """

    axes: dict[str, MeshAxes] = dataclasses.field(default_factory=dict)
    kv_heads_fallback: str = "repeat"  # see the module docstring

    def __post_init__(self):
        unknown = set(self.axes) - set(LOGICAL_AXES)
        if unknown:
            raise ValueError(f"unknown logical axes {sorted(unknown)}; known: {LOGICAL_AXES}")
        if self.kv_heads_fallback not in KV_FALLBACKS:
            raise ValueError(f"kv_heads_fallback must be one of {KV_FALLBACKS}, got "
                             f"{self.kv_heads_fallback!r}")

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        target = self.axes.get(logical)
        if target is None:
            return ()
        return (target,) if isinstance(target, str) else tuple(target)

    def replace(self, **axes: MeshAxes) -> "ShardingRules":
        return dataclasses.replace(self, axes={**self.axes, **axes})


def tensor_parallel(kv_heads_fallback: str = "repeat") -> ShardingRules:
    """Megatron TP on "tp" (heads, kv_heads, mlp, vocab) and the token batch on "dp".

    On a dp=1 mesh this is plain TP; on a dp>1 mesh it is TP x DP.
    """
    return ShardingRules({"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp",
                          "batch": "dp"}, kv_heads_fallback)


def tp_dp(kv_heads_fallback: str = "repeat") -> ShardingRules:
    """TP x DP: the same table as `tensor_parallel()` (named for readability)."""
    return tensor_parallel(kv_heads_fallback)


def data_parallel() -> ShardingRules:
    """Weights and KV cache replicated, the step's tokens split over "dp"."""
    return ShardingRules({"batch": "dp"})


def _axis_size(mesh_shape: Mapping[str, int], names: tuple[str, ...]) -> int:
    return math.prod(mesh_shape[a] for a in names)


def _check_axes_exist(rules: ShardingRules, mesh_shape: Mapping[str, int]) -> None:
    for logical, target in rules.axes.items():
        for a in rules.mesh_axes(logical):
            if a not in mesh_shape:
                raise ValueError(f"sharding rule {logical!r} -> {target!r}: the mesh has no axis "
                                 f"{a!r} (axes: {tuple(mesh_shape)})")


def _desc(mesh_shape, names) -> str:
    return " x ".join(f"{a}={mesh_shape[a]}" for a in names)


def partition_spec(name: str, spec: ArraySpec, mesh_shape: Mapping[str, int],
                   rules: ShardingRules) -> P:
    """The PartitionSpec of one array; raises naming the array and axis when a size does not
    divide. A kv_heads axis that does not divide is replicated unless kv_heads_fallback='error'
    (use `effective_config` first to get the 'repeat' layout)."""
    parts, used = [], {}
    for size, logical in zip(spec.shape, spec.axes):
        names = rules.mesh_axes(logical)
        n = _axis_size(mesh_shape, names) if names else 1
        if n == 1:
            parts.append(None)
            continue
        if size % n:
            if logical == "kv_heads" and rules.kv_heads_fallback != "error":
                parts.append(None)  # replicated KV heads (see the module docstring)
                continue
            raise ValueError(f"{name} axis {logical!r} (size {size}) is not divisible by "
                             f"{_desc(mesh_shape, names)}")
        for a in names:
            if a in used:
                raise ValueError(f"{name}: mesh axis {a!r} is used by both {used[a]!r} and "
                                 f"{logical!r}; an array can be split over a mesh axis once")
            used[a] = logical
        parts.append(names[0] if len(names) == 1 else names)
    return P(*parts)


# ------------------------------------------------------------------ KV heads when tp > kv_heads


def kv_repeat(cfg: ModelConfig, mesh: Mesh | Mapping[str, int] | str,
              rules: ShardingRules) -> int:
    """How many times each KV head is repeated under `rules` (1 = not at all)."""
    shape = _mesh_shape(mesh)
    names = rules.mesh_axes("kv_heads")
    n = _axis_size(shape, names) if names else 1
    kv, h = cfg.num_kv_heads, cfg.num_heads
    if (rules.kv_heads_fallback != "repeat" or n <= kv or n % kv or h % n
            or rules.mesh_axes("heads") != names):
        return 1
    return n // kv


def effective_config(cfg: ModelConfig, mesh, rules: ShardingRules) -> ModelConfig:
    """`cfg` as it runs under `rules`: num_kv_heads * kv_repeat (the 'repeat' layout)."""
    r = kv_repeat(cfg, mesh, rules)
    return cfg if r == 1 else dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)


def repeat_kv_params(params: dict[str, Any], cfg: ModelConfig, r: int) -> dict[str, Any]:
    """Repeat every KV head r times (consecutively) in the k/v kernels and biases."""
    if r == 1:
        return params

    def go(path, spec, leaf):
        if "kv_heads" not in spec.axes:
            return leaf
        axis = spec.axes.index("kv_heads")
        if hasattr(leaf, "q") and hasattr(leaf, "scale"):  # quant.QuantArray (codes K-major)
            return dataclasses.replace(leaf, q=_repeat(leaf.q, r, leaf.axes.index(axis)),
                                       scale=_repeat(leaf.scale, r, axis)
                                       if leaf.scale.shape[axis] > 1 else leaf.scale)
        return _repeat(leaf, r, axis)

    return _map_with_params(go, param_specs(cfg), params)


def _repeat(x, r: int, axis: int):
    return np.repeat(np.asarray(x), r, axis=axis)


def _map_with_params(fn, specs, params, path=()):
    if isinstance(specs, ArraySpec):
        return fn(path, specs, params)
    missing = set(specs) - set(params)
    if missing:
        raise ValueError(f"params lack {sorted('/'.join(path + (k,)) for k in missing)}")
    return {k: _map_with_params(fn, specs[k], params[k], path + (k,)) for k in specs}


# ----------------------------------------------------------------------------- shardings


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None):
    """NamedSharding tree with the structure of `param_specs(cfg)` (validated up front).

    Pass the config the params actually have: `effective_config(cfg, mesh, rules)` when KV
    heads are repeated.
    """
    rules = rules or tensor_parallel()
    shape = dict(mesh.shape)
    _check_axes_exist(rules, shape)
    return map_specs(lambda path, s: NamedSharding(
        mesh, partition_spec("/".join(path), s, shape, rules)), param_specs(cfg))


def cache_sharding(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None,
                   num_pages: int = 2, page_size: int = 16) -> NamedSharding:
    """Sharding of one layer's K (or V) pool [pages, page_size, kv_heads, head_dim]."""
    rules = rules or tensor_parallel()
    shape = dict(mesh.shape)
    _check_axes_exist(rules, shape)
    return NamedSharding(mesh, partition_spec("kv_pages", kv_page_spec(num_pages, page_size, cfg),
                                              shape, rules))


def cache_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None,
                    num_pages: int = 2, page_size: int = 16, quantized: bool = False):
    """A KVCache-shaped tree of shardings (every layer's k and v pool, and for 8-bit pools
    their k_scale / v_scale pools)."""
    from imp_jax.cache import KVCache

    s = cache_sharding(cfg, mesh, rules, num_pages, page_size)
    L = cfg.num_layers
    if not quantized:
        return KVCache(k=[s] * L, v=[s] * L)
    ss = scale_sharding(s)
    return KVCache(k=[s] * L, v=[s] * L, k_scale=[ss] * L, v_scale=[ss] * L)


def scale_sharding(pool: NamedSharding) -> NamedSharding:
    """An 8-bit pool's scales [pages, kv_heads, page] are split like the pool
    [pages, page, kv_heads, head_dim] itself: each device keeps the scales of the K/V it
    holds."""
    return NamedSharding(pool.mesh, scale_spec(pool.spec))


def scale_spec(pool_spec: P) -> P:
    """A pool's PartitionSpec [pages, page, kv_heads, head_dim] -> its scale pool's
    [pages, kv_heads, page] (the same axes in the scales' order, without head_dim)."""
    spec = tuple(pool_spec) + (None,) * (4 - len(pool_spec))
    return P(spec[0], spec[2], spec[1])


def batch_sharding(mesh: Mesh, rules: ShardingRules, n: int) -> NamedSharding:
    """Sharding of a [n] per-token array: split over the "batch" mesh axes when n divides."""
    names = rules.mesh_axes("batch")
    size = _axis_size(dict(mesh.shape), names) if names else 1
    if size == 1 or n % size:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(names[0] if len(names) == 1 else names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- placement


def place(x, sharding: NamedSharding) -> jax.Array:
    """device_put that also works when `sharding` spans processes (multi-host): every process
    passes the same full value and keeps only its own shards."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def leaf_shardings(sharding: NamedSharding, leaf):
    """The sharding(s) of a param leaf placed by its weight's `sharding`: a QuantArray gets a
    QuantArray of shardings (its codes' dims in their stored order, its scale's size-1 dims
    replicated), a plain array `sharding`."""
    if not (hasattr(leaf, "q") and hasattr(leaf, "scale")):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (leaf.scale.ndim - len(sharding.spec))
    sspec = P(*[None if leaf.scale.shape[i] == 1 else spec[i] for i in range(leaf.scale.ndim)])
    return dataclasses.replace(leaf, q=NamedSharding(sharding.mesh, P(*[spec[d] for d in
                                                                        leaf.axes])),
                               scale=NamedSharding(sharding.mesh, sspec))


def _place_leaf(leaf, sharding: NamedSharding):
    target = leaf_shardings(sharding, leaf)
    if target is sharding:
        return place(leaf, sharding)
    return dataclasses.replace(leaf, q=place(leaf.q, target.q), scale=place(leaf.scale,
                                                                           target.scale))


def shard_params(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh,
                 rules: ShardingRules | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Validate, repeat KV heads if the rules say so, and device_put every array into its
    NamedSharding. Returns (the effective config, the placed params)."""
    rules = rules or tensor_parallel()
    eff = effective_config(cfg, mesh, rules)
    shardings = param_shardings(eff, mesh, rules)  # validates before anything moves
    params = repeat_kv_params(params, cfg, eff.num_kv_heads // cfg.num_kv_heads)
    return eff, _map_with_params(lambda path, _, leaf: _place_leaf(leaf,
                                                                  get_path(shardings, path)),
                                 param_specs(eff), params)


def sharded_full(shape, dtype, sharding: NamedSharding, value: float = 0) -> jax.Array:
    """An array of `value` created directly in its shards (no full-size host or device-0
    copy)."""
    return _fill_fn(tuple(shape), jnp.dtype(dtype), sharding, value)()


@functools.lru_cache(maxsize=64)
def _fill_fn(shape, dtype, sharding, value):  # one compile per pool shape, not one per layer
    return jax.jit(lambda: jnp.full(shape, value, dtype), out_shardings=sharding)


# ----------------------------------------------------------------------------- the runner


@dataclasses.dataclass
class ShardingPlan:
    mesh: Mesh
    rules: ShardingRules
    cfg: ModelConfig  # the effective config (KV heads repeated)
    cache: Any  # KVCache of NamedShardings


def sharded_model_class():
    """`Transformer` plus sharding constraints at its boundary (built lazily: flax import).

    Inputs: the token axis split over the "batch" mesh axes (a local slice of the host arrays,
    no communication), the cache pinned to its sharding. Outputs: the cache pinned again (so the
    donated buffers are updated in place, never resharded) and the logits replicated (every
    process can read them; sampling runs on them). Everything inside is left to GSPMD's
    propagation from the committed param shardings, which gives the Megatron pattern.
    A flax module is a static jit argument, so the mesh and specs are stored hashable.
    """
    global _ShardedTransformer
    if _ShardedTransformer is not None:
        return _ShardedTransformer
    from imp_jax.cache import KVCache
    from imp_jax.models.llama import Transformer

    class ShardedTransformer(Transformer):
        mesh: Any = None
        cache_spec: Any = None  # PartitionSpec of every KV pool
        batch_axes: tuple = ()  # mesh axes of the token axis
        vocab_axes: tuple = ()  # mesh axes of the vocab axis (embedding / lm_head)

        def token_sharding(self, n: int) -> NamedSharding:
            """Where a step's n tokens live: split over the batch axes when they divide n.
            The runner commits host tokens here and the decode loop leaves its last tokens
            here, so a block fed from the previous one hits the program warm-up compiled (jit
            keys its cache on the inputs' shardings; a numpy input has none)."""
            size = _axis_size(dict(self.mesh.shape), self.batch_axes) if self.batch_axes else 1
            split = size > 1 and n % size == 0
            return NamedSharding(self.mesh, P(self.batch_axes) if split else P())

        def __call__(self, tokens, positions, cache, meta):
            wsc = jax.lax.with_sharding_constraint
            bsh = self.token_sharding(tokens.shape[0])
            if bsh.spec != P():
                tokens, positions = wsc(tokens, bsh), wsc(positions, bsh)
                meta = dataclasses.replace(meta, slot_mapping=wsc(meta.slot_mapping, bsh))
            csh = NamedSharding(self.mesh, self.cache_spec)
            ssh = scale_sharding(csh)

            def pin(c):  # pages, then scales (8-bit pools only)
                return KVCache(*([wsc(a, sh) for a in pool]
                                 for pool, sh in zip(c.pools(), (csh, csh, ssh, ssh))))
            logits, cache = super().__call__(tokens, positions, pin(cache), meta)
            # Pin the logits vocab-split first (as the lm_head leaves them), then gather: without
            # the first constraint GSPMD may all-gather the lm_head *weight* instead.
            if self.vocab_axes:
                logits = wsc(logits, NamedSharding(self.mesh, P(None, self.vocab_axes)))
            return wsc(logits, NamedSharding(self.mesh, P())), pin(cache)

    _ShardedTransformer = ShardedTransformer
    return ShardedTransformer


_ShardedTransformer = None


def sharded_model(model, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules):
    """A `Transformer` like `model` (dtype, attn_impl) for `cfg`, constrained to `mesh`."""
    cache_spec = cache_sharding(cfg, mesh, rules).spec
    vocab = rules.mesh_axes("vocab")
    divides = vocab and cfg.vocab_size % _axis_size(dict(mesh.shape), vocab) == 0
    vocab_axes = vocab if divides else ()
    # Attention per device under shard_map when the KV pools are split over the same mesh axes
    # as the query heads (so each device holds the KV heads its query heads read); with
    # replicated pools it is left to GSPMD.
    heads = tuple(rules.mesh_axes("heads") or ())
    kv = cache_spec[2] if len(cache_spec) > 2 else None
    kv = (kv,) if isinstance(kv, str) else tuple(kv or ())
    heads_axis = (heads[0] if len(heads) == 1 else heads) if heads and kv == heads else None
    return sharded_model_class()(cfg, model.dtype, model.attn_impl,
                                 attn_mesh=mesh if heads_axis else None,
                                 attn_heads_axis=heads_axis, mesh=mesh,
                                 cache_spec=cache_spec, batch_axes=rules.mesh_axes("batch"),
                                 vocab_axes=vocab_axes)


def shard_runner(runner, mesh: Mesh, rules: ShardingRules | None = None, *,
                 keep_cache: bool = False, num_pages: int | None = None,
                 page_size: int | None = None, cache_dtype=None):
    """Re-place a `ModelRunner`'s params and KV cache on `mesh` and swap its model for one whose
    boundary carries the shardings. Returns the runner (modified in place; `runner.sharding` is
    the plan). The runner's own jitted step then compiles one SPMD program: params and cache are
    committed to their NamedShardings and the model pins tokens / cache / logits.

    The step's contract is unchanged: host arrays in, sampled tokens / logits out (replicated,
    so every process can read them), the cache donated and kept in its sharding.

    The new cache is created zero-filled directly in its shards; `keep_cache=True` moves the
    current contents instead (through the host: KV heads may be repeated). `runner.cache` may be
    None (a runner built for a mesh never allocates an unsharded pool): pass num_pages,
    page_size and cache_dtype then.
    """
    from imp_jax.cache import KVCache

    rules = rules or tensor_parallel()
    cfg = runner.cfg
    eff, params = shard_params(runner.params, cfg, mesh, rules)
    r = eff.num_kv_heads // cfg.num_kv_heads
    old = runner.cache
    num_pages = num_pages or old.num_pages
    page_size = page_size or old.page_size
    dtype = jnp.dtype(cache_dtype) if cache_dtype is not None else old.k[0].dtype
    quantized = is_quantized(dtype)  # 8-bit pages + f32 scale pools, split alike
    csh = cache_shardings(eff, mesh, rules, num_pages, page_size, quantized)
    shape = kv_page_spec(num_pages, page_size, eff).shape
    if keep_cache and old is not None:
        have = (old.k[0].dtype, old.num_pages, old.page_size)
        if have != (dtype, num_pages, page_size):
            raise ValueError(f"keep_cache=True moves the cache as it is ({have[0].name}, "
                             f"{have[1]} pages of {have[2]}); it cannot become "
                             f"{dtype.name}, {num_pages} pages of {page_size}: pass "
                             "keep_cache=False for a new cache")
        # KV heads are axis 2 of the pages [P, page, KVH, D], axis 1 of the scales [P, KVH, page]
        move = lambda pool, sh, ax: place(_repeat(pool, r, ax) if r > 1 else pool, sh)  # noqa
        cache = KVCache(*([move(p, s, ax) for p, s in zip(pools, shs, strict=True)]
                          for pools, shs, ax in zip(old.pools(), csh.pools(), (2, 2, 1, 1),
                                                    strict=False)))
    else:
        runner.cache = old = None  # free the unsharded pool before allocating the shards
        # the fresh contents KVCache.create makes (POOL_FILLS), created in their shards
        scales = scale_pool_shape(shape)
        kinds = ((shape, dtype), (shape, dtype), (scales, jnp.float32), (scales, jnp.float32))
        cache = KVCache(*([sharded_full(shp, dt, s, v) for s in shs]
                          for shs, (shp, dt), v in zip(csh.pools(), kinds, POOL_FILLS)))
    runner.params, runner.cache = params, cache
    runner.model = sharded_model(runner.model, eff, mesh, rules)
    runner.sharding = ShardingPlan(mesh, rules, eff, csh)
    return runner


# ----------------------------------------------------------------------------- inspection


class _Captured(Exception):
    pass


def _step_target(runner):
    """(owner, attribute) of the jitted step `runner.step` calls."""
    if "_step" in vars(runner):  # a per-runner jit
        return runner, "_step"
    import imp_jax.runner as runner_module

    return runner_module, "_forward"


def step_args(runner, seqs, sampling=None, num_logprobs: int = 0):
    """The (args, kwargs) `runner.step(seqs, ...)` would pass to its jitted step (no run)."""
    captured = {}
    owner, attr = _step_target(runner)
    real = getattr(owner, attr)

    def spy(*args, **kwargs):
        captured["call"] = (args, kwargs)
        raise _Captured

    setattr(owner, attr, spy)
    try:
        runner.step(seqs, sampling, num_logprobs)
    except _Captured:
        pass
    finally:
        setattr(owner, attr, real)
    return captured["call"]


def step_hlo(runner, seqs, sampling=None, num_logprobs: int = 0) -> str:
    """The compiled (post-SPMD-partitioning) HLO text of the step `runner.step(seqs)` runs."""
    args, kwargs = step_args(runner, seqs, sampling, num_logprobs)
    owner, attr = _step_target(runner)
    return getattr(owner, attr).lower(*args, **kwargs).compile().as_text()


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) +
                    r")(?:-start)?\(", re.M)


def collectives(hlo_text: str) -> list[tuple[str, str]]:
    """[(op, result type)] of every collective in compiled HLO text (async pairs counted once)."""
    return [(m.group(2), m.group(1)) for m in _INSTR.finditer(hlo_text)]


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = {op: 0 for op in COLLECTIVES}
    for op, _ in collectives(hlo_text):
        counts[op] += 1
    return counts


def weight_all_gathers(hlo_text: str, params) -> list[str]:
    """all-gathers whose result has the full shape of some weight (weights gathered at run time).
    Returns the offending HLO result types; empty is the Megatron expectation."""
    dims = {tuple(np.shape(x)) for x in jax.tree.leaves(params) if np.ndim(x) >= 2}
    bad = []
    for op, ty in collectives(hlo_text):
        if op != "all-gather":
            continue
        for m in re.finditer(r"[a-z]\w*\[([\d,]*)\]", ty):
            shp = tuple(int(d) for d in m.group(1).split(",") if d)
            if shp in dims:
                bad.append(ty)
    return bad


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict[str, int]
    kv_repeat: int
    params_bytes: int  # per device
    cache_bytes: int  # per device
    params_bytes_total: int  # unsharded, one copy
    cache_bytes_total: int  # one copy of the logical cache (before KV repeats)
    largest: list[tuple[str, int]]  # the biggest per-device arrays
    kv_bytes_per_token: int  # per device, all layers, K and V

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.cache_bytes

    def __str__(self) -> str:
        gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"mesh {mesh}" + (f", KV heads repeated x{self.kv_repeat}"
                                   if self.kv_repeat > 1 else ""),
                 f"  params per device: {gib(self.params_bytes)} "
                 f"(of {gib(self.params_bytes_total)} unsharded)",
                 f"  kv cache per device: {gib(self.cache_bytes)} "
                 f"(of {gib(self.cache_bytes_total)} unsharded)",
                 f"  kv per token per device: {self.kv_bytes_per_token / 1024:.1f} KiB",
                 f"  total per device: {gib(self.total_bytes)}"]
        return "\n".join(lines)


def _shard_numel(shape, pspec: P, mesh_shape) -> int:
    n = 1
    for i, size in enumerate(shape):
        part = pspec[i] if i < len(pspec) else None
        names = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        n *= size // (_axis_size(mesh_shape, names) if names else 1)
    return n


def memory_plan(cfg: ModelConfig, mesh: Mesh | Mapping[str, int] | str,
                rules: ShardingRules | None = None, dtype=jnp.bfloat16, kv_pages: int = 0,
                page_size: int = 16, cache_dtype=None) -> MemoryPlan:
    """Per-device bytes of params and KV cache under `rules` on `mesh`.

    `mesh` may be a Mesh, a {"tp": 4, "dp": 2} mapping or a "tp=4" string, so a plan can be made
    for hardware that is not attached (`imp-jax info MODEL --mesh tp=4`). Raises like
    `param_shardings` when a layout does not divide. Quantized weights are not modelled
    (itemsize of `dtype` for every weight).
    """
    from imp_jax.cache import KVCache

    rules = rules or tensor_parallel()
    shape = _mesh_shape(mesh)
    _check_axes_exist(rules, shape)
    item = jnp.dtype(dtype).itemsize
    citem = jnp.dtype(cache_dtype or dtype).itemsize
    eff = effective_config(cfg, shape, rules)
    per_array = []

    def visit(path, spec):
        name = "/".join(path)
        n = _shard_numel(spec.shape, partition_spec(name, spec, shape, rules), shape)
        per_array.append((name, n * item))

    map_specs(visit, param_specs(eff))
    pool = kv_page_spec(max(kv_pages, 1), page_size, eff)
    pspec = partition_spec("kv_pages", pool, shape, rules)
    pool_bytes = _shard_numel(pool.shape, pspec, shape) * citem
    if is_quantized(cache_dtype or dtype):  # + an f32 scale per token and KV head
        pool_bytes += _shard_numel(scale_pool_shape(pool.shape), scale_spec(pspec), shape) * 4
    cache = 2 * eff.num_layers * pool_bytes if kv_pages else 0
    per_token = 2 * eff.num_layers * pool_bytes // (max(kv_pages, 1) * page_size)
    total_params = sum(math.prod(s.shape) for s in jax.tree.leaves(
        param_specs(cfg), is_leaf=lambda x: isinstance(x, ArraySpec))) * item
    total_cache = kv_pages * page_size * KVCache.bytes_per_token(cfg, cache_dtype or dtype)
    return MemoryPlan(dict(shape), eff.num_kv_heads // cfg.num_kv_heads,
                      sum(b for _, b in per_array), cache, total_params, total_cache,
                      sorted(per_array, key=lambda t: -t[1])[:5], per_token)


def split_dp(mesh: Mesh) -> list[Mesh]:
    """One ("dp"=1, "tp") sub-mesh per dp rank: for engine-level data parallelism (one
    runner + scheduler + KV pool per replica, see docs/sharding.md)."""
    return [Mesh(mesh.devices[i:i + 1], MESH_AXES) for i in range(mesh.shape["dp"])]


__all__ = [
    "MESH_AXES", "LOGICAL_AXES", "make_mesh", "parse_mesh", "ShardingRules", "tensor_parallel",
    "tp_dp", "data_parallel", "partition_spec", "kv_repeat", "effective_config",
    "repeat_kv_params", "param_shardings", "cache_sharding", "cache_shardings", "scale_sharding",
    "batch_sharding",
    "replicated", "place", "shard_params", "sharded_full", "ShardingPlan", "shard_runner",
    "sharded_model", "step_args", "step_hlo", "collectives", "count_collectives",
    "weight_all_gathers", "MemoryPlan", "memory_plan", "split_dp",
]
