"""Autotuning of the paged-attention launch configs, per (kernel, device kind, shape bucket).

Two kernels are tuned: the Triton kernel (`paged_decode.KernelConfig`) and the Mosaic GPU
decode kernel (`decode_mgpu.DecodeConfig`: ring shape and splits; keys with kernel="mgpu").

    key = make_key(q.shape, k_pages.shape, page_table.shape, max_query_len, q.dtype)  # static
    cfg = lookup(key)            # cached winner, else choose_config's heuristic (cold start)
    tune(key, candidates, run_fn)  # explicit: time each candidate, store the winner on disk

* The key (`ShapeKey`) buckets a problem by device kind (jax.devices()[0].device_kind), dtype,
  the KV page dtype when it differs from the query's (8-bit pages: `|kvint8`), head_dim, group
  size G = H // KVH, KV heads, page size, power-of-two buckets of the batch (page-table rows S)
  and of the max context (max_pages * page_size), and decode vs prefill (max_query_len * G <= 64,
  the rule of `choose_config`). Everything comes from static shapes, so the key is computed at
  trace time. The key object also carries the exact dims it was made from (not part of its
  identity) so that `lookup` can rebuild a config for *this* shape.
* The cache is one JSON file: $IMP_JAX_AUTOTUNE_CACHE, else ~/.cache/imp_jax/autotune.json.
  Writes are atomic (temp file + os.replace, merged with what is on disk at write time). A
  corrupt or unreadable file is ignored with a warning (treated as empty), never an error.
* A cached winner is stored as its config's fields (KernelConfig, or DecodeConfig for mgpu keys)
  and re-applied through the kernel's `choose_config` overrides, so it is clamped to the exact shape (e.g. splits <= page blocks,
  decode's block_q = max_query_len).
* Tuning never runs silently in the hot path. It runs on an explicit `tune(...)` /
  `tune_shape(...)` call (benchmarks/kernels.py --autotune), or, when IMP_JAX_AUTOTUNE=1, once
  per missing bucket at *trace* time of the kernel entry point (`maybe_tune`, in a helper
  thread: trace state is per thread), on synthetic inputs of the traced shape (e.g. during
  `imp-jax bench` warm-up); never per step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import KernelConfig, _next_pow2, choose_config

log = logging.getLogger("imp_jax.autotune")

CACHE_ENV = "IMP_JAX_AUTOTUNE_CACHE"
ENABLE_ENV = "IMP_JAX_AUTOTUNE"
# 2 (session 8): decode_mgpu's candidates gained two KV heads per CTA and both kernels lost the
# f16 variants, so version-1 winners were chosen from another candidate set: ignored.
# 3 (session 13): 8-bit keys' candidates gained the e4m3 Q K^T path (DecodeConfig.fp8_qk), so
# 8-bit winners of version 2 were chosen without it; the bump drops every entry (re-tuning is
# an explicit step), which is simpler than telling those entries apart.
# 4 (session 14): and the f16 P V (DecodeConfig.f16_v), likewise.
CACHE_VERSION = 4
DEFAULT_CACHE = os.path.join("~", ".cache", "imp_jax", "autotune.json")


# --------------------------------------------------------------------------------------------
# Shape-bucket key
# --------------------------------------------------------------------------------------------

def bucket(x: int) -> int:
    """Power-of-two bucket (next power of two >= x; 1 for x <= 1)."""
    return _next_pow2(int(x))


@dataclass(frozen=True)
class ShapeKey:
    device_kind: str
    dtype: str
    head_dim: int
    group: int              # H // KVH
    kv_heads: int
    page_size: int
    batch_bucket: int       # next pow2 of S (page-table rows)
    ctx_bucket: int         # next pow2 of max_pages * page_size
    mode: str               # "decode" | "prefill"
    kv_dtype: str = ""      # page dtype if not the query dtype (e.g. "float8_e4m3fn", "int8")
    kernel: str = "triton"  # "triton" (paged_decode.py) | "mgpu" (decode_mgpu.py): own winners
    # exact dims of the problem the key was made from: not part of the identity
    S: int = field(default=0, compare=False)
    max_query_len: int = field(default=1, compare=False)
    max_pages: int = field(default=1, compare=False)

    @property
    def id(self) -> str:
        return (f"{self.device_kind}|{self.dtype}|D{self.head_dim}|G{self.group}|"
                f"KVH{self.kv_heads}|page{self.page_size}|B{self.batch_bucket}|"
                f"ctx{self.ctx_bucket}|{self.mode}" + (f"|kv{self.kv_dtype}" if self.kv_dtype
                                                        else "")
                + (f"|{self.kernel}" if self.kernel != "triton" else ""))

    def __str__(self) -> str:
        return self.id

    def heuristic(self, **overrides):
        """The kernel's choose_config for the exact dims this key came from (overrides as in
        that choose_config): a KernelConfig, or a decode_mgpu.DecodeConfig for "mgpu" keys."""
        if self.kernel == "mgpu":
            from pallas_kernels import decode_mgpu
            return decode_mgpu.choose_config(max(1, self.S), self.kv_heads,
                                             max(1, self.max_pages), self.page_size,
                                             self.head_dim, kv_itemsize=1 if self.kv_dtype
                                             else 2, **overrides)
        return choose_config(max(1, self.S), self.kv_heads, self.group, self.max_query_len,
                             max(1, self.max_pages), self.page_size, **overrides)

    @property
    def config_class(self) -> type:
        if self.kernel == "mgpu":
            from pallas_kernels.decode_mgpu import DecodeConfig
            return DecodeConfig
        return KernelConfig


def device_kind() -> str:
    try:
        return str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 -- no backend: still a usable key
        return "unknown"


def make_key(q_shape, k_shape, page_table_shape, max_query_len: int, dtype,
             *, kind: str | None = None, kv_dtype=None, kernel: str = "triton") -> ShapeKey:
    """Key of q [T,H,D], k_pages [P,page,KVH,D], page_table [S,max_pages] (static shapes).

    kv_dtype: the page dtype; part of the key only when it differs from dtype (8-bit pages
    read half the bytes and convert in the loop, so they get their own winners)."""
    _, H, D = (int(x) for x in q_shape)
    _, page, KVH, _ = (int(x) for x in k_shape)
    S, max_pages = (int(x) for x in page_table_shape)
    G = H // KVH
    Q = int(max_query_len)
    kvd = "" if kv_dtype is None or jnp.dtype(kv_dtype) == jnp.dtype(dtype) else \
        jnp.dtype(kv_dtype).name
    return ShapeKey(device_kind=device_kind() if kind is None else kind,
                    dtype=jnp.dtype(dtype).name, kv_dtype=kvd, head_dim=D, group=G, kv_heads=KVH,
                    page_size=page, batch_bucket=bucket(S), ctx_bucket=bucket(max_pages * page),
                    mode="decode" if Q * G <= 64 else "prefill", kernel=kernel,
                    S=S, max_query_len=Q, max_pages=max_pages)


# --------------------------------------------------------------------------------------------
# On-disk cache
# --------------------------------------------------------------------------------------------

def cache_path() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


_memo: dict[str, tuple[Any, dict]] = {}   # path -> (stat signature, entries)
_lock = threading.Lock()


def _stat_sig(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str) -> dict:
    """Entries {key id: entry} of path: {} if missing, corrupt (warned) or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"autotune cache {path} unreadable/corrupt, ignored: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
        return {}
    if (not isinstance(data, dict) or not isinstance(data.get("entries"), dict)
            or data.get("version") != CACHE_VERSION):
        warnings.warn(f"autotune cache {path} has an unexpected layout/version, ignored",
                      RuntimeWarning, stacklevel=3)
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}


def load_cache(path: str | None = None) -> dict:
    """All entries of the cache file (memoised on the file's mtime/size: cheap at trace time)."""
    path = path or cache_path()
    sig = _stat_sig(path)
    with _lock:
        hit = _memo.get(path)
        if hit is not None and hit[0] == sig and sig is not None:
            return hit[1]
    entries = _read(path) if sig is not None else {}
    with _lock:
        _memo[path] = (sig, entries)
    return entries


def save_entry(key: ShapeKey | str, entry: dict, path: str | None = None) -> None:
    """Merge one entry into the file (re-read at write time) and replace it atomically."""
    path = path or cache_path()
    kid = key.id if isinstance(key, ShapeKey) else str(key)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    with _lock:
        entries = dict(_read(path))
        entries[kid] = entry
        data = dict(version=CACHE_VERSION, entries=dict(sorted(entries.items())))
        fd, tmp = tempfile.mkstemp(prefix=".autotune.", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _memo.pop(path, None)


def _config_from_entry(entry: dict, cls: type = KernelConfig):
    try:
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = {k: v for k, v in entry["config"].items() if k in fields}
        return cls(**cfg)
    except Exception:  # noqa: BLE001 -- a bad entry is a miss
        return None


def cached(key: ShapeKey, path: str | None = None):
    """The stored winner of key's bucket as stored (not adapted to the exact shape), or None."""
    entry = load_cache(path).get(key.id)
    if entry is None:
        return None
    cfg = _config_from_entry(entry, key.config_class)
    if cfg is None:
        warnings.warn(f"autotune cache entry {key.id} is malformed, ignored", RuntimeWarning,
                      stacklevel=2)
    return cfg


def adapt(key: ShapeKey, cfg):
    """Re-apply a (bucket's) winner to key's exact dims through choose_config's overrides."""
    if key.kernel == "mgpu":  # splits are clamped to this shape's blocks, stages to SMEM
        return key.heuristic(**dataclasses.asdict(cfg))
    over = dict(block_k_tokens=cfg.pages_per_block * key.page_size, num_splits=cfg.num_splits,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                prefetch_pages=cfg.prefetch_pages)
    if key.mode == "prefill":
        over["block_q"] = cfg.block_q
    return key.heuristic(**over)


def lookup(key: ShapeKey, path: str | None = None):
    """Config for the kernel: the cached winner of key's bucket if any, else the heuristic."""
    cfg = cached(key, path)
    if cfg is None:
        return key.heuristic()
    return adapt(key, cfg)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------

def time_candidate(run_fn: Callable[[Any], Any], cand, *, reps: int = 5, warmup: int = 1,
                   timer: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of run_fn(cand) over reps runs after warm-up (compile) runs."""
    for _ in range(warmup):
        jax.block_until_ready(run_fn(cand))
    ts = []
    for _ in range(max(1, reps)):
        t0 = timer()
        jax.block_until_ready(run_fn(cand))
        ts.append(timer() - t0)
    return statistics.median(ts)


def tune(key: ShapeKey, candidates: Iterable, run_fn: Callable[[Any], Any],
         *, reps: int = 5, warmup: int = 1, timer: Callable[[], float] = time.perf_counter,
         calls_per_run: int = 1, save: bool = True, path: str | None = None
         ):
    """Time each candidate once (median of reps after warm-up), store and return the fastest.

    run_fn(config) runs the kernel with that config and returns its output (blocked on).
    Candidates that fail to compile or run are skipped (logged). calls_per_run: kernel calls
    per run_fn call, only for the recorded microseconds. Returns None if every candidate failed
    (nothing stored)."""
    results: list[tuple[float, int, KernelConfig]] = []
    failed: dict[str, str] = {}
    seen = set()
    for i, cand in enumerate(candidates):
        if cand in seen:
            continue
        seen.add(cand)
        try:
            t = time_candidate(run_fn, cand, reps=reps, warmup=warmup, timer=timer)
        except Exception as e:  # noqa: BLE001 -- compile/run failure: skip this candidate
            msg = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("autotune %s: candidate %s failed: %s", key.id, cand, msg)
            failed[str(cand)] = msg
            continue
        log.info("autotune %s: %s %.1f us", key.id, cand, t / calls_per_run * 1e6)
        results.append((t, i, cand))
    if not results:
        log.warning("autotune %s: every candidate failed; nothing stored", key.id)
        return None
    t_best, _, best = min(results, key=lambda r: (r[0], r[1]))
    if save:
        entry = dict(config=dataclasses.asdict(best), us=t_best / calls_per_run * 1e6,
                     calls_per_run=calls_per_run,
                     timings_us={str(c): t / calls_per_run * 1e6 for t, _, c in results},
                     failed=failed, jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                     shape=dict(S=key.S, max_query_len=key.max_query_len,
                                max_pages=key.max_pages))
        try:
            save_entry(key, entry, path)
        except OSError as e:
            log.warning("autotune: could not write cache %s: %s", path or cache_path(), e)
    return best


# decode_mgpu (block_kv, num_stages) pairs that won somewhere on the H200 (docs/kernels_notes.md)
MGPU_RINGS = ((128, 3), (64, 6), (64, 2), (64, 4), (128, 2))


def default_candidates(key: ShapeKey) -> list:
    """The heuristic plus variations of block size, splits, stages, warps and prefetch (for
    "mgpu" keys: ring shapes x split counts)."""
    h = key.heuristic()
    if key.kernel == "mgpu":
        heads = [dict(heads_per_cta=1)] + ([dict(heads_per_cta=2)] if key.kv_heads % 2 == 0
                                           else [])
        over = [dict()] + heads + [dict(block_kv=b, num_stages=st, heads_per_cta=1)
                                   for b, st in MGPU_RINGS] + \
            [dict(num_splits=sp) for sp in {1, max(1, h.num_splits // 2), h.num_splits * 2}]
        # 8-bit pages: Q K^T in e4m3 or bf16, P V in f16 or bf16 (defaults first)
        if key.kv_dtype:
            over = [dict(o, fp8_qk=qk, f16_v=fv) for o in over for qk in (h.fp8_qk, not h.fp8_qk)
                    for fv in (h.f16_v, not h.f16_v)]
        return list(dict.fromkeys(key.heuristic(**o) for o in over))
    bk = h.pages_per_block * key.page_size
    over = [dict()]
    for b in sorted({32, 64, 128} | {bk}):
        for st in (2, 3):
            over.append(dict(block_k_tokens=b, num_stages=st))
    for sp in {max(1, h.num_splits // 2), h.num_splits * 2}:
        over.append(dict(num_splits=sp))
    over += [dict(prefetch_pages=False), dict(num_warps=8)]
    if key.mode == "prefill":
        over += [dict(block_q=max(1, 32 // key.group)), dict(block_q=max(1, 128 // key.group))]
    out, seen = [], set()
    for o in over:
        cfg = key.heuristic(**o)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def _page_bytes(key: ShapeKey) -> int:
    """Bytes of one page of K and V for key (values, plus the f32 scales of 8-bit pages)."""
    kv_dtype = jnp.dtype(key.kv_dtype or key.dtype)
    return 2 * key.page_size * key.kv_heads * (key.head_dim * kv_dtype.itemsize
                                               + (4 if key.kv_dtype else 0))


def synthetic_inputs(key: ShapeKey, *, pool_bytes_max: float = 1.0e9, seed: int = 0,
                     pool_pages: int | None = None):
    """Random inputs of key's exact shape (pool capped at pool_bytes_max; ragged lengths).
    pool_pages: at least this many pages (within the cap), for tables that must not share an
    L2-sized pool.

    8-bit page keys (key.kv_dtype) get random 8-bit pages; `synthetic_scales` gives their
    scales."""
    import numpy as np

    S, Q, mp, page = max(1, key.S), key.max_query_len, max(1, key.max_pages), key.page_size
    H, D, KVH = key.group * key.kv_heads, key.head_dim, key.kv_heads
    dtype = jnp.dtype(key.dtype)
    kv_dtype = jnp.dtype(key.kv_dtype or key.dtype)
    P = int(max(2, min(max(S * mp + 1, pool_pages or 0), pool_bytes_max // _page_bytes(key))))
    rng = np.random.default_rng(seed)
    ctx = mp * page
    lens = rng.integers(max(Q, ctx // 2), ctx + 1, size=S).astype(np.int32)
    lens[0] = ctx
    pt = rng.integers(1, P, size=(S, mp)).astype(np.int32)
    qs = np.arange(S + 1, dtype=np.int32) * Q
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (S * Q, H, D), dtype)
    if kv_dtype == jnp.int8:
        kp = jax.random.randint(kk, (P, page, KVH, D), -127, 128, jnp.int8)
        vp = jax.random.randint(kv, (P, page, KVH, D), -127, 128, jnp.int8)
    else:
        kp = (jax.random.normal(kk, (P, page, KVH, D), jnp.float32) * 64).astype(kv_dtype)
        vp = (jax.random.normal(kv, (P, page, KVH, D), jnp.float32) * 64).astype(kv_dtype)
    return q, kp, vp, jnp.asarray(pt), jnp.asarray(lens), jnp.asarray(qs)


def synthetic_scales(key: ShapeKey, num_pages: int, seed: int = 0) -> dict:
    """{k_scale, v_scale} (float32 [P, KVH, page], the cache's layout) for 8-bit page keys,
    else {}."""
    if not key.kv_dtype:
        return {}
    ka, kb = jax.random.split(jax.random.PRNGKey(seed + 1))
    shape = (num_pages, key.kv_heads, key.page_size)
    return dict(k_scale=jax.random.uniform(ka, shape, jnp.float32, 0.005, 0.02),
                v_scale=jax.random.uniform(kb, shape, jnp.float32, 0.005, 0.02))


def tune_shape(key: ShapeKey, *, candidates: Sequence | None = None,
               interpret: bool = False, reps: int = 5, soft_cap=None, sliding_window=None,
               path: str | None = None, calls: int | None = None):
    """Tune key's bucket on synthetic inputs of key's exact shape and store the winner.

    Each timed run is one jitted program of `calls` kernel calls (unrolled, each on its own
    random page table over a pool of up to 1 GB, so that they do not read each other's
    pages from L2). A run carries a per-run cost (dispatch + sync, ~0.05-0.5 ms on an H200,
    session 16: more than a small batch's whole kernel) that one call per run mostly timed.
    Default: enough calls to read ~2 GB of K/V, at most 16 (compile time grows with them);
    one, run eagerly, in interpret mode."""
    import numpy as np

    from pallas_kernels.paged_decode import paged_attention_kernel

    pages = max(1, key.S) * max(1, key.max_pages)                  # one call's page table
    if calls is None:
        calls = 1 if interpret else int(min(16, max(1, math.ceil(
            2e9 / (pages * _page_bytes(key))))))
    pool_pages = calls * pages + 1 if calls > 1 else None
    q, kp, vp, pt, lens, qs = synthetic_inputs(key, pool_pages=pool_pages)
    scales = synthetic_scales(key, kp.shape[0])
    scale = 1.0 / math.sqrt(key.head_dim)

    def kernel(cfg, q, kp, vp, pt, lens, qs, scales):
        if key.kernel == "mgpu":
            from pallas_kernels.decode_mgpu import paged_decode_mgpu
            return paged_decode_mgpu(q, kp, vp, pt, lens, qs, scale=scale, config=cfg,
                                     interpret=interpret, **scales)
        return paged_attention_kernel(q, kp, vp, pt, lens, qs, max_query_len=key.max_query_len,
                                      scale=scale, soft_cap=soft_cap,
                                      sliding_window=sliding_window, config=cfg,
                                      interpret=interpret, **scales)

    if calls == 1:
        def run_fn(cfg):
            return kernel(cfg, q, kp, vp, pt, lens, qs, scales)
    else:
        pts = jnp.asarray(np.random.default_rng(1).integers(
            1, kp.shape[0], size=(calls,) + pt.shape).astype(np.int32))
        loops = {}   # config -> its jitted loop (compiled once, timed reps times)

        def run_fn(cfg):
            if cfg not in loops:
                def loop(q, kp, vp, pts, lens, qs, scales):
                    acc = jnp.zeros(q.shape, jnp.float32)
                    for i in range(calls):   # unrolled: no while loop between the calls
                        acc = acc + kernel(cfg, q, kp, vp, pts[i], lens, qs,
                                           scales).astype(jnp.float32)
                    return acc
                loops[cfg] = jax.jit(loop)
            return loops[cfg](q, kp, vp, pts, lens, qs, scales)

    cands = list(candidates) if candidates is not None else default_candidates(key)
    return tune(key, cands, run_fn, reps=reps, path=path, calls_per_run=calls)


_tried: set[str] = set()


def maybe_tune(key: ShapeKey, **kw) -> None:
    """With IMP_JAX_AUTOTUNE=1: tune key's bucket once per process if the cache lacks it.

    Called by the entry point at trace time (not per step). JAX's trace state is per thread,
    so the tuning runs eagerly in a helper thread (joined) on synthetic inputs, even while an
    outer jit is tracing. Any failure (e.g. no memory for the synthetic pool next to the KV
    cache) is logged and the heuristic is used."""
    if not enabled():
        return
    with _tune_lock:  # warm-up traces programs in several threads: one tuning at a time
        if key.id in _tried or cached(key) is not None:
            return
        _tried.add(key.id)
        _tune_in_thread(key, kw)


_tune_lock = threading.Lock()


def _tune_in_thread(key: ShapeKey, kw: dict) -> None:
    err: list[BaseException] = []

    def work():
        try:
            tune_shape(key, **kw)
        except Exception as e:  # noqa: BLE001 -- never fail the caller's trace over tuning
            err.append(e)

    log.info("autotune %s: tuning (IMP_JAX_AUTOTUNE=1)", key.id)
    th = threading.Thread(target=work, name="imp_jax-autotune", daemon=True)
    th.start()
    th.join()
    if err:
        log.warning("autotune %s failed: %s: %s", key.id, type(err[0]).__name__,
                    str(err[0])[:300])
