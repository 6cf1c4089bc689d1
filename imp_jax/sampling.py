"""Sampling parameters (validated, vLLM semantics) and the on-device batched sampler.

Host side
---------
``SamplingParams`` mirrors ``vllm.SamplingParams`` (same field names, defaults and meaning).
Stop strings, stop token ids, ``max_tokens``/``min_tokens`` bookkeeping and detokenisation are the
engine's job; this module only turns a batch of params into ``SamplingTensors`` (one row per
sequence) and samples one token per row on device.

Device side
-----------
``sample(logits[S, V], t, ...)`` is jit-able, has no host syncs and treats every row with its own
parameters. Order of operations follows vLLM:

1. ban tokens (``banned_ids`` / ``banned_mask``; e.g. EOS before ``min_tokens``)
2. penalties: repetition (tokens seen in prompt or output: positive logits divided, negative
   multiplied), then frequency (``- f * count``) and presence (``- p * (count > 0)``) on output counts
3. greedy rows (temperature < ``GREEDY_EPS``) take the argmax of these logits
4. temperature, then min_p, then top_k, then top_p (top_p renormalises over the top_k survivors)
5. Gumbel-max sampling with the row key ``fold_in(PRNGKey(seed), step)``: the result of a row depends
   only on that row's logits, params, seed and step, never on the rest of the batch or its position.

Logprobs (sampled token and top-N) are ``log_softmax`` of the RAW logits (before bans, penalties and
temperature), like vLLM v1's default ``raw_logprobs`` mode.

top-k / top-p strategy (exact)
------------------------------
Filtering is expressed as one threshold per row on the scaled logits (keep ``x >= thr``), so the
final mask and the Gumbel noise are always applied to the full row. The threshold comes from the
row's values sorted in descending order:

* Fast path: ``lax.top_k(x, topk_cap)`` (static cap, default 64) gives the first ``cap`` sorted
  values. For each row we also compute whether that prefix is *provably sufficient*: top_k <= cap
  with no tie straddling the cap, and (if top_p < 1) the nucleus mass is reached inside the prefix.
* Exact fallback: when some row in the batch is not covered, a full descending sort of ``[S, V]`` is
  done (inside ``lax.cond``, so it only runs when needed) and used for the uncovered rows only;
  covered rows keep the fast-path threshold, so a row's result never depends on which path ran.
* Batches where no row uses top_k/top_p skip all of it (``lax.cond``); all-greedy batches skip
  RNG and filtering entirely.

Set ``topk_cap=0`` to always use the full sort. Not yet profiled on GPU: check whether XLA lowers
``lax.top_k(x, cap)`` to a dedicated TopK kernel or to a sort there; if it is a sort, lower the cap
(or set 0). The ``lax.cond`` predicates are device values (no Python-level sync); XLA:GPU may still
read a predicate back inside the executable, so if a profile shows a stall, hoist the decision to
host-side static flags.

Ties: top_k keeps every token whose value equals the k-th largest (vLLM does the same); top_p
keeps every token tied with the last nucleus token (vLLM decides ties by sort position).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
DEFAULT_TOPK_CAP = 64

__all__ = [
    "GREEDY_EPS",
    "MAX_LOGPROBS",
    "SamplingParams",
    "SamplingTensors",
    "SampleOutput",
    "token_counts",
    "mask_tokens",
    "apply_penalties",
    "processed_logits",
    "row_keys",
    "sample",
]


# --------------------------------------------------------------------------------------------
# SamplingParams
# --------------------------------------------------------------------------------------------


INT32_MAX = 2**31 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass
class SamplingParams:
    """vLLM-compatible sampling parameters; validated in ``__post_init__``.

    ``top_k`` of 0 or -1 disables top-k; ``logprobs=0`` returns only the sampled token's logprob;
    ``max_tokens=None`` means "until the context is full". ``stop`` is normalised to a list.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # ---- integers
        self.n = self._int("n", self.n, lo=1)
        if self.best_of is not None:
            self.best_of = self._int("best_of", self.best_of, lo=self.n, lo_desc="n")
        self.top_k = self._int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens is not None:
            self.max_tokens = self._int("max_tokens", self.max_tokens, lo=1)
        self.min_tokens = self._int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                v = self._int(name, v, lo=0)
                if v > MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")
                setattr(self, name, v)
        if self.seed is not None:
            self.seed = self._int("seed", self.seed)

        # ---- floats
        self.temperature = self._float("temperature", self.temperature)
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = self._float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = self._float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = self._float(name, getattr(self, name))
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
            setattr(self, name, v)
        self.repetition_penalty = self._float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        # ---- stop strings / ids
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise TypeError(f"stop must be a str, a list of str or None, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop must contain only strings, got {s!r}")
            if not s:
                raise ValueError("stop must contain only non-empty strings, got ''")
        self.stop = stop
        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif isinstance(ids, (list, tuple)):
            ids = list(ids)
        else:
            raise TypeError(
                f"stop_token_ids must be a list of int or None, got {type(ids).__name__}"
            )
        for i in ids:
            if not _is_int(i) or i < 0:
                raise ValueError(f"stop_token_ids must contain ints >= 0, got {i!r}")
        self.stop_token_ids = [int(i) for i in ids]

        # ---- bools
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {v!r}")
            setattr(self, name, bool(v))

    @staticmethod
    def _int(name: str, v: Any, lo: int | None = None, lo_desc: str | None = None) -> int:
        if not _is_int(v):
            raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
        v = int(v)
        if lo is not None and v < lo:
            bound = f"{lo_desc}={lo}" if lo_desc else str(lo)
            raise ValueError(f"{name} must be >= {bound}, got {v}")
        return v

    @staticmethod
    def _float(name: str, v: Any) -> float:
        if not _is_real(v):
            raise TypeError(f"{name} must be a float, got {v!r} ({type(v).__name__})")
        v = float(v)
        if v != v:
            raise ValueError(f"{name} must not be NaN, got {v}")
        return v

    # ---- helpers
    @property
    def greedy(self) -> bool:
        """True when temperature < GREEDY_EPS: the sampler takes the argmax."""
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def clone(self, **changes: Any) -> "SamplingParams":
        """A validated copy with ``changes`` applied (lists are copied)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["stop"] = list(fields["stop"])
        fields["stop_token_ids"] = list(fields["stop_token_ids"])
        fields.update(changes)
        return SamplingParams(**fields)


# --------------------------------------------------------------------------------------------
# Device-side tensors
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters of a batch of S sequences (a pytree; all leaves shape [S])."""

    temperature: jax.Array  # f32[S]; < GREEDY_EPS -> greedy
    top_k: jax.Array  # i32[S]; 0 = off
    top_p: jax.Array  # f32[S]; 1 = off
    min_p: jax.Array  # f32[S]; 0 = off
    presence_penalty: jax.Array  # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    repetition_penalty: jax.Array  # f32[S]; 1 = off
    seed: jax.Array  # u32[S]
    step: jax.Array  # i32[S]; tokens generated so far by this request

    @staticmethod
    def from_params(
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        pad_to: int | None = None,
    ) -> "SamplingTensors":
        """Host-side builder (numpy). Rows >= len(params) are greedy no-op padding."""
        n = len(params)
        if len(seeds) != n or len(steps) != n:
            raise ValueError(
                f"params, seeds and steps must have the same length, got {n}, {len(seeds)}, "
                f"{len(steps)}"
            )
        s = n if pad_to is None else int(pad_to)
        if s < n:
            raise ValueError(f"pad_to must be >= len(params)={n}, got {pad_to}")

        def col(values, dtype, pad):  # one array per field: no per-element numpy stores
            out = np.full(s, pad, dtype)
            out[:n] = np.fromiter(values, dtype, n)
            return out

        return SamplingTensors(
            temperature=col((p.temperature for p in params), np.float32, 0),
            # any k beyond the vocabulary keeps every token: clamped to fit int32
            top_k=col((min(max(p.top_k, 0), INT32_MAX) for p in params), np.int32, 0),
            top_p=col((p.top_p for p in params), np.float32, 1),
            min_p=col((p.min_p for p in params), np.float32, 0),
            presence_penalty=col((p.presence_penalty for p in params), np.float32, 0),
            frequency_penalty=col((p.frequency_penalty for p in params), np.float32, 0),
            repetition_penalty=col((p.repetition_penalty for p in params), np.float32, 1),
            seed=col((int(x) & 0xFFFFFFFF for x in seeds), np.uint32, 0),
            step=col((int(x) for x in steps), np.int32, 0),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]; raw logprob of the sampled token
    top_ids: jax.Array  # i32[S, num_logprobs]; raw top-N token ids, best first
    top_logprobs: jax.Array  # f32[S, num_logprobs]


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


def token_counts(token_ids: jax.Array, lengths: jax.Array, vocab: int) -> jax.Array:
    """Histogram i32[S, vocab] of ``token_ids[s, :lengths[s]]``; ids outside [0, vocab) ignored."""
    token_ids = jnp.asarray(token_ids, jnp.int32)
    s, l = token_ids.shape
    valid = jnp.arange(l, dtype=jnp.int32)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
    valid = valid & (token_ids >= 0) & (token_ids < vocab)
    ids = jnp.where(valid, token_ids, vocab)  # out of bounds -> dropped
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, l))
    return jnp.zeros((s, vocab), jnp.int32).at[rows, ids].add(1, mode="drop")


def mask_tokens(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """Set banned logits to -inf. ``banned`` is bool[S, V] or ids i32[S, K] padded with -1."""
    banned = jnp.asarray(banned)
    if banned.dtype == jnp.bool_:
        return jnp.where(banned, -jnp.inf, logits)
    s, v = logits.shape
    ids = banned.astype(jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < v), ids, v)  # -1 padding -> out of bounds -> dropped
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], ids.shape)
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def apply_penalties(
    logits: jax.Array,
    t: SamplingTensors,
    prompt_mask: jax.Array | None = None,
    output_counts: jax.Array | None = None,
) -> jax.Array:
    """vLLM penalties. ``None`` inputs skip the corresponding work at trace time."""
    if prompt_mask is None and output_counts is None:
        return logits
    seen = None
    if output_counts is not None:
        counts = output_counts.astype(jnp.int32)
        seen = counts > 0
    if prompt_mask is not None:
        pm = prompt_mask.astype(jnp.bool_)
        seen = pm if seen is None else (seen | pm)
    rep = jnp.asarray(t.repetition_penalty, jnp.float32)[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    if output_counts is not None:
        freq = jnp.asarray(t.frequency_penalty, jnp.float32)[:, None]
        pres = jnp.asarray(t.presence_penalty, jnp.float32)[:, None]
        out_seen = (counts > 0).astype(jnp.float32)
        logits = logits - freq * counts.astype(jnp.float32) - pres * out_seen
    return logits


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """Per-row typed PRNG keys ``fold_in(key(seed), step)``."""
    seed = jnp.asarray(seed, jnp.uint32)
    step = jnp.asarray(step, jnp.int32)
    return jax.vmap(lambda s, st: jax.random.fold_in(jax.random.key(s), st))(seed, step)


def _threshold_from_desc(
    vals: jax.Array,
    k: jax.Array,
    top_p: jax.Array,
    lse_all: jax.Array,
    complete: bool,
) -> tuple[jax.Array, jax.Array]:
    """Keep-threshold per row from the row's values sorted descending (a prefix if not complete).

    Returns (thr f32[S], ok bool[S]); ok says the prefix provably determines the exact threshold.
    ``k`` is 0 when top-k is off; top_p >= 1 means off. ``lse_all`` is the full-row logsumexp.
    """
    c = vals.shape[1]
    use_k = k > 0
    use_p = top_p < 1.0
    kidx = jnp.clip(k - 1, 0, c - 1)
    kth = jnp.take_along_axis(vals, kidx[:, None], axis=1)[:, 0]
    kth = jnp.where(use_k, kth, -jnp.inf)
    kmask = vals >= kth[:, None]
    # top_p renormalises over the top_k survivors (vLLM order: top_k then top_p).
    lse_k = jax.nn.logsumexp(jnp.where(kmask, vals, -jnp.inf), axis=1)
    lse = jnp.where(use_k, lse_k, lse_all)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    p = jnp.where(kmask, jnp.exp(vals - lse[:, None]), 0.0)
    incl = jnp.cumsum(p, axis=1)
    excl = incl - p
    keep = kmask & (excl < top_p[:, None])  # a prefix: kmask is a prefix, excl is monotone
    n_keep = jnp.maximum(jnp.sum(keep, axis=1), 1)
    thr_p = jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=1)[:, 0]
    thr = jnp.where(use_p, thr_p, kth)
    if complete:
        ok = jnp.ones(vals.shape[0], jnp.bool_)
    else:
        last = vals[:, c - 1]
        k_ok = ~use_k | ((k <= c) & (last < kth))  # no tie with the k-th value beyond the prefix
        p_ok = ~use_p | (incl[:, c - 1] >= top_p)  # nucleus closes inside the prefix
        ok = k_ok & p_ok
    return thr, ok


def _top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array, cap: int) -> jax.Array:
    """Mask (to -inf) everything outside top_k then top_p, per row. Exact; see module doc."""
    s, v = x.shape
    k = jnp.where((top_k > 0) & (top_k < v), top_k, 0).astype(jnp.int32)
    need = (k > 0) | (top_p < 1.0)

    def full_thr(x):
        lse_all = jax.nn.logsumexp(x, axis=1)
        vals = -jnp.sort(-x, axis=1)
        thr, _ = _threshold_from_desc(vals, k, top_p, lse_all, complete=True)
        return thr

    def filt(x):
        if cap <= 0 or cap >= v:
            thr = full_thr(x)
        else:
            lse_all = jax.nn.logsumexp(x, axis=1)
            vals_c, _ = jax.lax.top_k(x, cap)
            thr_c, ok_c = _threshold_from_desc(vals_c, k, top_p, lse_all, complete=False)
            thr = jax.lax.cond(
                jnp.all(ok_c | ~need),
                lambda x: thr_c,
                lambda x: jnp.where(ok_c, thr_c, full_thr(x)),
                x,
            )
        thr = jnp.where(need, thr, -jnp.inf)
        return jnp.where(x >= thr[:, None], x, -jnp.inf)

    return jax.lax.cond(jnp.any(need), filt, lambda x: x, x)


def processed_logits(
    logits: jax.Array,
    t: SamplingTensors,
    *,
    topk_cap: int = DEFAULT_TOPK_CAP,
) -> jax.Array:
    """Temperature, min_p, top_k, top_p applied to (already banned/penalised) logits.

    Returns f32[S, V]: the logits the Gumbel-max draw uses (-inf = filtered). Greedy rows are
    scaled by 1 (their value is irrelevant to ``sample``).
    """
    temp = jnp.asarray(t.temperature, jnp.float32)
    greedy = temp < GREEDY_EPS
    x = logits / jnp.where(greedy, 1.0, temp)[:, None]
    # min_p: keep p >= min_p * p_max  <=>  x >= x_max + log(min_p)
    min_p = jnp.asarray(t.min_p, jnp.float32)
    x_max = jnp.max(x, axis=1, keepdims=True)
    x = jnp.where(x >= x_max + jnp.log(min_p)[:, None], x, -jnp.inf)
    return _top_k_top_p(
        x, jnp.asarray(t.top_k, jnp.int32), jnp.asarray(t.top_p, jnp.float32), topk_cap
    )


def sample(
    logits: jax.Array,
    t: SamplingTensors,
    *,
    prompt_mask: jax.Array | None = None,
    output_counts: jax.Array | None = None,
    banned_ids: jax.Array | None = None,
    banned_mask: jax.Array | None = None,
    num_logprobs: int = 0,
    topk_cap: int = DEFAULT_TOPK_CAP,
) -> SampleOutput:
    """Sample one token per row. jit-able; ``num_logprobs`` and ``topk_cap`` must be static.

    logits f32/bf16[S, V]; prompt_mask bool[S, V]; output_counts i32[S, V] (see token_counts);
    banned_ids i32[S, K] (-1 padded) and/or banned_mask bool[S, V]: never sampled.
    """
    raw = jnp.asarray(logits).astype(jnp.float32)
    s, v = raw.shape
    x = raw
    if banned_ids is not None:
        x = mask_tokens(x, banned_ids)
    if banned_mask is not None:
        x = mask_tokens(x, jnp.asarray(banned_mask, jnp.bool_))
    x = apply_penalties(x, t, prompt_mask, output_counts)

    temp = jnp.asarray(t.temperature, jnp.float32)
    greedy = temp < GREEDY_EPS
    greedy_tok = jnp.argmax(x, axis=1).astype(jnp.int32)

    def draw(x):
        y = processed_logits(x, t, topk_cap=topk_cap)
        keys = row_keys(t.seed, t.step)
        g = jax.vmap(lambda key: jax.random.gumbel(key, (v,), jnp.float32))(keys)
        tok = jnp.argmax(y + g, axis=1).astype(jnp.int32)
        return jnp.where(greedy, greedy_tok, tok)

    tokens = jax.lax.cond(jnp.all(greedy), lambda x: greedy_tok, draw, x)

    lse = jax.nn.logsumexp(raw, axis=1)
    lp = jnp.take_along_axis(raw, tokens[:, None], axis=1)[:, 0] - lse
    if num_logprobs > 0:
        top_vals, top_ids = jax.lax.top_k(raw, num_logprobs)
        top_lp = top_vals - lse[:, None]
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_lp = jnp.zeros((s, 0), jnp.float32)
        top_ids = jnp.zeros((s, 0), jnp.int32)
    return SampleOutput(tokens=tokens, logprobs=lp, top_ids=top_ids, top_logprobs=top_lp)
