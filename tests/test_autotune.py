"""Autotuner of the paged-attention launch config (pallas_kernels/autotune.py), on CPU.

Key bucketing, JSON cache round trip / corrupt file, tune() with a fake clock, lookup's
heuristic fallback, and the entry point using a cached winner (kernel in interpret mode).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import KernelConfig, autotune, choose_config, ragged_paged_attention_ref
from tests.test_kernels import make_case, rel


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    monkeypatch.delenv(autotune.ENABLE_ENV, raising=False)
    return path


def key_of(S=8, max_pages=64, page=16, H=32, KVH=8, D=128, Q=1, dtype=jnp.bfloat16, kind="H100"):
    return autotune.make_key((S * Q, H, D), (1000, page, KVH, D), (S, max_pages), Q, dtype,
                             kind=kind)


def test_key_bucketing():
    k = key_of(S=5, max_pages=40, page=16)
    assert (k.device_kind, k.dtype, k.head_dim, k.group, k.kv_heads, k.page_size) == \
        ("H100", "bfloat16", 128, 4, 8, 16)
    assert (k.batch_bucket, k.ctx_bucket, k.mode) == (8, 1024, "decode")
    assert (k.S, k.max_pages, k.max_query_len) == (5, 40, 1)        # exact dims ride along
    # same bucket: equal keys (exact dims are not part of the identity)
    assert key_of(S=7, max_pages=33) == k and key_of(S=7, max_pages=33).id == k.id
    assert hash(key_of(S=8, max_pages=64)) == hash(k)
    # crossing a power of two, or any other field, changes the key
    for other in (key_of(S=9, max_pages=40), key_of(S=5, max_pages=65), key_of(page=32),
                  key_of(dtype=jnp.float32), key_of(D=64), key_of(KVH=4), key_of(kind="H200"),
                  key_of(Q=32)):
        assert other != k and other.id != k.id
    assert key_of(Q=16).mode == "decode" and key_of(Q=17).mode == "prefill"  # Q * G <= 64
    assert key_of(S=1).batch_bucket == 1 and autotune.bucket(0) == 1
    assert autotune.make_key((3, 8, 64), (9, 8, 2, 64), (2, 4), 1, jnp.float32).device_kind == \
        jax.devices()[0].device_kind


def test_cache_round_trip(cache_file):
    k = key_of()
    assert autotune.cached(k) is None and not cache_file.exists()
    cfg = KernelConfig(block_q=1, pages_per_block=4, num_splits=3, num_warps=8, num_stages=3,
                       prefetch_pages=False)
    autotune.save_entry(k, dict(config=dataclasses.asdict(cfg), us=12.5))
    assert autotune.cached(k) == cfg
    data = json.loads(cache_file.read_text())
    assert data["version"] == autotune.CACHE_VERSION and k.id in data["entries"]
    # a second key merges, the first stays; no temp files left behind
    k2 = key_of(S=64)
    cfg2 = dataclasses.replace(cfg, num_splits=1)
    autotune.save_entry(k2, dict(config=dataclasses.asdict(cfg2), us=1.0))
    assert autotune.cached(k) == cfg and autotune.cached(k2) == cfg2
    assert sorted(os.listdir(cache_file.parent)) == ["autotune.json"]
    # another process writing the file is seen (memo keyed on the file's stat)
    data = json.loads(cache_file.read_text())
    data["entries"].pop(k2.id)
    cache_file.write_text(json.dumps(data) + "\n" * 3)
    assert autotune.cached(k2) is None and autotune.cached(k) == cfg


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 99, "entries": {}}',
                                  '{"version": 1, "entries": {}}',  # before session 8's configs
                                  "\xff\xfe garbage"])
def test_corrupt_cache_ignored(cache_file, text):
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(text, encoding="latin-1")
    k = key_of()
    with pytest.warns(RuntimeWarning, match="autotune cache"):
        assert autotune.cached(k) is None
        assert autotune.lookup(k) == k.heuristic()
    # tuning over a corrupt file replaces it with a valid one
    cfg = k.heuristic(num_splits=2)
    with pytest.warns(RuntimeWarning):
        autotune.save_entry(k, dict(config=dataclasses.asdict(cfg)))
    assert autotune.cached(k) == cfg


def test_malformed_entry_is_a_miss(cache_file):
    k = key_of()
    autotune.save_entry(k, dict(config=dict(block_q="x", bogus=1)))
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert autotune.lookup(k) == k.heuristic()


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_tune_picks_fastest_and_skips_failing(cache_file):
    k = key_of(S=8, max_pages=256)
    cands = [k.heuristic(num_splits=n) for n in (1, 2, 4, 8)]
    cost = {cands[0]: 5e-3, cands[1]: 2e-3, cands[2]: 1e-3, cands[3]: 3e-3}
    bad = cands[2]                       # would be the fastest, but fails to "compile"
    clock = FakeClock()
    calls = []

    def run_fn(cfg):
        calls.append(cfg)
        if cfg == bad:
            raise RuntimeError("triton: out of shared memory")
        clock.t += cost[cfg]
        return jnp.zeros(())

    best = autotune.tune(k, cands, run_fn, reps=3, warmup=1, timer=clock)
    assert best == cands[1]
    assert calls.count(cands[0]) == 4 and calls.count(bad) == 1      # warm-up + 3 reps
    entry = json.loads(cache_file.read_text())["entries"][k.id]
    assert entry["us"] == pytest.approx(2000.0)
    assert str(bad) in entry["failed"] and len(entry["timings_us"]) == 3
    assert autotune.cached(k) == cands[1] and autotune.lookup(k) == cands[1]
    # median, not mean: one slow outlier (a 1 s hiccup) does not lose a 1 ms candidate
    clock2, n = FakeClock(), {"a": 0}

    def noisy(cfg):
        if cfg == cands[0]:
            n["a"] += 1
            clock2.t += 1.0 if n["a"] == 3 else 1e-3
        else:
            clock2.t += cost[cfg]
        return jnp.zeros(())

    assert autotune.tune(k, [cands[3], cands[0]], noisy, reps=3, timer=clock2,
                         save=False) == cands[0]
    assert autotune.cached(k) == cands[1]                              # save=False: no write
    assert autotune.tune(k, [cands[0]], lambda c: (_ for _ in ()).throw(ValueError("x")),
                         timer=clock) is None
    assert autotune.cached(k) == cands[1]                              # untouched


def test_lookup_falls_back_to_heuristic():
    for kw in (dict(), dict(S=256, max_pages=2048), dict(Q=64), dict(S=1, max_pages=3, page=8)):
        k = key_of(**kw)
        H, KVH = 32, 8
        want = choose_config(k.S, KVH, H // KVH, k.max_query_len, k.max_pages, k.page_size)
        assert autotune.lookup(k) == want


def test_lookup_adapts_winner_to_exact_shape():
    big = key_of(S=8, max_pages=64)
    autotune.save_entry(big, dict(config=dataclasses.asdict(
        KernelConfig(block_q=1, pages_per_block=8, num_splits=16, num_warps=8, num_stages=3))))
    small = key_of(S=5, max_pages=33)         # same bucket, fewer page blocks
    got = autotune.lookup(small)
    assert small == big
    assert (got.pages_per_block, got.num_warps, got.num_stages) == (8, 8, 3)
    assert got.num_splits == min(16, -(-33 // 8))                    # clamped to page blocks
    spec = autotune.make_key((5 * 4, 32, 128), (100, 16, 8, 128), (5, 33), 4, jnp.bfloat16,
                             kind="H100")
    autotune.save_entry(spec, dict(config=dataclasses.asdict(
        KernelConfig(block_q=4, pages_per_block=4, num_splits=2))))
    spec3 = autotune.make_key((5 * 3, 32, 128), (100, 16, 8, 128), (5, 33), 3, jnp.bfloat16,
                              kind="H100")
    assert autotune.lookup(spec3).block_q == 3                        # decode: block_q = Q


def test_default_candidates_valid():
    for k in (key_of(), key_of(S=1, max_pages=2048), key_of(Q=128)):
        cands = autotune.default_candidates(k)
        assert cands[0] == k.heuristic() and len(set(cands)) == len(cands) >= 4


def _case():
    args = make_case(3, seq_lens=[37, 5, 20], qlens=[1, 1, 1], KVH=2, G=4, D=32, page=8)
    return args, dict(max_query_len=1, scale=1.0 / math.sqrt(32))


def test_entry_point_uses_cached_winner(monkeypatch):
    (q, kp, vp, pt, sl, qs), kw = _case()
    key = autotune.make_key(q.shape, kp.shape, pt.shape, 1, q.dtype)
    assert key.device_kind == jax.devices()[0].device_kind
    heur = autotune.lookup(key)
    winner = KernelConfig(block_q=1, pages_per_block=2, num_splits=3, num_warps=4, num_stages=3,
                          prefetch_pages=False)
    assert winner != heur and autotune.adapt(key, winner) == winner
    autotune.save_entry(key, dict(config=dataclasses.asdict(winner), us=1.0))

    seen = []
    real = pallas_kernels.paged_attention_kernel

    def spy(*a, config=None, **k):
        seen.append(config)
        return real(*a, config=config, **k)

    monkeypatch.setattr(pallas_kernels, "paged_attention_kernel", spy)
    out = pallas_kernels.ragged_paged_attention(q, kp, vp, pt, sl, qs, interpret=True, **kw)
    assert seen == [winner]
    ref = ragged_paged_attention_ref(q, kp, vp, pt, sl, qs, **kw)
    assert rel(out, ref) < 2e-5
    # ... also when traced inside an outer jit (key from static shapes at trace time)
    f = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, interpret=True, **kw))
    out2 = f(q, kp, vp, pt, sl, qs)
    assert seen[-1] == winner and rel(out2, ref) < 2e-5
    # no cached winner -> heuristic
    os.remove(os.environ[autotune.CACHE_ENV])
    pallas_kernels.ragged_paged_attention(q, kp, vp, pt, sl, qs, interpret=True, **kw)
    assert seen[-1] == heur


def test_env_enabled_tunes_once_at_trace_time(monkeypatch):
    (q, kp, vp, pt, sl, qs), kw = _case()
    key = autotune.make_key(q.shape, kp.shape, pt.shape, 1, q.dtype)
    cands = [key.heuristic(), key.heuristic(block_k_tokens=16, num_splits=2)]
    assert cands[0] != cands[1]
    monkeypatch.setattr(autotune, "default_candidates", lambda k: cands)
    monkeypatch.setattr(autotune, "_tried", set())
    # disabled: nothing tuned, nothing written
    pallas_kernels.ragged_paged_attention(q, kp, vp, pt, sl, qs, interpret=True, **kw)
    assert autotune.cached(key) is None
    monkeypatch.setenv(autotune.ENABLE_ENV, "1")
    f = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, interpret=True, **kw))
    out = f(q, kp, vp, pt, sl, qs)             # tunes while the outer jit traces
    assert autotune.cached(key) in cands
    ref = ragged_paged_attention_ref(q, kp, vp, pt, sl, qs, **kw)
    assert rel(out, ref) < 2e-5


# ---------------------------------------------------------------------- decode_mgpu's own keys

def mgpu_key(S=8, max_pages=64, page=16, kind="H200", kv_dtype=None):
    return autotune.make_key((S, 32, 128), (1000, page, 8, 128), (S, max_pages), 1,
                             jnp.bfloat16, kind=kind, kernel="mgpu", kv_dtype=kv_dtype)


def test_mgpu_keys_configs_and_candidates():
    from pallas_kernels import decode_mgpu

    k, t = mgpu_key(), key_of(kind="H200")
    assert k != t and k.id == t.id + "|mgpu" and k.config_class is decode_mgpu.DecodeConfig
    assert k.heuristic() == decode_mgpu.choose_config(8, 8, 64, 16, 128)
    for key in (k, mgpu_key(S=1024, max_pages=16), mgpu_key(S=1, max_pages=2048)):
        cands = autotune.default_candidates(key)
        assert cands[0] == key.heuristic() and len(cands) >= 5
        rings = {(c.block_kv, c.num_stages) for c in cands}
        assert {(128, 3), (64, 6), (64, 2)} <= rings  # the H200 sweep's winners are tried
        assert {c.heads_per_cta for c in cands} == {1, 2}  # one and two KV heads per CTA
        for c in cands:  # every candidate is a launchable config for this shape
            assert isinstance(c, decode_mgpu.DecodeConfig)
            c.validate(128, 16)


def test_mgpu_8bit_candidates_try_both_qk_and_pv_paths(monkeypatch):
    """e4m3 pages: every candidate ring with Q K^T in e4m3 (the default) and in bf16, each with
    P V in f16 (the default) and in bf16; float pages never get either 8-bit path."""
    for name in ("IMP_JAX_MGPU_FP8_QK", "IMP_JAX_MGPU_F16_V"):
        monkeypatch.delenv(name, raising=False)
    k8 = mgpu_key(S=256, max_pages=128, kv_dtype=jnp.float8_e4m3fn)
    cands = autotune.default_candidates(k8)
    assert cands[0] == k8.heuristic() and cands[0].fp8_qk and cands[0].f16_v
    assert {(c.fp8_qk, c.f16_v) for c in cands} == {(a, b) for a in (0, 1) for b in (0, 1)}
    # the same blocks, splits and heads every way (the stages SMEM allows may differ)
    shape = lambda c: (c.block_kv, c.num_splits, c.heads_per_cta)  # noqa: E731
    ways = [{shape(c) for c in cands if (c.fp8_qk, c.f16_v) == w} for w in
            ((1, 1), (1, 0), (0, 1), (0, 0))]
    assert all(w == ways[0] for w in ways)
    for c in cands:
        c.validate(128, 16, kv_itemsize=1)
    assert not any(c.fp8_qk or c.f16_v for c in autotune.default_candidates(
        mgpu_key(S=256, max_pages=128)))


def test_mgpu_winner_round_trip_and_adapt(cache_file):
    from pallas_kernels import decode_mgpu

    k = mgpu_key(S=64, max_pages=64)                      # 1k keys: 8 blocks of 128
    cands = [k.heuristic(block_kv=b, num_stages=s) for b, s in ((128, 3), (64, 6), (64, 2))]
    cost = dict(zip(cands, (3e-3, 1e-3, 2e-3)))
    clock = FakeClock()

    def run_fn(cfg):
        clock.t += cost[cfg]
        return jnp.zeros(())

    assert autotune.tune(k, cands, run_fn, reps=2, timer=clock) == cands[1]
    assert autotune.cached(k) == cands[1] and autotune.lookup(k) == cands[1]
    assert autotune.cached(key_of(S=64, max_pages=64, kind="H200")) is None  # Triton: no entry
    # a winner with more splits than a smaller shape of the same bucket has blocks: clamped
    autotune.save_entry(k, dict(config=dataclasses.asdict(
        decode_mgpu.DecodeConfig(block_kv=128, num_stages=3, num_splits=16))))
    small = mgpu_key(S=33, max_pages=40)                  # same bucket, 5 blocks of 128
    assert small == k and autotune.lookup(small).num_splits == 5


def test_entries_with_the_deleted_f16_fields_still_load(cache_file):
    """Caches written before session 8 deleted the f16 products over e4m3 pages hold
    "fp8_f16" (decode_mgpu) / "f16_dots" (Triton) keys: dropped, the rest of the winner used."""
    import warnings

    from pallas_kernels import decode_mgpu

    k, t = mgpu_key(S=64, max_pages=64), key_of(S=64, max_pages=64, kind="H200")
    mgpu_old = dict(block_kv=64, num_stages=6, num_splits=2, compat=False, fp8_f16=True,
                    heads_per_cta=1)
    triton_old = dict(block_q=1, pages_per_block=4, num_splits=3, num_warps=8, num_stages=3,
                      prefetch_pages=False, f16_dots=True)
    autotune.save_entry(k, dict(config=mgpu_old, us=1.0))
    autotune.save_entry(t, dict(config=triton_old, us=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "malformed": the entries are used
        assert autotune.cached(k) == decode_mgpu.DecodeConfig(block_kv=64, num_stages=6,
                                                              num_splits=2)
        assert autotune.lookup(k) == k.heuristic(block_kv=64, num_stages=6, num_splits=2,
                                                 heads_per_cta=1)
        assert autotune.cached(t) == KernelConfig(block_q=1, pages_per_block=4, num_splits=3,
                                                  num_warps=8, num_stages=3,
                                                  prefetch_pages=False)
        assert autotune.lookup(t).num_warps == 8


def test_entry_point_passes_the_mgpu_winner(monkeypatch):
    """On a GPU, decode steps decode_mgpu covers get the cached winner of their mgpu key. The
    Mosaic GPU kernel does not run on this CPU, so a stand-in records the config it is given and
    returns the reference (test_decode_mgpu.py runs the kernel itself)."""
    from pallas_kernels import decode_mgpu

    q, kp, vp, pt, sl, qs = make_case(4, seq_lens=[300, 5, 200], qlens=[1, 1, 1], KVH=2, G=4,
                                      D=64, page=16)
    q, kp, vp = (x.astype(jnp.bfloat16) for x in (q, kp, vp))
    kw = dict(max_query_len=1, scale=0.125)
    key = autotune.make_key(q.shape, kp.shape, pt.shape, 1, q.dtype, kernel="mgpu")
    winner = decode_mgpu.DecodeConfig(block_kv=64, num_stages=2, num_splits=2)
    assert winner != key.heuristic()
    assert autotune.adapt(key, winner) == winner
    autotune.save_entry(key, dict(config=dataclasses.asdict(winner), us=1.0))
    seen = []

    def stand_in(*a, config=None, **k):
        seen.append(config)
        return ragged_paged_attention_ref(*a, scale=k["scale"], max_query_len=1)

    monkeypatch.setattr(decode_mgpu, "paged_decode_mgpu", stand_in)
    monkeypatch.setattr(pallas_kernels.jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("IMP_JAX_DECODE", "mgpu")
    assert decode_mgpu.supported(q.shape, kp.shape, q.dtype, 1, k_dtype=kp.dtype)
    pallas_kernels.ragged_paged_attention(q, kp, vp, pt, sl, qs, **kw)
    assert seen == [winner]
    os.remove(os.environ[autotune.CACHE_ENV])             # no winner: the heuristic
    pallas_kernels.ragged_paged_attention(q, kp, vp, pt, sl, qs, **kw)
    assert seen[-1] == key.heuristic()


@pytest.mark.gpu
def test_mgpu_tune_shape_on_gpu(cache_file):
    """The real thing: tune an mgpu bucket on synthetic inputs, then run the winner."""
    k = autotune.make_key((64, 32, 128), (2000, 16, 8, 128), (64, 32), 1, jnp.bfloat16,
                          kernel="mgpu")
    won = autotune.tune_shape(k, reps=3)
    assert won is not None and autotune.lookup(k) == autotune.adapt(k, won)
    entry = json.loads(cache_file.read_text())["entries"][k.id]
    assert len(entry["timings_us"]) >= 5 and not entry["failed"]


def test_tune_shape_times_loops_of_calls(cache_file):
    """tune_shape times each candidate as one jitted program of `calls` kernel calls, each on
    its own page table (so a run's fixed dispatch + sync cost is spread over them), and records
    per-call microseconds with the calls per run; interpret mode on CPU."""
    k = autotune.make_key((4, 8, 64), (40, 16, 2, 64), (4, 4), 1, jnp.float32)
    cands = autotune.default_candidates(k)[:2]
    won = autotune.tune_shape(k, candidates=cands, interpret=True, reps=1, calls=3)
    entry = json.loads(cache_file.read_text())["entries"][k.id]
    assert won in cands and entry["calls_per_run"] == 3
    assert len(entry["timings_us"]) == len(set(cands)) and not entry["failed"]
    autotune.tune_shape(k, candidates=cands, interpret=True, reps=1)   # interpret: one call
    assert json.loads(cache_file.read_text())["entries"][k.id]["calls_per_run"] == 1
    # the looped tables draw from a pool of calls x the shape's pages (not one L2-sized set)
    assert autotune.synthetic_inputs(k, pool_pages=3 * 4 * 4 + 1)[1].shape[0] == 49
    assert autotune.synthetic_inputs(k)[1].shape[0] == 17
