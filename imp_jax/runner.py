"""The compiled step: one jitted forward (+ on-device sampling) over the paged cache.

The host describes a step as a list of `StepSeq` (which tokens of which sequence, at which
position, in which pages); `ModelRunner.step` pads it to shape buckets, builds the attention
metadata and runs one compiled program with the cache donated, so XLA updates the page pools in
place. Buckets are powers of two, so the set of programs is small and fixed after warm-up.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.attention import resolve_impl
from imp_jax.cache import POOL_FILLS, AttentionMetadata, KVCache
from imp_jax.config import ModelConfig
from imp_jax.models.llama import Transformer
from imp_jax.sampling import SampleOutput, SamplingTensors, sample, token_counts

log = logging.getLogger("imp_jax.runner")


@dataclasses.dataclass
class StepSeq:
    token_ids: Sequence[int]  # the tokens this step processes (a prompt chunk, or one decode token)
    start_pos: int  # how many tokens of this sequence are already in the cache
    pages: Sequence[int]  # the sequence's pages, covering start_pos + len(token_ids) tokens
    all_logits: bool = False  # return logits of every token (scoring, prompt logprobs)
    history: Sequence[int] | None = None  # prompt + output ids, for penalties
    prompt_len: int = 0  # how much of history is prompt (repetition penalty covers it)
    banned: Sequence[int] = ()  # token ids that must not be sampled (EOS before min_tokens)
    # decode_steps only: how many of the block's steps this row runs (None = all); a row that
    # reaches its length limit inside a block stops writing K/V there (its later tokens are
    # garbage the engine never reads), so it needs pages for `steps` tokens only
    steps: int | None = None


@dataclasses.dataclass
class StepOutput:
    """Device arrays; reading them (np.asarray) is the host sync, so callers choose when."""

    sample: SampleOutput | None  # one row per StepSeq (padded rows beyond)
    logits: jax.Array | None  # [T_bucket, vocab] f32 when any StepSeq asked for all_logits
    token_offsets: np.ndarray  # flat index of each StepSeq's first token in `logits`
    enqueue_s: float = 0.0  # host time to build the inputs and enqueue the step's programs


def bucket(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Smallest power of two >= max(n, lo), capped at hi."""
    b = max(lo, 1 << max(0, int(n) - 1).bit_length())
    return min(b, hi) if hi is not None else b


# Rows of a prompt program on the kernel path (see ModelRunner._grouped_step); the default of
# $IMP_JAX_PROMPT_ROWS (prompt_rows()).
PROMPT_ROWS = 64
# Columns of the banned-token array (EOS and stop ids before min_tokens).
BANNED_WIDTH = 8


def _pad_rows(tree, rows: int):
    """Pad every per-sequence array to `rows` by repeating its last row (valid, discarded)."""
    def pad(a):
        a = np.asarray(a)
        return a if a.shape[0] == rows else np.pad(
            a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1), mode="edge")
    return jax.tree.map(pad, tree)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict[str, Any], *, num_pages: int,
                 page_size: int, max_model_len: int, dtype=jnp.float32, cache_dtype=None,
                 attn_impl: str = "auto", max_num_seqs: int = 256, mesh=None,
                 sharding_rules=None):
        """mesh: a jax.sharding.Mesh with axes ("dp", "tp") (imp_jax.sharding.make_mesh) to run
        tensor / data parallel; sharding_rules: imp_jax.sharding.ShardingRules (default
        tensor_parallel()). Params are device_put into their NamedShardings, the KV pools are
        created directly in their shards and the model pins the step's shardings
        (docs/sharding.md)."""
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.prompt_rows = prompt_rows()  # rows of a prompt program on the kernel path
        self.cfg, self.params = cfg, params
        self.page_size, self.max_model_len = page_size, max_model_len
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.model = Transformer(cfg, jnp.dtype(dtype).name, attn_impl)
        # With the Pallas kernel, attention reads only the pages a sequence has, so the page
        # table is always full width (one fewer shape to bucket) and mixed steps run as two
        # programs (see _grouped_step). The jnp reference pays for padding, so on CPU the page
        # table width is bucketed and mixed steps stay one program (fewer compiles).
        self.fixed_shapes = resolve_impl(attn_impl) == "pallas"
        self.max_num_seqs = max_num_seqs
        self._last_tokens = None  # the last decode_steps call's final tokens (device)
        self.warmed = False  # set by warmup(): a program traced after it is logged as a miss
        self.command_buffers = command_buffers()
        self.sharding = None  # imp_jax.sharding.ShardingPlan when running on a mesh
        if mesh is not None:
            from imp_jax.sharding import shard_runner

            self.cache = None  # never allocate the unsharded pool
            shard_runner(self, mesh, sharding_rules, num_pages=num_pages, page_size=page_size,
                         cache_dtype=cache_dtype or dtype)
        else:
            self.cache = KVCache.create(cfg, num_pages, page_size, cache_dtype or dtype)

    @property
    def cache_lost(self) -> bool:
        """True when a failed step consumed the donated cache (its buffers are deleted)."""
        return any(a.is_deleted() for a in jax.tree.leaves(self.cache))

    def reset_cache(self) -> None:
        """A fresh KV cache of the same shapes and shardings (the old one was lost): zero
        pages, and scale 1 in 8-bit pools' scale pools, as `KVCache.create` makes them."""
        self.cache = KVCache(*([jnp.full(a.shape, v, a.dtype, device=a.sharding) for a in pool]
                               for pool, v in zip(self.cache.pools(), POOL_FILLS)))

    def _graphs(self, decode: bool) -> bool:
        """Whether a decode (or prompt) program keeps XLA's command buffers."""
        return self.command_buffers == "all" or (self.command_buffers == "decode" and decode)

    @property
    def num_compiles(self) -> int:
        """Programs traced for this model so far; a test asserts it stops growing after warm-up."""
        return _TRACES[self.model]

    def decode_steps(self, seqs: Sequence[StepSeq], sampling: SamplingTensors, num_steps: int,
                     num_logprobs: int = 0, *, continue_previous: bool = False,
                     compile_only: bool = False) -> SampleOutput:
        """`num_steps` decode steps in one compiled call; each seq's pages must cover them.

        Each step feeds the sampled token straight back on the device, so the host neither
        syncs nor dispatches per token. Returns a SampleOutput with a leading [num_steps] axis.

        continue_previous: the input tokens are the last tokens the previous `decode_steps`
        call sampled (same rows, in the same order), still on the device: the engine dispatches
        the next block before it has read the previous one (seqs' token_ids are then ignored).

        compile_only: return the program (a `_Program`) instead of running it (warm-up).
        """
        n = len(seqs)
        S = bucket(n, lo=4)
        P = self.max_pages_per_seq if self.fixed_shapes else bucket(
            max(len(s.pages) for s in seqs), lo=16, hi=self.max_pages_per_seq)
        steps = np.fromiter((num_steps if s.steps is None else s.steps for s in seqs),
                            np.int64, n)
        if (i := _first((steps < 0) | (steps > num_steps))) is not None:
            raise ValueError(f"sequence {i}: steps={steps[i]}, allowed 0..{num_steps}")
        page_table, counts = _page_rows(seqs, S, P)
        starts = np.fromiter((s.start_pos for s in seqs), np.int64, n)
        _check_starts(starts)
        ends = starts + steps
        if (i := _first((steps > 0) & ((ends > self.max_model_len)
                                       | (counts * self.page_size < ends)))) is not None:
            raise ValueError(f"sequence {i}: {steps[i]} steps from position {starts[i]} "
                             f"need pages for {ends[i]} tokens (max_model_len "
                             f"{self.max_model_len}), got {counts[i]} pages")
        tokens = np.zeros(S, np.int32)
        tokens[:n] = np.fromiter((s.token_ids[0] for s in seqs), np.int32, n)
        positions = np.zeros(S, np.int32)
        positions[:n] = starts
        limit = np.zeros(S, np.int32)  # steps each row runs; 0 = a padding row
        limit[:n] = steps
        if continue_previous:
            if self._last_tokens is None or self._last_tokens.shape != tokens.shape:
                raise ValueError("continue_previous needs a previous decode_steps call over "
                                 f"the same {S} rows")
            tokens = self._last_tokens
        elif (where := self.model.token_sharding(S)) is not None:
            # the sharding the loop leaves them in; each process places its own shards (a
            # device_put onto a mesh of several processes would first check, through a blocking
            # all-gather, that every process passed the same array)
            host = tokens
            tokens = jax.make_array_from_callback(host.shape, where, lambda idx: host[idx])
        sampling = _pad_rows(sampling, S)
        args = (self.model, self.params, self.cache, tokens, positions, page_table, limit,
                sampling)
        kwargs = dict(num_steps=num_steps, num_logprobs=num_logprobs)
        loop = _decode_loop if self._graphs(decode=True) else _decode_loop_kernel_by_kernel
        if compile_only:
            return _Program(loop, args, kwargs)
        traced = self.num_compiles
        out, self._last_tokens, self.cache = loop(*args, **kwargs)
        if not num_logprobs:
            self._check_warm(traced, f"{num_steps}-step decode block, {S} rows, {P} pages")
        return out

    def warmup(self, max_num_seqs: int, max_num_batched_tokens: int,
               decode_steps: int = 0, threads: int | None = None) -> int:
        """Compile every decode and prompt program the engine can ask for; returns how many.

        The programs are compiled `threads` at a time (default $IMP_JAX_COMPILE_THREADS, else
        up to 8): XLA compiles outside the GIL, and an 8B model's ~20 programs take ~9 s each
        one after another. Then each runs once as a dummy step (cache hits, milliseconds);
        dummy steps write their K/V into page 0, which no sequence ever owns.
        """
        from imp_jax.sampling import SamplingParams

        self.warmed = False  # a second warm-up's own compiles are not misses
        before = self.num_compiles
        greedy = SamplingParams(temperature=0)
        steps = []  # (method, args, kwargs) of each dummy step
        for n in _powers(4, bucket(max_num_seqs, lo=4)):
            n = min(n, max_num_seqs)
            tensors = SamplingTensors.from_params([greedy] * n, [0] * n, [0] * n)
            steps.append((self._step, ([StepSeq([0], 0, [0])] * n, tensors, 0), {}))
            if decode_steps > 1:
                pages = [0] * -(-decode_steps // self.page_size)
                steps.append((self.decode_steps, ([StepSeq([0], 0, pages)] * n, tensors,
                                                  decode_steps), {}))
        # A prompt program's token bucket is reached by several prompts together: a group of
        # self.prompt_rows (default 64) chunks of 128 tokens fills an 8192-token program even
        # where max_model_len is 272 (capping these at max_model_len missed those programs,
        # which then compiled mid-run, seconds each). Off the kernel path one sequence per
        # program, as steps pack.
        rows = self.prompt_rows if self.fixed_shapes else None
        longest = (rows or 1) * self.max_model_len
        for t in _powers(16, bucket(max_num_batched_tokens, lo=16)):
            t = min(t, max_num_batched_tokens, longest)
            lens = [min(self.max_model_len, t - k) for k in range(0, t, self.max_model_len)]
            seqs = [StepSeq([0] * n, 0, [0] * -(-n // self.page_size)) for n in lens]
            tensors = SamplingTensors.from_params([greedy] * len(seqs), [0] * len(seqs),
                                                  [0] * len(seqs))
            steps.append((self._step, (seqs, tensors, 0, rows), {}))
        if threads is None:
            threads = _compile_threads()
        if threads > 1:
            programs = [m(*a, **kw, compile_only=True) for m, a, kw in steps]
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(_Program.compile, programs))  # re-raises the first failure
        for m, a, kw in steps:
            m(*a, **kw)
        self.warmed = True
        return self.num_compiles - before

    def _check_warm(self, traced: int, program: str) -> None:
        """Log a program compiled after warm-up: seconds of a GPU run lost mid-run, and a sign
        that `warmup` misses a shape the engine uses (session 7 found one that way). Only on
        the kernel path (fixed shapes), whose program set warm-up covers; off it mixed steps
        bucket their page-table width and row count, and compile on first use by design."""
        if self.warmed and self.fixed_shapes and self.num_compiles != traced:
            log.warning("compiled a program after warm-up (%s): warm-up missed it", program)

    # ------------------------------------------------------------------ host side
    def step(self, seqs: Sequence[StepSeq], sampling: SamplingTensors | None = None,
             num_logprobs: int = 0) -> StepOutput:
        """One step's programs; the output's `enqueue_s` is the host time it took to build their
        inputs and enqueue them (the engine's per-step breakdown)."""
        if not seqs:
            raise ValueError("step needs at least one sequence")
        t0 = time.perf_counter()
        prompt = [len(s.token_ids) > 1 or s.all_logits for s in seqs]
        if self.fixed_shapes and any(prompt):
            return self._grouped_step(seqs, prompt, sampling, num_logprobs, t0)
        out = self._step(seqs, sampling, num_logprobs)
        out.enqueue_s = time.perf_counter() - t0
        return out

    def _grouped_step(self, seqs, prompt, sampling, num_logprobs, t0: float) -> StepOutput:
        """The kernel path runs a step with prompt chunks as several programs: decodes in one,
        prompt chunks in groups of `self.prompt_rows`. The prefill kernels tile each sequence's
        queries (the Triton kernel's prefill form pads it to the step's token bucket), so a
        decode riding along would cost a whole tile; and a fixed row count keeps prompt
        programs to one per token bucket (all compiled by `warmup`)."""
        decodes = [i for i, p in enumerate(prompt) if not p]
        prompts = [i for i, p in enumerate(prompt) if p]
        rows = self.prompt_rows
        groups = [prompts[k:k + rows] for k in range(0, len(prompts), rows)]
        if decodes:
            groups.append(decodes)
        outs = []
        for idx in groups:
            part = None if sampling is None else jax.tree.map(lambda a: np.asarray(a)[idx],
                                                               sampling)
            outs.append(self._step([seqs[i] for i in idx], part, num_logprobs,
                                   rows if prompt[idx[0]] else None))
        enqueue_s = time.perf_counter() - t0  # before the merge below reads the results
        if len(groups) == 1:
            outs[0].enqueue_s = enqueue_s
            return outs[0]
        order = np.argsort(np.concatenate(groups))
        sample = None
        if sampling is not None:  # merged on the host: the caller reads the tokens right away
            sample = jax.tree.map(lambda *xs: np.concatenate(
                [np.asarray(x)[:len(g)] for x, g in zip(xs, groups)])[order],
                *[o.sample for o in outs])
        offsets = np.zeros(len(seqs), np.int32)
        logits = None
        if any(o.logits is not None for o in outs):  # all-logits rows of several groups
            parts, base = [], 0
            for idx, o in zip(groups, outs):
                if o.logits is None:
                    continue
                offsets[idx] = o.token_offsets + base
                parts.append(np.asarray(o.logits))
                base += o.logits.shape[0]
            logits = np.concatenate(parts)
        return StepOutput(sample, logits, offsets, enqueue_s)

    def _step(self, seqs, sampling, num_logprobs, rows: int | None = None, *,
              compile_only: bool = False) -> StepOutput:
        n = len(seqs)
        qlens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
        total = int(qlens.sum())
        # Few, coarse buckets: every distinct shape is a compile (seconds on a CPU). A step
        # with any prompt chunk uses max_query_len = T, so (S, T, P) fixes the program.
        decode = int(qlens.max()) == 1
        S = rows or bucket(n, lo=4)
        T = bucket(total, lo=16)
        Q = 1 if decode else T
        P = self.max_pages_per_seq if self.fixed_shapes else bucket(
            max(len(s.pages) for s in seqs), lo=16, hi=self.max_pages_per_seq)

        # Built with whole-array numpy ops (no per-sequence loop: ~1000 rows per step)
        starts = np.fromiter((s.start_pos for s in seqs), np.int64, n)
        _check_starts(starts)
        ends = starts + qlens
        if (i := _first(ends > self.max_model_len)) is not None:
            raise ValueError(f"sequence {i} reaches {ends[i]} tokens, over max_model_len "
                             f"{self.max_model_len}")
        page_table, counts = _page_rows(seqs, S, P)
        needed = -(-ends // self.page_size)
        if (i := _first(counts < needed)) is not None:
            raise ValueError(f"sequence {i} needs {needed[i]} pages for {ends[i]} tokens, "
                             f"got {counts[i]}")
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(qlens, out=offsets[1:])
        row = np.repeat(np.arange(n), qlens)
        pos = np.arange(total) - offsets[row] + starts[row]
        tokens = np.zeros(T, np.int32)
        tokens[:total] = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs),
                                     np.int32, total)
        positions = np.zeros(T, np.int32)
        positions[:total] = pos
        slots = np.full(T, -1, np.int32)
        slots[:total] = page_table[row, pos // self.page_size] * self.page_size \
            + pos % self.page_size
        seq_lens = np.zeros(S, np.int32)
        seq_lens[:n] = ends
        query_start = np.full(S + 1, total, np.int32)
        query_start[:n] = offsets[:-1]
        last = np.zeros(S, np.int32)
        last[:n] = offsets[1:] - 1

        return_logits = any(s.all_logits for s in seqs)
        logits_indices = np.arange(T, dtype=np.int32) if return_logits else last
        sample_rows = last if return_logits else np.arange(S, dtype=np.int32)
        meta = AttentionMetadata(slots, page_table, seq_lens, query_start, logits_indices, Q)

        banned = history = None
        if sampling is not None:
            sampling = _pad_rows(sampling, S)
            if any(s.banned for s in seqs):
                # fixed widths: a new width would be a new program for the whole model
                width = max(BANNED_WIDTH, bucket(max(len(s.banned) for s in seqs)))
                banned = np.full((S, width), -1, np.int32)
                for i, s in enumerate(seqs):
                    banned[i, :len(s.banned)] = s.banned
            if any(s.history is not None for s in seqs):
                width = self.max_model_len
                ids = np.zeros((S, width), np.int32)
                prompt_lens = np.zeros(S, np.int32)
                total_lens = np.zeros(S, np.int32)
                for i, s in enumerate(seqs):
                    h = s.history or ()
                    ids[i, :len(h)] = h
                    prompt_lens[i], total_lens[i] = s.prompt_len, len(h)
                history = (ids, prompt_lens, total_lens)

        args = (self.model, self.params, self.cache, tokens, positions, meta, sample_rows,
                sampling, banned, history)
        kwargs = dict(num_logprobs=num_logprobs, return_logits=return_logits)
        forward = _forward if self._graphs(decode) else _forward_kernel_by_kernel
        if compile_only:
            return _Program(forward, args, kwargs)
        traced = self.num_compiles
        out, logits, self.cache = forward(*args, **kwargs)
        if not (return_logits or num_logprobs or banned is not None or history is not None):
            # warm-up compiles the plain programs; logprobs, bans (min_tokens), penalties and
            # all-logits (scoring) each add a variant, compiled on first use
            self._check_warm(traced, f"step of {S} rows, {T} tokens, {P} pages")
        return StepOutput(out, logits, np.asarray(query_start[:n]))


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True (the sequence an input error names), or None."""
    hit = np.flatnonzero(mask)
    return int(hit[0]) if hit.size else None


def _check_starts(starts: np.ndarray) -> None:
    if (i := _first(starts < 0)) is not None:
        raise ValueError(f"sequence {i}: start_pos={starts[i]}, allowed >= 0")


def _page_rows(seqs: Sequence[StepSeq], S: int, P: int) -> tuple[np.ndarray, np.ndarray]:
    """(page_table i32[S, P], each sequence's page count): row i holds seqs[i].pages, padded
    with page 0 (never a sequence's). One scatter, not a row assignment per sequence."""
    n = len(seqs)
    counts = np.fromiter((len(s.pages) for s in seqs), np.int64, n)
    if (i := _first(counts > P)) is not None:
        raise ValueError(f"sequence {i} has {counts[i]} pages, more than the {P} a page-table "
                         "row holds (max_model_len / page_size)")
    table = np.zeros((S, P), np.int32)
    total = int(counts.sum())
    if total:
        rows = np.repeat(np.arange(n), counts)
        cols = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        table[rows, cols] = np.fromiter(itertools.chain.from_iterable(s.pages for s in seqs),
                                        np.int32, total)
    return table, counts


def prompt_rows() -> int:
    """$IMP_JAX_PROMPT_ROWS: rows of a prompt program on the kernel path (ModelRunner.
    _grouped_step), a power of two from 1 to 256; default PROMPT_ROWS (64). A 1000-row run's
    8192-token mixed steps hold 64 prompt chunks of 128 tokens: one 8192-token program at 64
    rows ran them in 205 ms on an H200, four 2048-token programs at 16 rows in 223 ms (larger
    GEMMs; docs/benchmarks.md, session 8). Warm-up compiles prompt buckets up to
    min(max_num_batched_tokens, rows * max_model_len)."""
    value = os.environ.get("IMP_JAX_PROMPT_ROWS", str(PROMPT_ROWS))
    if value not in {str(1 << k) for k in range(9)}:
        raise ValueError(f"IMP_JAX_PROMPT_ROWS={value!r}; allowed: a power of two from 1 to 256")
    return int(value)


def _compile_threads() -> int:
    """$IMP_JAX_COMPILE_THREADS (a positive integer), else up to 8."""
    value = os.environ.get("IMP_JAX_COMPILE_THREADS")
    if value is None:
        return min(8, os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"IMP_JAX_COMPILE_THREADS={value!r}; allowed: a positive integer")
    return int(value)


@dataclasses.dataclass
class _Program:
    """One jitted call, for compiling ahead of time: `lower(...).compile()` fills the same
    caches a real call looks up, so the later call neither traces nor compiles again."""

    fn: Any
    args: tuple
    kwargs: dict

    def compile(self):
        return self.fn.lower(*self.args, **self.kwargs).compile()


_TRACES: collections.Counter = collections.Counter()
_TRACES_LOCK = threading.Lock()  # warm-up traces programs from several threads


def _count_trace(model) -> None:
    with _TRACES_LOCK:
        _TRACES[model] += 1


# Module level (not a method) so runners of the same model share compiled programs.
def _forward_fn(model: Transformer, params, cache, tokens, positions, meta, sample_rows, sampling,
                banned, history, *, num_logprobs: int, return_logits: bool):
    _count_trace(model)  # runs at trace time only
    logits, cache = model.apply({"params": params}, tokens, positions, cache, meta)
    out = None
    if sampling is not None:
        rows = logits[sample_rows]
        prompt_mask = output_counts = None
        if history is not None:
            ids, prompt_lens, total_lens = history
            vocab = model.cfg.vocab_size
            prompt_counts = token_counts(ids, prompt_lens, vocab)
            prompt_mask = prompt_counts > 0
            output_counts = token_counts(ids, total_lens, vocab) - prompt_counts
        out = sample(rows, sampling, prompt_mask=prompt_mask, output_counts=output_counts,
                     banned_ids=banned, num_logprobs=num_logprobs)
    return out, (logits if return_logits else None), cache


# XLA's dot merger joins q/k/v (they share x) into one GEMM. Above ~a GEMV it does so over
# a weight concatenated afresh in every layer of every step: 3.2 GB of copies per 8B decode
# step at 1024 rows (~1.6 ms, session 8's profile; the run went 12,950 -> 15,265 tok/s with
# it off and three smaller fixes). At batch 1 the merged GEMV is 3% faster (4.41 vs 4.56 ms
# per step). Programs of at most MERGE_MAX_TOKENS token rows keep it: the crossover between
# the two measured sizes is unmeasured; 64 rows keep the GEMMs weight-bound like a GEMV.
MERGE_MAX_TOKENS = 64


class _Jit:
    """`fn` jitted with and without XLA's dot merger, picked by the program's token rows
    (args[3], the tokens, in both programs below)."""

    def __init__(self, fn, options: dict, **kw):
        self.merged = jax.jit(fn, **kw, compiler_options=options)
        self.split = jax.jit(fn, **kw, compiler_options={
            **options, "xla_gpu_dot_merger_threshold_mb": 0})

    def pick(self, args):
        return self.merged if args[3].shape[0] <= MERGE_MAX_TOKENS else self.split

    def __call__(self, *args, **kwargs):
        return self.pick(args)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.pick(args).lower(*args, **kwargs)


def _jit_pair(fn, **kw):
    """fn jitted with XLA's CUDA-graph command buffers (its default) and without
    (IMP_JAX_COMMAND_BUFFERS picks per program; separate jits, separate caches)."""
    return _Jit(fn, {}, **kw), _Jit(fn, {"xla_gpu_enable_command_buffer": ""}, **kw)


_forward, _forward_kernel_by_kernel = _jit_pair(
    _forward_fn, donate_argnums=(2,), static_argnames=("model", "num_logprobs", "return_logits"))


def _powers(lo: int, hi: int) -> list[int]:
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def _decode_loop_fn(model: Transformer, params, cache, tokens, positions, page_table, limit,
                    sampling, *, num_steps: int, num_logprobs: int):
    _count_trace(model)
    S = tokens.shape[0]
    page_size = cache.page_size
    query_start = jnp.arange(S + 1, dtype=jnp.int32)  # one token per sequence
    rows = jnp.arange(S, dtype=jnp.int32)

    def body(i, carry):
        cache, tokens, positions, outs = carry
        valid = i < limit  # padding rows (limit 0) and rows past their length limit: no write
        page = jnp.take_along_axis(page_table, (positions // page_size)[:, None], axis=1,
                                   mode="clip")[:, 0]
        slots = jnp.where(valid, page * page_size + positions % page_size, -1)
        # invalid rows see one (garbage, never written) key so no row divides by zero
        seq_lens = jnp.where(valid, positions + 1, 1)
        meta = AttentionMetadata(slots, page_table, seq_lens, query_start, rows, 1)
        logits, cache = model.apply({"params": params}, tokens, positions, cache, meta)
        step_sampling = dataclasses.replace(sampling, step=sampling.step + i)
        out = sample(logits, step_sampling, num_logprobs=num_logprobs)
        outs = jax.tree.map(lambda acc, x: acc.at[i].set(x), outs, out)
        return cache, out.tokens, positions + 1, outs

    empty = SampleOutput(jnp.zeros((num_steps, S), jnp.int32),
                         jnp.zeros((num_steps, S), jnp.float32),
                         jnp.zeros((num_steps, S, num_logprobs), jnp.int32),
                         jnp.zeros((num_steps, S, num_logprobs), jnp.float32))
    cache, last, _, outs = jax.lax.fori_loop(0, num_steps, body,
                                             (cache, tokens, positions, empty))
    if (where := model.token_sharding(S)) is not None:
        last = jax.lax.with_sharding_constraint(last, where)
    return outs, last, cache


_decode_loop, _decode_loop_kernel_by_kernel = _jit_pair(
    _decode_loop_fn, donate_argnums=(2,), static_argnames=("model", "num_steps", "num_logprobs"))

COMMAND_BUFFER_MODES = ("all", "decode", "none")


def command_buffers() -> str:
    """$IMP_JAX_COMMAND_BUFFERS: which programs XLA may replay as CUDA graphs ("command
    buffers") on a GPU: "all" (XLA's default), "decode" (decode steps and blocks; prompt and
    mixed-step prompt programs launch kernel by kernel), "none". No effect off the GPU.

    "all" stays the default: timed alone (benchmarks/mixed_step.py, H200) a mixed step takes
    the same time in every mode, and prompt programs launched kernel by kernel hold the host
    for the whole program (53 ms) where a graph returns in ~6 ms. The slow mixed steps of
    sessions 5-6 were prompt programs compiled mid-run (docs/benchmarks.md, session 7)."""
    value = os.environ.get("IMP_JAX_COMMAND_BUFFERS", "all")
    if value not in COMMAND_BUFFER_MODES:
        raise ValueError(f"IMP_JAX_COMMAND_BUFFERS={value!r}; allowed: "
                         f"{', '.join(COMMAND_BUFFER_MODES)}")
    return value

