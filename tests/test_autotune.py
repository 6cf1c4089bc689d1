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
