"""Tensor / data parallelism (imp_jax/sharding.py) on 8 fake CPU devices.

The checks need `--xla_force_host_platform_device_count=8` before jax starts, and the rest of the
suite imports jax with one device, so they run in ONE subprocess (`python tests/test_sharding.py
OUT.json`, shared start-up and compiles) that records a result per check; each pytest test below
asserts on its own entry. The multi-process check starts two more processes
(tests/multihost_worker.py) that join `jax.distributed` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")
PAGE = 4
ATOL = 2e-5

# (name, model, tp, dp, kv_heads_fallback): heads are 4 in every tiny checkpoint, kv_heads 2
# (llama3, qwen2, qwen3, smollm2) or 1 (mistral); "random8" is a random 8-head, 2-KV-head model.
CASES = [
    ("qwen3_tp2", "qwen3", 2, 1, "repeat"),  # kv heads split 2 ways; q/k norms, head_dim 32
    ("qwen2_tp4", "qwen2", 4, 1, "repeat"),  # tp > kv_heads: KV heads (and biases) x2
    ("qwen2_dp2", "qwen2", 1, 2, "repeat"),
    ("llama3_tp4_replicate", "llama3", 4, 1, "replicate"),  # tp > kv_heads: KV replicated
    ("mistral_tp4", "mistral", 4, 1, "repeat"),  # one KV head repeated x4
    ("smollm2_tp2_dp4", "smollm2", 2, 4, "repeat"),  # tied embeddings, all 8 devices
    ("random8_tp8", "random8", 8, 1, "repeat"),  # 8 heads on 8 devices, KV x4
]


# ======================================================================== the subprocess side


def _load(name):
    import jax
    import jax.numpy as jnp

    if name == "random8":
        from imp_jax.config import ModelConfig
        from imp_jax.spec import init_params

        cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8)
        return cfg, init_params(cfg, jax.random.key(3))
    from imp_jax.loaders.hf_dir import load_hf_dir

    return load_hf_dir(os.path.join(DATA, "tiny", name), jnp.float32)


def _runner(cfg, params, cache_dtype=None):
    from imp_jax.runner import ModelRunner

    return ModelRunner(cfg, params, num_pages=32, page_size=PAGE, max_model_len=64,
                       cache_dtype=cache_dtype)


def _run(runner, ids, n_new=5):
    """Teacher-forced logits of `ids` and the greedy continuation via the on-device sampler."""
    import numpy as np

    from imp_jax.runner import StepSeq
    from imp_jax.sampling import SamplingParams, SamplingTensors

    pages = list(range(1, 1 + -(-(len(ids) + n_new) // PAGE)))
    st = SamplingTensors.from_params([SamplingParams(temperature=0)], [0], [0])
    res = runner.step([StepSeq(ids, 0, pages, all_logits=True)], st)  # prefill: logits + sample
    logits = np.asarray(res.logits)[:len(ids)]
    out = [int(np.asarray(res.sample.tokens)[0])]
    start = len(ids)
    for _ in range(n_new - 1):
        res = runner.step([StepSeq([out[-1]], start, pages)], st)
        out.append(int(np.asarray(res.sample.tokens)[0]))
        start += 1
    return logits, out


def _mesh(tp, dp):
    import jax

    from imp_jax import sharding

    return sharding.make_mesh(tp=tp, dp=dp, devices=jax.devices()[:tp * dp])


def _expect_error(fn, *fragments):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        missing = [f for f in fragments if f not in msg]
        assert not missing, f"error {msg!r} lacks {missing}"
        return msg
    raise AssertionError(f"expected ValueError mentioning {fragments}")


def check_mesh():
    import jax

    from imp_jax import sharding

    assert len(jax.devices()) == 8
    m = sharding.make_mesh()
    assert m.axis_names == ("dp", "tp") and dict(m.shape) == {"dp": 1, "tp": 8}
    assert dict(sharding.make_mesh(dp=2).shape) == {"dp": 2, "tp": 4}
    assert dict(sharding.make_mesh(tp=2).shape) == {"dp": 4, "tp": 2}
    assert dict(sharding.make_mesh(tp=2, dp=2, devices=jax.devices()[:4]).shape) == \
        {"dp": 2, "tp": 2}
    _expect_error(lambda: sharding.make_mesh(tp=4, dp=4),
                  "mesh tp=4 x dp=4 needs 16 devices, 8 visible")
    _expect_error(lambda: sharding.make_mesh(tp=2, dp=2), "uses 4 devices but 8 are visible")
    _expect_error(lambda: sharding.make_mesh(tp=3), "tp=3 does not divide the 8 visible")
    _expect_error(lambda: sharding.make_mesh(tp=0), "positive integer")
    assert sharding.parse_mesh("tp=2xdp=4") == {"tp": 2, "dp": 4}
    assert sharding.parse_mesh("tp=4") == {"tp": 4}
    assert dict(sharding.make_mesh(**sharding.parse_mesh("tp=4")).shape) == {"dp": 2, "tp": 4}
    _expect_error(lambda: sharding.parse_mesh("pp=2"), "bad mesh spec")


def check_validation():
    import dataclasses

    from imp_jax import sharding

    cfg, _ = _load("llama3")
    bad = dataclasses.replace(cfg, num_heads=9, num_kv_heads=3)
    mesh2 = _mesh(2, 1)
    msgs = [_expect_error(lambda: sharding.param_shardings(bad, mesh2, sharding.tensor_parallel()),
                          "layers_0/attn/q/kernel axis 'heads' (size 9) is not divisible by tp=2")]
    # tp=8 on a 4-head checkpoint fails in shard_runner before anything is placed
    cfg4, params4 = _load("llama3")
    runner = _runner(cfg4, params4)
    msgs.append(_expect_error(lambda: sharding.shard_runner(runner, _mesh(8, 1)),
                              "axis 'heads' (size 4) is not divisible by tp=8"))
    assert runner.params is params4  # untouched
    # kv_heads_fallback="error" names the k kernel
    msgs.append(_expect_error(lambda: sharding.param_shardings(
        cfg4, _mesh(4, 1), sharding.tensor_parallel("error")),
        "layers_0/attn/k/kernel axis 'kv_heads' (size 2) is not divisible by tp=4"))
    msgs.append(_expect_error(lambda: sharding.param_shardings(
        cfg4, mesh2, sharding.ShardingRules({"heads": "model"})), "no axis 'model'"))
    msgs.append(_expect_error(lambda: sharding.param_shardings(
        cfg4, mesh2, sharding.tensor_parallel().replace(embed="tp")),
        "embed/embedding: mesh axis 'tp' is used by both 'vocab' and 'embed'"))
    msgs.append(_expect_error(lambda: sharding.ShardingRules({"hedas": "tp"}),
                              "unknown logical axes ['hedas']"))
    return msgs


def check_memory_plan():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imp_jax import sharding

    out = {}
    for model, tp, dp in [("llama3", 2, 1), ("llama3", 4, 1), ("smollm2", 2, 4), ("qwen2", 1, 2)]:
        cfg, params = _load(model)
        runner = _runner(cfg, params)
        mesh = _mesh(tp, dp)
        sharding.shard_runner(runner, mesh, sharding.tensor_parallel())
        dev = mesh.devices.flat[0]

        def on_dev(tree):
            return sum(s.data.nbytes for x in jax.tree.leaves(tree)
                       for s in x.addressable_shards if s.device == dev)

        plan = sharding.memory_plan(cfg, mesh, sharding.tensor_parallel(), jnp.float32,
                                    kv_pages=32, page_size=PAGE)
        assert plan.params_bytes == on_dev(runner.params), (plan, on_dev(runner.params))
        assert plan.cache_bytes == on_dev(runner.cache), (plan, on_dev(runner.cache))
        # the string form works without devices
        plan2 = sharding.memory_plan(cfg, f"tp={tp},dp={dp}", dtype=jnp.float32, kv_pages=32,
                                     page_size=PAGE)
        assert plan2.total_bytes == plan.total_bytes
        out[f"{model} tp={tp} dp={dp}"] = [plan.params_bytes, plan.cache_bytes]
    # a plan for hardware that is not here: 8B-class shape on tp=8
    from imp_jax.config import ModelConfig

    big = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128)
    p1 = sharding.memory_plan(big, "tp=1", kv_pages=1000)
    p8 = sharding.memory_plan(big, "tp=8", kv_pages=1000)
    assert p8.cache_bytes * 8 == p1.cache_bytes
    assert p1.params_bytes / 8 < p8.params_bytes < p1.params_bytes / 7.9  # norms replicated
    assert np.isclose(p1.params_bytes, big.num_params * 2)
    out["8b tp=8"] = str(p8)
    return out


def check_equivalence(name, model, tp, dp, fallback, baselines):
    import numpy as np

    from imp_jax import sharding

    cfg, params = _load(model)
    rng = np.random.default_rng(7)
    ids = [int(t) for t in rng.integers(0, cfg.vocab_size, 13)]
    if model not in baselines:
        baselines[model] = _run(_runner(cfg, params), ids)
    ref_logits, ref_greedy = baselines[model]
    runner = _runner(cfg, params)
    rules = sharding.tensor_parallel(fallback)
    mesh = _mesh(tp, dp)
    sharding.shard_runner(runner, mesh, rules)
    r = sharding.kv_repeat(cfg, mesh, rules)
    logits, greedy = _run(runner, ids)
    k = runner.cache.k[0]  # (the step donates the cache: read the new one)
    assert len(k.sharding.device_set) == tp * dp
    assert k.shape[2] == cfg.num_kv_heads * r
    err = float(np.abs(logits - ref_logits).max())
    assert err < ATOL, f"max |logits diff| {err}"
    assert greedy == ref_greedy, (greedy, ref_greedy)
    return {"max_abs_err": err, "kv_repeat": r, "cache_spec": str(k.sharding.spec),
            "kv_shard_shape": list(k.addressable_shards[0].data.shape)}


# 8-bit KV pools on a mesh: the scale pools are split like the pages (KV heads), repeated with
# them when tp > kv_heads, and read under the same shard_map as the pages
FP8_KV_CASES = [("llama3", 2, "repeat", "float8_e4m3fn", False),
                ("mistral", 4, "repeat", "float8_e4m3fn", True),  # the filled cache moved
                ("llama3", 4, "replicate", "float8_e4m3fn", False),
                ("qwen2", 2, "repeat", "int8", True)]


def check_fp8_kv():
    import jax.numpy as jnp
    import numpy as np

    from imp_jax import sharding
    from imp_jax.cache import scale_pool_shape

    out = {}
    for model, tp, fallback, kv, keep in FP8_KV_CASES:
        kv = jnp.dtype(kv)
        cfg, params = _load(model)
        ids = [int(t) for t in np.random.default_rng(11).integers(0, cfg.vocab_size, 13)]
        ref_logits, ref_greedy = _run(_runner(cfg, params, kv), ids)
        rules = sharding.tensor_parallel(fallback)
        mesh = _mesh(tp, 1)
        one = _runner(cfg, params, kv)
        if keep:  # a cache with a prompt in it, moved into its shards: scales move with it
            _run(one, ids[:5], n_new=1)
        runner = sharding.shard_runner(one, mesh, rules, keep_cache=keep)
        logits, greedy = _run(runner, ids)
        c = runner.cache
        assert c.k[0].dtype == kv and c.k_scale is not None
        assert c.k_scale[0].sharding.is_equivalent_to(sharding.scale_sharding(
            c.k[0].sharding), 3), (c.k_scale[0].sharding, c.k[0].sharding)
        assert c.k_scale[0].shape == scale_pool_shape(c.k[0].shape)
        err = float(np.abs(logits - ref_logits).max())
        assert err < ATOL, f"{model} tp={tp}: max |logits diff| {err}"
        assert greedy == ref_greedy, (greedy, ref_greedy)
        dev = mesh.devices.flat[0]
        on_dev = sum(sh.data.nbytes for pools in (c.k, c.v, c.k_scale, c.v_scale)
                     for x in pools for sh in x.addressable_shards if sh.device == dev)
        plan = sharding.memory_plan(cfg, mesh, rules, jnp.float32, kv_pages=32, page_size=PAGE,
                                    cache_dtype=kv)
        assert plan.cache_bytes == on_dev, (plan.cache_bytes, on_dev)
        out[f"{model} tp={tp} {fallback} {kv.name} keep={keep}"] = {
            "max_abs_err": err, "scale_spec": str(c.k_scale[0].sharding.spec)}
        runner.reset_cache()  # fresh pools keep their shardings; scales back to 1
        assert float(runner.cache.k_scale[0].min()) == 1.0 == float(runner.cache.v_scale[0].max())
        assert runner.cache.k_scale[0].sharding == c.k_scale[0].sharding
    cfg, params = _load("llama3")  # keep_cache cannot change the pool's dtype
    _expect_error(lambda: sharding.shard_runner(_runner(cfg, params), _mesh(2, 1), keep_cache=True,
                                                cache_dtype=jnp.float8_e4m3fn),
                  "keep_cache=True moves the cache as it is (float32", "float8_e4m3fn")
    return out


QUANT_CASES = [("qwen2", 4, "repeat", "int8"),  # KV heads (quantized k/v codes, biases) x2
               ("llama3", 2, "repeat", "fp8-weight-only"),
               ("mistral", 4, "replicate", "fp8")]  # W8A8: per-token amax over split rows


def check_quantized_weights():
    """A quantized model (every block, codes K-major) on a tensor-parallel mesh computes what it
    computes on one device: the weights' specs permuted into the codes' order, k/v codes repeated
    on their stored axis."""
    import re

    import jax
    import numpy as np

    from imp_jax import sharding
    from imp_jax.quant import QuantArray, QuantPolicy, quantize_params

    out = {}
    for model, tp, fallback, mode in QUANT_CASES:
        cfg, params = _load(model)
        qparams = quantize_params(params, cfg, mode, QuantPolicy())
        ids = [int(t) for t in np.random.default_rng(12).integers(0, cfg.vocab_size, 13)]
        ref_logits, ref_greedy = _run(_runner(cfg, qparams), ids)
        runner = sharding.shard_runner(_runner(cfg, qparams), _mesh(tp, 1),
                                       sharding.tensor_parallel(fallback))
        codes = {jax.tree_util.keystr(p): a.q for p, a in jax.tree_util.tree_leaves_with_path(
            runner.params, is_leaf=lambda a: isinstance(a, QuantArray))
            if isinstance(a, QuantArray)}
        assert len(codes) == 7 * cfg.num_layers, sorted(codes)
        for path, q in codes.items():  # split by tp, but k/v when their heads are replicated
            replicated = fallback == "replicate" and re.search(r"'[kv]'", path)
            assert (q.addressable_shards[0].data.size < q.size) != bool(replicated), \
                (path, q.sharding)
        logits, greedy = _run(runner, ids)
        err = float(np.abs(logits - ref_logits).max())
        # weight-only: the float runs' bound; W8A8: a code on a rounding boundary may flip
        assert err < (ATOL if mode != "fp8" else 1e-3 * float(np.abs(ref_logits).max())), \
            f"{model} tp={tp} {mode}: max |logits diff| {err}"
        assert greedy == ref_greedy, (greedy, ref_greedy)
        out[f"{model} tp={tp} {fallback} {mode}"] = {"max_abs_err": err}
    return out


def check_hlo():
    """Megatron pattern in the compiled decode step: per layer one all-reduce after the o
    projection and one after the down projection, and no all-gather of a weight."""
    import re

    from imp_jax import sharding
    from imp_jax.runner import StepSeq
    from imp_jax.sampling import SamplingParams, SamplingTensors

    out = {}
    for model, tp in [("llama3", 2), ("mistral", 4)]:
        cfg, params = _load(model)
        runner = sharding.shard_runner(_runner(cfg, params), _mesh(tp, 1))
        # KV pools split like the query heads: attention runs per device under shard_map
        assert runner.model.attn_heads_axis == "tp", runner.model.attn_heads_axis
        st = SamplingTensors.from_params([SamplingParams(temperature=0)], [0], [0])
        hlo = sharding.step_hlo(runner, [StepSeq([5], 9, [1, 2, 3])], st)
        counts = sharding.count_collectives(hlo)
        assert not sharding.weight_all_gathers(hlo, runner.params), \
            sharding.weight_all_gathers(hlo, runner.params)
        reduces = [ln for ln in hlo.splitlines() if re.search(r"\ball-reduce(-start)?\(", ln)]
        per_layer = {}
        for i in range(cfg.num_layers):
            o = [ln for ln in reduces if f"layers_{i}/attention/attn/o/" in ln]
            down = [ln for ln in reduces if f"layers_{i}/mlp/mlp/down/" in ln]
            assert len(o) == 1 and len(down) == 1, (i, len(o), len(down))
            per_layer[i] = [len(o), len(down)]
        # the rest: the vocab-split embedding lookup's one all-reduce (+ none in attention)
        other = len(reduces) - 2 * cfg.num_layers
        assert other <= 1, reduces
        hidden = [ln for ln in reduces if re.search(rf"f32\[\d+,{cfg.hidden_size}\]", ln)]
        assert len(hidden) == 2 * cfg.num_layers + other
        gathers = [c for c in sharding.collectives(hlo) if c[0] == "all-gather"]
        assert all(f",{cfg.vocab_size}]" in ty for _, ty in gathers), gathers  # logits only
        out[f"{model} tp={tp}"] = {"counts": counts, "per_layer": per_layer, "other": other}
    return out


def check_engine_warmup():
    """An engine on a tp=2 x dp=2 mesh with 4-step decode blocks lowers nothing after warm-up
    (session 5's tp=2 run compiled a decode block mid-run: the block fed from the previous
    one's device tokens missed the program warm-up built from host tokens) and generates what
    one device does."""
    import random

    import jax

    import imp_jax
    from imp_jax import SamplingParams
    from imp_jax.loaders import load_model

    lowered = []  # one event per program lowered to XLA, whether or not the disk cache has it
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: lowered.append(event)
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
    src = os.path.join(DATA, "tiny", "llama3")
    loaded = load_model(src, "float32")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = {}
    # a float cache, then an 8-bit one (its scale pools split and pinned like the pages)
    for kv in ("auto", "fp8"):
        for mesh in (None, _mesh(2, 2)):
            llm = imp_jax.LLM(src, loaded=loaded, dtype="float32", max_model_len=64,
                              page_size=PAGE, num_pages=64, max_num_seqs=8,
                              max_num_batched_tokens=32, decode_steps=4, attn_impl="pallas",
                              mesh=mesh, kv_cache_dtype=kv)
            llm.warmup()
            before = len(lowered)
            out[kv, mesh is not None] = [o.token_ids
                                         for o in llm.generate(prompts, greedy, use_tqdm=False)]
            assert len(lowered) == before, \
                f"{kv} cache: {len(lowered) - before} programs lowered after warm-up"
        assert out[kv, True] == out[kv, False], kv
    return {"tokens": sum(map(len, out["auto", True])),
            "fp8_equals_float": out["fp8", True] == out["auto", True]}


def check_load_into_shards():
    """HF safetensors (single file and sharded) load straight into their shards: every weight that
    the rules split has per-device pieces smaller than the whole, placed on all 8 devices."""
    import jax
    import numpy as np

    from imp_jax import sharding
    from imp_jax.loaders import load_model

    mesh = _mesh(4, 2)
    rules = sharding.tensor_parallel()
    fn = lambda cfg: sharding.param_shardings(cfg, mesh, rules)  # noqa: E731
    out = {}
    for source in (os.path.join(DATA, "tiny", "qwen3"), os.path.join(DATA, "tiny", "llama3")):
        m = load_model(source, "float32", shardings=fn)
        want = fn(m.cfg)
        split = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(m.params):
            target = want
            for k in path:
                target = target[k.key]
            assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (path, leaf.sharding)
            shard = leaf.addressable_shards[0].data.shape
            assert len(leaf.addressable_shards) == 8
            split += int(np.prod(shard) < np.prod(leaf.shape))
        assert split > 0
        out[source] = split
    ref = load_model(os.path.join(DATA, "tiny", "qwen3"), "float32").params
    got = load_model(os.path.join(DATA, "tiny", "qwen3"), "float32", shardings=fn).params
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # random weights generated already quantized, straight into their shards (q split like
    # the weight, per-channel scales split on their output axis)
    from imp_jax import quant
    from imp_jax.quant import QuantArray, QuantPolicy, quantize_params

    keep = quant.DEFAULT_POLICY  # tiny has 2 blocks: quantize both
    quant.DEFAULT_POLICY = QuantPolicy(keep_first=0, keep_last=0)
    try:
        m = load_model("random:tiny", "float32", shardings=fn, random_quantization="fp8")
        want = quantize_params(load_model("random:tiny", "float32").params, m.cfg, "fp8")
    finally:
        quant.DEFAULT_POLICY = keep
    is_q = lambda x: isinstance(x, QuantArray)  # noqa: E731
    quantized = 0
    for a, b, s in zip(jax.tree.leaves(m.params, is_leaf=is_q),
                       jax.tree.leaves(want, is_leaf=is_q), jax.tree.leaves(fn(m.cfg))):
        if is_q(a):
            quantized += 1
            # codes K-major: the weight's spec permuted into their order
            assert a.q.sharding.is_equivalent_to(sharding.leaf_shardings(s, a).q, a.q.ndim), \
                a.q.sharding
            assert len(a.scale.addressable_shards) == 8
            a, b = (a.q, a.scale), (b.q, b.scale)
        else:
            a, b = (a,), (b,)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert quantized > 0
    out["random_fp8_quantized_leaves"] = quantized
    # ... and an orbax checkpoint of them (imp-jax convert) restores straight into those shards
    import tempfile

    from imp_jax.loaders import orbax_ckpt

    with tempfile.TemporaryDirectory() as tmp:
        orbax_ckpt.save(tmp, m.cfg, m.params, {})
        _, restored, _ = orbax_ckpt.load(tmp, "float32", shardings=fn)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(m.params)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    return out


def main(out_path: str) -> None:
    t0 = time.time()
    results = {}

    def record(name, fn, *args):
        t, cpu = time.time(), time.process_time()
        try:
            info = fn(*args)
            results[name] = {"ok": True, "info": info}
        except Exception:  # noqa: BLE001 -- reported per check
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.time() - t, 2)
        results[name]["cpu_seconds"] = round(time.process_time() - cpu, 2)
        with open(out_path, "w") as f:  # written after every check: a crash keeps the rest
            json.dump(results, f, indent=1, default=str)

    record("mesh", check_mesh)
    record("validation", check_validation)
    baselines = {}
    for case in CASES:
        record(case[0], check_equivalence, *case, baselines)
    record("fp8_kv", check_fp8_kv)
    record("quantized_weights", check_quantized_weights)
    record("hlo", check_hlo)
    record("memory_plan", check_memory_plan)
    record("load_into_shards", check_load_into_shards)
    record("engine_warmup", check_engine_warmup)
    results["_total_seconds"] = round(time.time() - t0, 2)
    results["_total_cpu_seconds"] = round(time.process_time(), 2)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, default=str)


# ======================================================================== the pytest side


def _env(devices: int) -> dict:
    env = dict(os.environ)
    # Backend optimization off: the programs are tiny and compiling dominates (~40% less CPU);
    # the SPMD partitioning (collectives) is decided before the backend and is unaffected.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}"
                        " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=_env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"sharding subprocess wrote nothing (rc={proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def _assert_ok(results, name):
    if name not in results:
        pytest.fail(f"check {name} did not run (subprocess died?)")
    r = results[name]
    assert r["ok"], r.get("error")
    return r["info"]


def test_make_mesh(results):
    _assert_ok(results, "mesh")


def test_bad_layouts_fail_early_naming_array_and_axis(results):
    _assert_ok(results, "validation")


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sharded_logits_and_greedy_equal_single_device(results, case):
    _assert_ok(results, case)


def test_fp8_kv_cache_on_a_mesh_equals_single_device(results):
    info = _assert_ok(results, "fp8_kv")
    assert len(info) == len(FP8_KV_CASES)


def test_quantized_weights_on_a_mesh_equal_single_device(results):
    info = _assert_ok(results, "quantized_weights")
    assert len(info) == len(QUANT_CASES)


def test_decode_hlo_has_megatron_all_reduces_and_no_weight_all_gather(results):
    _assert_ok(results, "hlo")


def test_weights_load_straight_into_their_shards(results):
    assert _assert_ok(results, "load_into_shards")


def test_engine_on_a_mesh_compiles_nothing_after_warmup(results):
    assert _assert_ok(results, "engine_warmup")["tokens"] == 8 * 12


def test_memory_plan_matches_placed_shards(results):
    _assert_ok(results, "memory_plan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_matches_one_process(tmp_path):
    """2 processes x 2 CPU devices joined by jax.distributed on localhost: tp=4 across both."""
    import jax.numpy as jnp
    import numpy as np

    from imp_jax.loaders.hf_dir import load_hf_dir
    from imp_jax.runner import ModelRunner, StepSeq

    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), "--port", str(port),
               "--process-id", str(pid), "--num-processes", "2", "--tp", "4",
               "--out", str(tmp_path / f"out{pid}.npz")]
        procs.append(subprocess.Popen(cmd, env=_env(2), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    outs = [np.load(tmp_path / f"out{pid}.npz") for pid in range(2)]
    assert int(outs[0]["process_count"]) == 2 and int(outs[0]["devices"]) == 4

    # the single-process, single-device reference (this pytest process)
    cfg, params = load_hf_dir(os.path.join(DATA, "tiny", "llama3"), jnp.float32)
    runner = ModelRunner(cfg, params, num_pages=32, page_size=4, max_model_len=64)
    ids = outs[0]["ids"].tolist()
    pages = [1, 2, 3, 4]
    logits = np.asarray(runner.step([StepSeq(ids, 0, pages, all_logits=True)]).logits)[:len(ids)]
    greedy, start = [int(logits[-1].argmax())], len(ids)
    for _ in range(len(outs[0]["greedy"]) - 1):
        res = runner.step([StepSeq([greedy[-1]], start, pages, all_logits=True)])
        greedy.append(int(np.asarray(res.logits)[0].argmax()))
        start += 1
    sys.path.insert(0, HERE)
    from multihost_worker import decode_blocks

    block = decode_blocks(runner, greedy[-1], start)
    for o in outs:
        np.testing.assert_allclose(o["logits"], logits, atol=ATOL, rtol=1e-5)
        assert o["greedy"].tolist() == greedy
        assert o["block"].tolist() == block


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from imp_jax.llm import enable_compilation_cache

    enable_compilation_cache()
    main(sys.argv[1])
