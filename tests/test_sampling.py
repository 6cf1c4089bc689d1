"""Tests for imp_jax.sampling: SamplingParams validation and the batched on-device sampler.

Statistical tests draw many samples in one call (one row per draw, same logits, different steps),
with fixed seeds, so they are deterministic; tolerances are chosen so that the wrong distribution
fails by a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from imp_jax.sampling import (
    DEFAULT_TOPK_CAP,
    GREEDY_EPS,
    SamplingParams,
    SamplingTensors,
    apply_penalties,
    mask_tokens,
    processed_logits,
    sample,
    token_counts,
)

_sample = jax.jit(sample, static_argnames=("num_logprobs", "topk_cap"))
_processed = jax.jit(processed_logits, static_argnames=("topk_cap",))
_penalties = jax.jit(apply_penalties)

N_DRAWS = 4096  # rows of the statistical batches
V_STAT = 16  # vocab of the statistical batches
CHI2_CRIT = {7: 24.32, 15: 37.70}  # chi-square critical values at p = 0.001


S_SMALL = 64  # rows of the non-statistical batches (smaller batches are padded to it)


def _rows(n):
    return S_SMALL if n <= S_SMALL else N_DRAWS


def _tensors(params, seeds=None, steps=None):
    n = len(params)
    seeds = list(range(1000, 1000 + n)) if seeds is None else seeds
    steps = [0] * n if steps is None else steps
    return SamplingTensors.from_params(params, seeds, steps, pad_to=_rows(n))


def _run(logits, t, *, full=True, cap=DEFAULT_TOPK_CAP, prompt_mask=None, output_counts=None,
         banned_ids=None, banned_mask=None):
    """Run the jitted sampler on padded, fixed shapes so that only a few variants ever compile.

    full=True passes every optional input (zeros / -1 where not given) and num_logprobs=5;
    full=False passes none of them (the penalty-free fast path, num_logprobs=0).
    """
    logits = np.asarray(logits, np.float32)
    n, v = logits.shape
    s = t.temperature.shape[0]

    def pad(a, fill=0):
        a = np.asarray(a)
        return np.concatenate([a, np.full((s - n,) + a.shape[1:], fill, a.dtype)])

    kw = {}
    if full:
        kw = dict(
            prompt_mask=pad(np.zeros((n, v), bool) if prompt_mask is None else prompt_mask),
            output_counts=pad(np.zeros((n, v), np.int32) if output_counts is None
                              else np.asarray(output_counts, np.int32)),
            banned_ids=pad(np.full((n, 4), -1, np.int32) if banned_ids is None
                           else np.asarray(banned_ids, np.int32), -1),
            banned_mask=pad(np.zeros((n, v), bool) if banned_mask is None else banned_mask),
            num_logprobs=5,
        )
    else:
        assert prompt_mask is None and output_counts is None
        assert banned_ids is None and banned_mask is None
    out = _sample(jnp.asarray(pad(logits)), t, topk_cap=cap, **kw)
    return jax.tree.map(lambda a: np.asarray(a)[:n], out)


def _draws(logits_row, params, seed=1234, full=False, **kw):
    """N_DRAWS samples from one logits row: one row per draw, same seed, step = draw index."""
    logits = np.broadcast_to(np.asarray(logits_row, np.float32), (N_DRAWS, len(logits_row)))
    t = _tensors([params] * N_DRAWS, seeds=[seed] * N_DRAWS, steps=list(range(N_DRAWS)))
    return _run(logits, t, full=full, **kw).tokens


def _softmax(x):
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


def _chi2(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    assert counts[probs == 0].sum() == 0, "sampled a zero-probability token"
    exp = len(tokens) * probs
    m = exp > 0
    return float(((counts[m] - exp[m]) ** 2 / exp[m]).sum())


def _random_logits(rng, shape, scale=2.0):
    # continuous values: no ties, never all zeros
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------
# SamplingParams validation
# ------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("temperature", -1.0, ValueError),
    ("temperature", "hot", TypeError),
    ("temperature", float("nan"), ValueError),
    ("top_p", 0.0, ValueError),
    ("top_p", 1.5, ValueError),
    ("top_p", -0.1, ValueError),
    ("top_k", -2, ValueError),
    ("top_k", 2.5, TypeError),
    ("min_p", -0.1, ValueError),
    ("min_p", 1.1, ValueError),
    ("presence_penalty", 2.5, ValueError),
    ("presence_penalty", -2.1, ValueError),
    ("frequency_penalty", 2.01, ValueError),
    ("frequency_penalty", -3.0, ValueError),
    ("repetition_penalty", 0.0, ValueError),
    ("repetition_penalty", -1.0, ValueError),
    ("n", 0, ValueError),
    ("n", 1.0, TypeError),
    ("best_of", 0, ValueError),
    ("max_tokens", 0, ValueError),
    ("max_tokens", -5, ValueError),
    ("max_tokens", "16", TypeError),
    ("min_tokens", -1, ValueError),
    ("logprobs", -1, ValueError),
    ("logprobs", 21, ValueError),
    ("prompt_logprobs", -1, ValueError),
    ("prompt_logprobs", 21, ValueError),
    ("seed", 1.5, TypeError),
    ("seed", "42", TypeError),
    ("stop", "", ValueError),
    ("stop", ["ok", ""], ValueError),
    ("stop", [1], TypeError),
    ("stop", 5, TypeError),
    ("stop_token_ids", [-1], ValueError),
    ("stop_token_ids", 7, TypeError),
    ("ignore_eos", 1, TypeError),
    ("skip_special_tokens", "yes", TypeError),
]


@pytest.mark.parametrize("field,value,exc", BAD_VALUES)
def test_validation_rejects(field, value, exc):
    with pytest.raises(exc) as ei:
        SamplingParams(**{field: value})
    assert field in str(ei.value)


def test_validation_message_names_value_and_range():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1.0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\], got 21"):
        SamplingParams(logprobs=21)


def test_min_tokens_le_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    SamplingParams(min_tokens=10, max_tokens=None)
    SamplingParams(min_tokens=5, max_tokens=5)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20
    assert SamplingParams(seed=-3).seed == -3
    assert SamplingParams(temperature=1).temperature == 1.0
    assert isinstance(SamplingParams(temperature=np.float32(0.5)).temperature, float)


def test_clone():
    p = SamplingParams(temperature=0.5, stop=["x"])
    q = p.clone(top_k=5)
    assert q.top_k == 5 and q.temperature == 0.5 and q.stop == ["x"]
    q.stop.append("y")
    assert p.stop == ["x"]
    with pytest.raises(ValueError, match="top_k"):
        p.clone(top_k=-7)


def test_from_params_padding():
    ps = [SamplingParams(top_k=-1, temperature=0.7), SamplingParams(top_k=5, top_p=0.9)]
    t = SamplingTensors.from_params(ps, [2**32 + 5, 7], [3, 4], pad_to=4)
    assert t.temperature.shape == (4,)
    np.testing.assert_array_equal(t.top_k, [0, 5, 0, 0])
    np.testing.assert_allclose(t.top_p, [1.0, 0.9, 1.0, 1.0])
    np.testing.assert_array_equal(t.seed, [5, 7, 0, 0])
    np.testing.assert_array_equal(t.step, [3, 4, 0, 0])
    assert t.seed.dtype == np.uint32 and t.top_k.dtype == np.int32
    assert t.temperature[2] < GREEDY_EPS  # padding rows are greedy (cheap, harmless)
    with pytest.raises(ValueError):
        SamplingTensors.from_params(ps, [1, 2], [0, 0], pad_to=1)


# ------------------------------------------------------------------------------------------
# Device sampler
# ------------------------------------------------------------------------------------------


def test_token_counts():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(8, 20)).astype(np.int32)
    ids[0, 3] = -1  # ignored
    lengths = np.array([20, 0, 5, 19, 1, 20, 7, 13], np.int32)
    counts = np.asarray(jax.jit(token_counts, static_argnums=2)(ids, lengths, 64))
    for s in range(8):
        row = ids[s, : lengths[s]]
        np.testing.assert_array_equal(counts[s], np.bincount(row[row >= 0], minlength=64))


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    logits = _random_logits(rng, (8, 64))
    temps = [0.0, 1e-6, 0.0, 1.0, 0.0, 0.7, 0.0, 0.0]
    t = _tensors([SamplingParams(temperature=x, top_k=3) for x in temps])
    tok = _run(logits, t).tokens
    greedy = np.array(temps) < GREEDY_EPS
    np.testing.assert_array_equal(tok[greedy], logits.argmax(1)[greedy])
    # all-greedy batch (skips the RNG branch)
    t0 = _tensors([SamplingParams(temperature=0.0)] * 8)
    np.testing.assert_array_equal(_run(logits, t0, full=False).tokens, logits.argmax(1))


def test_top_k_only_samples_top_k():
    rng = np.random.default_rng(2)
    row = _random_logits(rng, V_STAT, scale=0.5)  # flat-ish: plenty of mass outside the top k
    k = 3
    tok = _draws(row, SamplingParams(top_k=k))
    top = set(np.argsort(-row)[:k].tolist())
    assert set(np.unique(tok).tolist()) == top
    probs = np.zeros(V_STAT)
    probs[list(top)] = _softmax(row[list(top)])
    assert _chi2(tok, probs) < CHI2_CRIT[7]


def test_top_p_only_samples_nucleus():
    probs = np.array([0.3, 0.25, 0.2, 0.1, 0.04, 0.03, 0.03, 0.025] + [0.003125] * 8)
    assert abs(probs.sum() - 1) < 1e-12
    row = np.log(probs).astype(np.float32)
    # mass before token 3 is 0.75 < 0.8 (kept), before token 4 0.85 (cut): nucleus = tokens 0..3
    tok = _draws(row, SamplingParams(top_p=0.8))
    assert set(np.unique(tok).tolist()) == {0, 1, 2, 3}
    probs = np.zeros(V_STAT)
    probs[:4] = _softmax(row[:4])
    assert _chi2(tok, probs) < CHI2_CRIT[7]


def test_min_p():
    row = np.log(np.array([0.4, 0.2, 0.15, 0.1, 0.07, 0.05, 0.02, 0.01] + [0.0] * 8) + 1e-9)
    # p_max = 0.4 (the others only need to be proportional)
    row = row.astype(np.float32)
    # min_p = 0.2 -> keep p >= 0.08: tokens 0..3
    tok = _draws(row, SamplingParams(min_p=0.2))
    assert set(np.unique(tok).tolist()) == {0, 1, 2, 3}
    probs = np.zeros(V_STAT)
    probs[:4] = _softmax(row[:4])
    assert _chi2(tok, probs) < CHI2_CRIT[7]


def _np_filter(x, temp, top_k, top_p, min_p):
    """numpy float64 reimplementation of temperature -> min_p -> top_k -> top_p (vLLM order)."""
    x = np.asarray(x, np.float64) / temp
    keep = x >= x.max() + (np.log(min_p) if min_p > 0 else -np.inf)
    if 0 < top_k < len(x):
        kth = np.sort(x[keep])[::-1][min(top_k, keep.sum()) - 1]
        keep &= x >= kth
    if top_p < 1:
        p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        excl = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[excl < top_p]] = True
        keep &= nucleus
    return keep


@pytest.mark.parametrize("cap,mode", [(0, "mixed"), (4, "mixed"), (64, "mixed"), (4, "small_k")])
def test_filter_sets_match_numpy(cap, mode):
    """Exact allowed sets for per-row params against numpy.

    cap=0: always the full sort; cap=64 (= V): full sort; cap=4 mixed: fast prefix for covered rows
    plus the sort fallback for the others; cap=4 small_k: every row covered, fast branch only.
    """
    rng = np.random.default_rng(3)
    s, v = S_SMALL, 64
    logits = _random_logits(rng, (s, v))
    params = []
    for i in range(s):
        if mode == "small_k":
            params.append(SamplingParams(temperature=float(rng.choice([0.3, 1.0, 2.5])),
                                         top_k=int(rng.choice([-1, 1, 2, 3])),
                                         min_p=float(rng.choice([0.0, 0.05]))))
            continue
        params.append(
            SamplingParams(
                temperature=float(rng.choice([0.3, 1.0, 2.5])),
                top_k=int(rng.choice([-1, 0, 1, 3, 10, 40])),
                top_p=float(rng.choice([1.0, 0.95, 0.5, 0.1])),
                min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])),
            )
        )
    t = _tensors(params)
    y = np.asarray(_processed(jnp.asarray(logits), t, topk_cap=cap))
    for i, p in enumerate(params):
        want = _np_filter(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)
        np.testing.assert_array_equal(np.isfinite(y[i]), want, err_msg=f"row {i}: {p}")
        np.testing.assert_allclose(y[i][want], logits[i][want] / p.temperature, rtol=1e-6)


def test_fast_and_fallback_paths_agree():
    rng = np.random.default_rng(4)
    s, v = 64, 64
    logits = _random_logits(rng, (s, v), scale=0.7)
    params = [
        SamplingParams(top_k=int(rng.choice([-1, 2, 5, 30])), top_p=float(rng.choice([1.0, 0.9])))
        for _ in range(s)
    ]
    t = _tensors(params)
    a = _run(logits, t, full=False, cap=4).tokens
    b = _run(logits, t, full=False, cap=0).tokens
    c = _run(logits, t, full=False).tokens
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_seed_reproducibility_and_batch_independence():
    rng = np.random.default_rng(5)
    s, v = 16, 64
    logits = _random_logits(rng, (s, v), scale=0.5)
    params = [SamplingParams(temperature=1.0, top_k=int(rng.choice([-1, 8])), top_p=0.95)] * s
    seeds = list(range(s))
    t = _tensors(params, seeds=seeds, steps=[7] * s)
    a = _run(logits, t, full=False).tokens
    b = _run(logits, t, full=False).tokens
    np.testing.assert_array_equal(a, b)

    # different seeds -> different draws (16 rows over a 64-way flat-ish distribution)
    t2 = _tensors(params, seeds=[x + 100 for x in seeds], steps=[7] * s)
    c = _run(logits, t2, full=False).tokens
    assert (a != c).sum() >= s // 2
    # different step -> different draws
    t3 = _tensors(params, seeds=seeds, steps=[8] * s)
    assert (a != _run(logits, t3, full=False).tokens).sum() >= s // 2

    # move row 3 to position 11 and replace every other row (logits and params)
    logits2 = _random_logits(rng, (s, v))
    logits2[11] = logits[3]
    params2 = [SamplingParams(temperature=2.0, top_p=0.3, min_p=0.1)] * s
    params2[11] = params[3]
    seeds2 = list(range(500, 500 + s))
    seeds2[11] = seeds[3]
    t4 = _tensors(params2, seeds=seeds2, steps=[7] * s)
    d = _run(logits2, t4, full=False).tokens
    assert d[11] == a[3]
    # whole permutation
    perm = rng.permutation(s)
    t5 = _tensors([params[i] for i in perm], seeds=[seeds[i] for i in perm], steps=[7] * s)
    e = _run(logits[perm], t5, full=False).tokens
    np.testing.assert_array_equal(e, a[perm])


def test_temperature_shapes_distribution():
    row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0], np.float32)
    row = np.concatenate([row, np.full(8, -np.inf, np.float32)])  # only 8 live tokens
    for temp in (0.5, 2.0):
        tok = _draws(row, SamplingParams(temperature=temp))
        right = _chi2(tok, _softmax(row / temp))
        wrong = _chi2(tok, _softmax(row))  # the untempered distribution
        assert right < CHI2_CRIT[7], (temp, right)
        assert wrong > 10 * CHI2_CRIT[7], (temp, wrong)
    cold = np.bincount(_draws(row, SamplingParams(temperature=0.5)), minlength=V_STAT)
    hot = np.bincount(_draws(row, SamplingParams(temperature=2.0)), minlength=V_STAT)
    assert cold[0] > hot[0] and cold[7] < hot[7]


def _np_penalties(x, prompt_mask, counts, rep, freq, pres):
    x = x.astype(np.float64).copy()
    seen = np.zeros_like(x, bool)
    if prompt_mask is not None:
        seen |= prompt_mask
    if counts is not None:
        seen |= counts > 0
    rep = rep[:, None]
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    if counts is not None:
        x = x - freq[:, None] * counts - pres[:, None] * (counts > 0)
    return x


def test_penalties_match_formula():
    rng = np.random.default_rng(6)
    s, v = S_SMALL, 64
    logits = _random_logits(rng, (s, v))
    prompt_mask = rng.random((s, v)) < 0.2
    counts = rng.integers(0, 4, size=(s, v)) * (rng.random((s, v)) < 0.3)
    params = [
        SamplingParams(
            repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])),
            frequency_penalty=float(rng.uniform(-2, 2)),
            presence_penalty=float(rng.uniform(-2, 2)),
        )
        for _ in range(s)
    ]
    t = _tensors(params)
    rep = np.array([p.repetition_penalty for p in params])
    freq = np.array([p.frequency_penalty for p in params])
    pres = np.array([p.presence_penalty for p in params])
    for pm, oc in [(prompt_mask, counts), (None, counts), (prompt_mask, None), (None, None)]:
        got = _penalties(
            jnp.asarray(logits), t,
            None if pm is None else jnp.asarray(pm),
            None if oc is None else jnp.asarray(oc, jnp.int32),
        )
        want = _np_penalties(logits, pm, oc, rep, freq, pres)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert apply_penalties(logits, t) is logits  # no-op when unused

    # greedy sampling follows the penalised argmax
    tg = _tensors([p.clone(temperature=0.0) for p in params])
    out = _run(logits, tg, prompt_mask=prompt_mask, output_counts=counts)
    want = _np_penalties(logits, prompt_mask, counts, rep, freq, pres).argmax(1)
    np.testing.assert_array_equal(out.tokens, want)


def test_penalised_sampling_distribution():
    row = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.2, -0.4] * 2, np.float32)
    pm = np.zeros(V_STAT, bool)
    pm[[0, 5]] = True
    counts = np.zeros(V_STAT, np.int32)
    counts[[1, 2, 9]] = [1, 3, 2]
    p = SamplingParams(repetition_penalty=1.8, frequency_penalty=0.4, presence_penalty=0.5)
    logits = np.broadcast_to(row, (N_DRAWS, V_STAT))
    t = _tensors([p] * N_DRAWS, seeds=[99] * N_DRAWS, steps=list(range(N_DRAWS)))
    tok = _run(logits, t, prompt_mask=np.broadcast_to(pm, logits.shape),
               output_counts=np.broadcast_to(counts, logits.shape)).tokens
    pen = _np_penalties(row[None], pm[None], counts[None], np.array([1.8]), np.array([0.4]),
                        np.array([0.5]))[0]
    assert _chi2(tok, _softmax(pen)) < CHI2_CRIT[15]
    assert _chi2(tok, _softmax(row)) > 5 * CHI2_CRIT[15]  # the unpenalised one is rejected


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(7)
    s, v = 8, 64
    logits = _random_logits(rng, (s, v))
    params = [SamplingParams(temperature=float(x), top_k=5, repetition_penalty=1.5)
              for x in (0.0, 0.5, 1.0, 2.0, 0.0, 0.3, 1.0, 1.0)]
    t = _tensors(params)
    counts = (rng.random((s, v)) < 0.3).astype(np.int32)
    out = _run(logits, t, output_counts=counts)
    x = logits.astype(np.float64)
    ref = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
    tok = out.tokens
    np.testing.assert_allclose(out.logprobs, ref[np.arange(s), tok], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=1)[:, :5])
    np.testing.assert_allclose(
        out.top_logprobs, np.take_along_axis(ref, np.argsort(-logits, 1)[:, :5], 1),
        atol=1e-5,
    )
    out0 = _run(logits, t, full=False)
    assert out0.top_ids.shape == (s, 0) and out0.top_logprobs.shape == (s, 0)


def test_banned_never_sampled():
    rng = np.random.default_rng(8)
    row = _random_logits(rng, V_STAT, scale=0.3)
    order = np.argsort(-row)
    banned = np.full((N_DRAWS, 4), -1, np.int32)
    banned[:, 0] = order[0]
    banned[:, 2] = order[1]
    tok = _draws(row, SamplingParams(), full=True, banned_ids=banned)
    assert not np.isin(tok, order[:2]).any()
    assert len(np.unique(tok)) == V_STAT - 2  # the rest is still sampled; -1 padding bans nothing
    # greedy rows and boolean masks
    mask = np.zeros((N_DRAWS, V_STAT), bool)
    mask[:, order[0]] = True
    tok = _draws(row, SamplingParams(temperature=0.0), full=True, banned_mask=mask)
    assert (tok == order[1]).all()
    # helper directly
    m = np.asarray(mask_tokens(jnp.zeros((2, 5)), jnp.array([[1, -1], [4, 0]], jnp.int32)))
    np.testing.assert_array_equal(np.isinf(m), [[0, 1, 0, 0, 0], [1, 0, 0, 0, 1]])
