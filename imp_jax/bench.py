"""`imp-jax bench latency|throughput|serve`: the figures that matter, beside the hardware ceiling.

`serve` (the HTTP server under load) lives in `imp_jax.server.bench`.

    imp-jax bench latency --model random:llama3-8b --batch 1,64 --input-len 128 --output-len 128
    imp-jax bench throughput --model random:llama3-8b --num-prompts 1000 --input-len 128 --output-len 128
    imp-jax bench throughput ... --input-len 128,1000 --output-len 128,1000   # two runs, one warm-up
    imp-jax bench latency ... --peer hf      # HF transformers (eager and static cache + torch.compile)
    imp-jax bench throughput ... --peer hf   # HF's tokens/s at --peer-batches x --peer-modes, best one as the peer

Random weights of a named shape need no download. Every run prints a table and can save JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from imp_jax.cli import add_quantization_args


class PowerMeter:
    """Average board power from nvidia-smi, sampled every 100 ms in the background, summed over
    the GPUs this process may use (CUDA_VISIBLE_DEVICES, else all)."""

    def __init__(self):
        self.samples: list[float] = []
        self._proc = None

    def __enter__(self):
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        select = ["-i", gpus] if gpus else []
        self._gpus = len(gpus.split(",")) if gpus else None
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,power.draw", "--format=csv,noheader,nounits",
                 "-lms", "100", *select], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)
        except FileNotFoundError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        tick: dict[str, float] = {}  # one sample per GPU per tick; a repeated index = next tick
        for line in self._proc.stdout:
            try:
                index, watts = (x.strip() for x in line.split(","))
                if index in tick:
                    self.samples.append(sum(tick.values()))
                    tick = {}
                tick[index] = float(watts)
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    @property
    def watts(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def measure_bandwidth_ceiling() -> float:
    """Device read bandwidth (bytes/s): a reduction over 4 GiB of bf16, the same access as a
    decode step reading its weights. Measured in the same run, not taken from a datasheet."""
    import jax
    import jax.numpy as jnp

    n = (4 << 30) // 2 if jax.default_backend() == "gpu" else (1 << 24)
    x = jax.random.normal(jax.random.key(0), (n // 8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32))
    f(x).block_until_ready()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    del x
    return n * 2 / float(np.median(times))


def _random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, vocab - 10, size=(n, length)).tolist()


def _make_llm(args, max_num_seqs: int):
    from imp_jax import LLM

    return LLM(args.model, dtype=args.dtype,
              max_model_len=max(i + o for i, o in _pairs(args)) + 16,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              quantization=args.quantization, quant_policy=args.quant_policy,
              num_pages=args.num_pages, page_size=args.page_size,
              gpu_memory_utilization=args.gpu_memory_utilization,
              decode_steps=args.decode_steps, kv_cache_dtype=args.kv_cache_dtype,
              mesh=args.mesh, kv_admission=args.kv_admission)


def _warm_up(llm, **kwargs) -> dict:
    """llm.warmup(**kwargs), timed, then freeze_gc(). Returns the row fields that make a warm-up
    figure readable: its programs and seconds, and how many files the persistent compilation
    cache held before (0: every program compiled and XLA-autotuned from scratch; an FP8
    program's first call is ~91% autotuning, docs/benchmarks.md session 13)."""
    from imp_jax.llm import compilation_cache_files

    before = compilation_cache_files()
    start = time.perf_counter()
    n = llm.warmup(**kwargs)
    seconds = time.perf_counter() - start
    cache = "no compilation cache" if before is None else \
        f"compilation cache: {before} files before, {compilation_cache_files()} after"
    print(f"warm-up: compiled {n} programs in {seconds:.1f} s ({cache})", file=sys.stderr)
    freeze_gc()
    return dict(warmup_programs=n, warmup_s=seconds, cache_files_before_warmup=before)


def _kv_layout(llm) -> dict:
    """The KV layout the engine chose, for the rows: its page size depends on kv_cache_dtype."""
    return dict(page_size=llm.runner.page_size, kv_dtype=str(llm.runner.cache.k[0].dtype))


def freeze_gc() -> None:
    """Collect once, then move every object alive after start-up (params, programs, the
    engine) out of the cyclic GC's reach, as a long-running server does after warm-up: a full
    collection walks that whole heap, 60-80 ms on the CPU dev box, and lands inside some
    engine step. With it frozen, a 1024-row decode block's host time fell 10.2 -> 6.4 ms there
    (benchmarks/host_engine.py --gc-freeze, session 9). Process-global, so only the bench and
    the server call it, never the library, and both call `unfreeze_gc` when they end."""
    import gc

    global _froze
    gc.collect()
    gc.freeze()
    _froze = True


_froze = False  # whether freeze_gc ran (and unfreeze_gc has not): only then is ours to undo


def unfreeze_gc() -> None:
    """Undo freeze_gc, and only it: a freeze the embedding process made itself stays."""
    import gc

    global _froze
    if _froze:
        gc.unfreeze()
        _froze = False


def _timed_batch(llm, prompts, output_len):
    """Run prompts as one batch; return (ttft, decode_time) from first/last token times."""
    from imp_jax import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    waiting = {engine.add_request(p, params) for p in prompts}  # no first token yet
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        # long prompts prefill over several steps: the batch's first token is the last
        # request's, whichever step returns it
        waiting.difference_update(o.request_id for o in outs if o.token_ids)
        if first is None and not waiting:
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - (first or end)


def bench_latency(args) -> list[dict]:
    from imp_jax.cache import KVCache

    batches = _ints(args.batch)
    (input_len, output_len), = _pairs(args)[:1]
    ceiling = measure_bandwidth_ceiling()  # before the KV pool takes the free memory
    peer_rows = []
    if args.peer == "hf":  # first, so torch frees its memory before our pool is sized
        shape = _shape_of(args)
        if shape is None:
            peer_rows.append(dict(mode="hf", error="--peer hf needs a random:<shape> model"))
        else:
            for b in batches:
                peer_rows.extend(hf_peer(shape, b, input_len, output_len,
                                         modes=_peer_modes(args)))
    llm = _make_llm(args, max(batches))
    # the programs these batches use, compiled in parallel (a 70B shape's are minutes one by one)
    warm_fields = {**_warm_up(llm, max_prompt_tokens=max(batches) * input_len),
                   **_kv_layout(llm)}
    cfg = llm.config
    kv_dtype = llm.runner.cache.k[0].dtype
    weight_bytes = step_weight_bytes(llm)
    rows = []
    for b in batches:
        prompts = _random_prompts(b, input_len, cfg.vocab_size, seed=b)
        # Warm up on other prompts of the same shape: the same prompts would be prefix-cache
        # hits in the timed pass, which would then prefill only the last page.
        warm = _random_prompts(b, input_len, cfg.vocab_size, seed=10_000 + b)
        _timed_batch(llm, warm, output_len)  # runs each program once before the timed pass
        steps0, host0 = llm.engine.stats["steps"], llm.engine.stats["host_time"]
        with PowerMeter() as power:
            ctx = _profile(args.profile)
            with ctx:
                ttft, decode = _timed_batch(llm, prompts, output_len)
        steps = llm.engine.stats["steps"] - steps0
        host = llm.engine.stats["host_time"] - host0
        n_dec = output_len - 1
        step_time = decode / max(n_dec, 1)
        avg_ctx = input_len + output_len / 2
        kv_bytes = b * avg_ctx * KVCache.bytes_per_token(cfg, kv_dtype)
        bw = (weight_bytes + kv_bytes) / step_time
        devices = 1 if llm.runner.sharding is None else llm.runner.sharding.mesh.size
        tokens = b * output_len
        row = dict(mode="latency", model=args.model, batch=b, input_len=input_len,
                   output_len=output_len, ttft_ms=ttft * 1e3, itl_ms=step_time * 1e3,
                   decode_tok_s=b * n_dec / decode if decode else float("nan"),
                   tok_s_per_seq=n_dec / decode if decode else float("nan"),
                   bandwidth_tb_s=bw / 1e12, ceiling_tb_s=ceiling / 1e12, devices=devices,
                   fraction_of_ceiling=bw / (ceiling * devices),  # each device reads its shard
                   host_ms_per_step=1e3 * host / max(steps, 1),
                   watts=power.watts,
                   tokens_per_joule=tokens / (power.watts * (ttft + decode))
                   if power.watts else None, **warm_fields)
        rows.append(row)
    return rows + peer_rows


def bench_throughput(args) -> list[dict]:
    """One engine, warmed up once, runs every (input, output) length pair; then the HF peer."""
    from imp_jax import SamplingParams

    rows = []
    llm = None if args.peer_only else _make_llm(args, args.max_num_seqs)
    warm_fields = {**_warm_up(llm), **_kv_layout(llm)} if llm is not None else {}
    for input_len, output_len in _pairs(args) if llm is not None else ():
        cfg = llm.config
        rng = np.random.default_rng(input_len * 7919 + output_len)
        in_lens = _lengths(rng, input_len, args.num_prompts, args.random_range)
        out_lens = _lengths(rng, output_len, args.num_prompts, args.random_range)
        prompts = [rng.integers(10, cfg.vocab_size - 10, size=n).tolist() for n in in_lens]
        params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True)
                  for n in out_lens]
        # a short first pass over other prompts runs each kind of step once (the warm-up
        # already compiled every program) without leaving prefix-cache hits for the timed one;
        # a full batch of long prompts here cost a minute of device time per run
        warm = min(len(prompts), args.max_num_seqs, 64)
        llm.generate([rng.integers(10, cfg.vocab_size - 10, size=n).tolist()
                      for n in in_lens[:warm]],
                     [p.clone(max_tokens=min(p.max_tokens, 24)) for p in params[:warm]],
                     use_tqdm=False)
        stats = llm.engine.stats
        before = copy.deepcopy(stats)  # step_kinds is a nested dict
        traced = llm.runner.num_compiles
        with PowerMeter() as power:
            with _profile(args.profile):
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
                elapsed = time.perf_counter() - start
        out_tokens = sum(len(o.token_ids) for o in outs)
        steps = stats["steps"] - before["steps"]
        rows.append(dict(
            mode="throughput", model=args.model, num_prompts=len(prompts), input_len=input_len,
            output_len=output_len, elapsed_s=elapsed, output_tok_s=out_tokens / elapsed,
            total_tok_s=(out_tokens + int(sum(in_lens))) / elapsed,
            requests_s=len(prompts) / elapsed,
            preemptions=stats["preemptions"] - before["preemptions"],
            host_ms_per_step=1e3 * (stats["host_time"] - before["host_time"]) / max(steps, 1),
            blocks_ahead=stats["blocks_ahead"] - before["blocks_ahead"],
            step_kinds=_kinds_delta(before["step_kinds"], stats["step_kinds"]),
            # programs traced during the timed pass: 0 unless warm-up missed one (a mid-run
            # compile costs seconds, as session 6's tp=2 run showed)
            compiles=llm.runner.num_compiles - traced,
            watts=power.watts,
            tokens_per_joule=out_tokens / (power.watts * elapsed) if power.watts else None,
            **warm_fields))
        if rows[-1]["compiles"]:
            print(f"warning: {rows[-1]['compiles']} program(s) compiled inside the timed pass; "
                  "its figures include compile time (warm-up missed a shape)", file=sys.stderr)
        print("row:", json.dumps(rows[-1]), file=sys.stderr, flush=True)  # survives a kill
    if args.peer == "hf":
        shape = _shape_of(args)
        del llm  # give the device memory back before torch takes it
        import gc

        unfreeze_gc()  # a frozen engine in a reference cycle would keep its device memory
        gc.collect()
        for input_len, output_len in _pairs(args):
            peer = [row for b in _ints(args.peer_batches)
                    for row in hf_peer(shape, b, input_len, output_len,
                                       modes=_peer_modes(args))] if shape else [
                dict(mode="hf", error="--peer hf needs a random:<shape> model")]
            rows.extend(peer)
            print("peer:", json.dumps(peer), file=sys.stderr, flush=True)
            ok = [r for r in peer if "decode_tok_s" in r]
            if ok and not args.peer_only:
                best = max(ok, key=lambda r: r["decode_tok_s"])
                ours = next(r for r in rows if r["mode"] == "throughput"
                            and r["input_len"] == input_len and r["output_len"] == output_len)
                ours["hf_best_batch"] = best["batch"]
                ours["hf_best_mode"] = best["mode"]
                ours["hf_best_tok_s"] = best["decode_tok_s"]
                ours["x_hf_best"] = ours["output_tok_s"] / best["decode_tok_s"]
    return rows


def _kinds_delta(before: dict, after: dict) -> dict:
    """{kind: {"calls", "seconds", "host_s", "dispatch_s"}} of the engine's step kinds during a
    timed pass: wall time of the steps, the engine's host work in them, and the time spent in
    the runner's call (building inputs and enqueueing programs, before the result is read)."""
    out = {}
    for kind, (calls, secs, host, dispatch) in after.items():
        c0, s0, h0, d0 = before.get(kind, (0, 0.0, 0.0, 0.0))
        if calls > c0:
            # Microseconds: a fast CPU run's host work rounds to 0 at milliseconds.
            out[kind] = {"calls": calls - c0, "seconds": round(secs - s0, 6),
                         "host_s": round(host - h0, 6), "dispatch_s": round(dispatch - d0, 6)}
    return out


PEER_MODES = ("hf-eager", "hf-static-compile")


def _peer_modes(args) -> tuple[str, ...]:
    modes = tuple(m for m in str(args.peer_modes).split(",") if m)
    bad = [m for m in modes if m not in PEER_MODES]
    if bad or not modes:
        raise SystemExit(f"--peer-modes {args.peer_modes!r}: allowed a comma list of "
                         f"{', '.join(PEER_MODES)}")
    return modes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"expected a comma-separated list of integers >= 1, got {text!r}")
    return values


def _pairs(args) -> list[tuple[int, int]]:
    """(input_len, output_len) pairs: comma lists of equal length, or one value for both."""
    ins, outs = _ints(args.input_len), _ints(args.output_len)
    if len(ins) == 1:
        ins = ins * len(outs)
    if len(outs) == 1:
        outs = outs * len(ins)
    if len(ins) != len(outs):
        raise SystemExit(f"--input-len {args.input_len} and --output-len {args.output_len} "
                         "must list the same number of lengths (or one of them a single value)")
    return list(zip(ins, outs))


def _shape_of(args):
    from checkpoints.presets import SHAPES

    name = args.model[len("random:"):] if args.model.startswith("random:") else None
    return SHAPES.get(name) if name else None


def _lengths(rng, mean: int, n: int, spread: float) -> np.ndarray:
    if spread <= 0:
        return np.full(n, mean)
    lo, hi = max(1, int(mean * (1 - spread))), int(mean * (1 + spread))
    return rng.integers(lo, hi + 1, size=n)


def step_weight_bytes(llm) -> int:
    """Weight bytes one decode step reads: every parameter at its stored width (8-bit weights and
    their scales included), except the embedding table, of which a step reads one row per
    token (unless it is tied to the lm_head, which reads it whole)."""
    import jax

    params = dict(llm.model.params)
    if not llm.config.tie_word_embeddings:
        params.pop("embed", None)
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))


class _NoProfile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# XLA on GPU replays each step as CUDA graphs ("command buffers"); a profile then shows one
# opaque command_buffer_N per graph. Off under --profile: the kernels appear by name.
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def _profile(path):
    if not path:
        return _NoProfile()
    import jax

    options = jax.profiler.ProfileOptions()
    if os.environ.get("IMP_JAX_PROFILE_PYTHON") == "1":
        # every Python call becomes a host event (slower host): says what the host did while
        # the device waited (benchmarks/trace_summary.py --gaps)
        options.python_tracer_level = 1
    return jax.profiler.trace(path, profiler_options=options)


def hf_peer(cfg, batch: int, input_len: int, output_len: int,
            modes=("hf-eager", "hf-static-compile")) -> list[dict]:
    """HF transformers on the same shape: eager and static cache + torch.compile."""
    try:
        import torch
        import transformers
    except ImportError:
        return [dict(mode="hf", error="torch/transformers not installed")]
    if not torch.cuda.is_available():
        return [dict(mode="hf", error="no CUDA device for torch")]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    try:
        return _hf_generate(model, cfg, batch, input_len, output_len, modes)
    except torch.OutOfMemoryError as e:
        return [dict(mode=m, batch=batch, input_len=input_len, output_len=output_len,
                     error=f"out of memory: {str(e)[:80]}") for m in modes]
    finally:
        del model
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _hf_generate(model, cfg, batch, input_len, output_len, modes) -> list[dict]:
    import torch

    ids = torch.randint(10, cfg.vocab_size - 10, (batch, input_len), device="cuda")
    rows = []
    for name, kwargs in (("hf-eager", {}),
                         ("hf-static-compile", {"cache_implementation": "static"})):
        if name not in modes:
            continue
        if name == "hf-static-compile":
            # "default" mode: reduce-overhead's CUDA graphs clash with generate's static cache
            model.forward = torch.compile(model.forward, fullgraph=True)
        gen = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                   **kwargs)
        # eager needs no compile: a short warm-up; the static cache's shape needs the full one
        warm = gen if kwargs else dict(gen, max_new_tokens=4, min_new_tokens=4)
        row = dict(mode=name, batch=batch, input_len=input_len, output_len=output_len)
        try:  # one mode out of memory keeps the other's row
            with torch.no_grad():
                model.generate(ids, **warm)  # warm-up (compiles)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(ids, **gen)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - t
            row["decode_tok_s"] = batch * output_len / elapsed
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e)[:80]}"
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("model",)]
    print(" | ".join(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v))
        print(" | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the HTTP server under load: its own options and module
        from imp_jax.server import bench as serve_bench

        return serve_bench.main(argv[1:])
    ap = argparse.ArgumentParser(prog="imp-jax bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["latency", "throughput"])
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--dtype", default=None)
    add_quantization_args(ap)
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | int8 | bfloat16 | ...")
    ap.add_argument("--mesh", default=None, help="e.g. tp=8 (tensor parallel over GPUs)")
    ap.add_argument("--batch", default="1", help="latency: comma-separated batch sizes")
    ap.add_argument("--input-len", default="128", help="comma list (throughput: one run each)")
    ap.add_argument("--output-len", default="128", help="comma list, paired with --input-len")
    ap.add_argument("--num-prompts", type=_positive, default=1000)
    ap.add_argument("--random-range", type=float, default=0.0,
                    help="throughput: lengths uniform in mean*(1±r), r in [0, 1)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--page-size", type=_positive, default=None,
                    help="tokens per KV page, a power of two (default: 64 for fp8 KV pages, "
                         "else 16)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-admission", choices=["optimistic", "reserve"], default="optimistic",
                    help="reserve: admit a request only while every running one can grow to "
                         "its max_tokens (no preemption)")
    ap.add_argument("--decode-steps", type=int, default=8,
                    help="decode steps per compiled call (1 = sync every token)")
    ap.add_argument("--peer", choices=["hf"], default=None)
    ap.add_argument("--peer-only", action="store_true",
                    help="throughput: run only the --peer (e.g. on another GPU, in parallel)")
    ap.add_argument("--peer-batches", default="64,128,256",
                    help="throughput --peer hf: HF batch sizes to try (the best is the peer)")
    ap.add_argument("--peer-modes", default=",".join(PEER_MODES),
                    help="--peer hf: HF eager and/or static cache + torch.compile (each "
                         "batch in each mode; throughput takes the best row as the peer)")
    ap.add_argument("--profile", default=None,
                    help="write a jax.profiler trace here (with XLA's CUDA-graph command "
                         "buffers off, so the trace names every kernel, not one graph per step)")
    ap.add_argument("--json", default=None, help="save results as JSON")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    _peer_modes(args)  # a bad --peer-modes fails before anything compiles
    _pairs(args)
    if not 0 <= args.random_range < 1:
        ap.error(f"--random-range {args.random_range}: allowed [0, 1)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist")
    if args.profile:  # read when the backend starts, so before anything touches a device
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + NO_COMMAND_BUFFERS
                                   ).strip()
    import jax

    try:
        rows = bench_latency(args) if args.mode == "latency" else bench_throughput(args)
    finally:  # a caller in the same process (tests, a notebook) gets its collector back
        unfreeze_gc()
    device = jax.devices()[0].device_kind
    for r in rows:
        if args.profile:  # the figures of a profiled run are not comparable with others
            r.setdefault("profiled_without_command_buffers", True)
        r.setdefault("mesh", args.mesh)
        r.setdefault("device", device)
        r.setdefault("date", time.strftime("%Y-%m-%d"))
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
