"""Engine host time per step at ~1000 rows, on any machine (CPU is enough).

    PYTHONPATH=$PWD python benchmarks/host_engine.py [--rows 1024] [--prompt-len 128]
        [--output-len 32] [--decode-steps 8] [--reps 5] [--gc-freeze] [--profile] [--device]

`--rows` requests of `--prompt-len` random prompt tokens and `--output-len` output tokens each
(greedy, ignore_eos), max_num_seqs = rows, 8192-token steps, decode blocks of `--decode-steps`:
the shape of the GPU throughput run (1024 x 128 in / 32 out). Each repetition is one
`generate` call over fresh prompts (no prefix-cache hits across repetitions), after a
`gc.collect()`; the script prints the engine's own `stats["host_time"]` per step of each, the
part of it Python's garbage collector took, their medians, and host ms per call of each kind of
step.

By default the model's device work is taken out (`HostOnlyRunner`): every step's inputs are
still built by the real ModelRunner (`compile_only`), but nothing runs and the sampled tokens
come from a fixed random stream, so a repetition takes a second and no XLA thread competes with
the engine for the host's cores. `--device` runs `--model` for real instead (minutes on a CPU;
its host time then includes that contention). `--gc-freeze` freezes the heap after the warm-up
repetition, as a server could after its warm-up. `--profile` adds one more repetition under
cProfile (which inflates every Python call) and prints its top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import time

import numpy as np


class HostOnlyRunner:
    """A ModelRunner stand-in for the engine: the real runner builds each step's inputs (its
    host work), the device runs nothing, and tokens (with logprobs) come from a seeded stream."""

    def __init__(self, runner, seed: int = 0):
        self.runner = runner
        self.cfg, self.cache = runner.cfg, runner.cache
        self.page_size, self.max_model_len = runner.page_size, runner.max_model_len
        self.cache_lost = False
        self._rng = np.random.default_rng(seed)

    def _sample(self, shape: tuple, num_logprobs: int):
        """What the device returns for `shape` = ([steps,] rows) rows (padded to a bucket)."""
        from imp_jax.sampling import SampleOutput

        rng, vocab, top = self._rng, self.cfg.vocab_size, (*shape, num_logprobs)
        return SampleOutput(tokens=rng.integers(1, vocab, shape, dtype=np.int32),
                            logprobs=-rng.random(shape, dtype=np.float32),
                            top_ids=rng.integers(1, vocab, top, dtype=np.int32),
                            top_logprobs=-rng.random(top, dtype=np.float32))

    def decode_steps(self, seqs, sampling, num_steps, num_logprobs=0, *,
                     continue_previous=False):
        from imp_jax.runner import bucket

        self.runner.decode_steps(seqs, sampling, num_steps, num_logprobs, compile_only=True)
        return self._sample((num_steps, bucket(len(seqs), lo=4)), num_logprobs)

    def step(self, seqs, sampling=None, num_logprobs=0):
        from imp_jax.runner import StepOutput, bucket

        t0 = time.perf_counter()
        self.runner._step(seqs, sampling, num_logprobs, compile_only=True)
        return StepOutput(self._sample((bucket(len(seqs), lo=4),), num_logprobs), None,
                          np.zeros(len(seqs), np.int32), time.perf_counter() - t0)


class _GcClock:
    """Seconds Python's cyclic garbage collector ran inside `LLMEngine.step` (a collection
    pauses whichever code allocated when a threshold was crossed; at ~1000 rows the engine's
    steps trigger most of them)."""

    def __init__(self, engine):
        self.seconds, self._start, self._inside = 0.0, 0.0, False
        gc.callbacks.append(self._on)
        step = engine.step

        def timed_step(*a, **kw):
            self._inside = True
            try:
                return step(*a, **kw)
            finally:
                self._inside = False

        engine.step = timed_step

    def _on(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._inside:
            self.seconds += time.perf_counter() - self._start

    def close(self):
        gc.callbacks.remove(self._on)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="random:tiny", help="e.g. tests/data/tiny/llama3 (with "
                    "a tokenizer: adds the per-token detokenization)")
    ap.add_argument("--device", action="store_true", help="run the model (default: host only)")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the warm-up "
                    "repetition: full collections skip every object alive then")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if min(args.rows, args.prompt_len, args.output_len, args.decode_steps, args.reps) < 1:
        ap.error("--rows, --prompt-len, --output-len, --decode-steps and --reps must be >= 1")
    from imp_jax import LLM, SamplingParams

    n, page = args.rows, 16
    max_len = args.prompt_len + args.output_len
    # every request's pages at once (no preemption), plus the reserved page 0
    pages = n * -(-max_len // page) + 1
    llm = LLM(args.model, max_model_len=max_len, max_num_seqs=n, page_size=page,
              max_num_batched_tokens=max(args.max_num_batched_tokens, n),
              decode_steps=args.decode_steps, num_pages=pages)
    if not args.device:
        llm.engine.runner = HostOnlyRunner(llm.runner)
    vocab = llm.config.vocab_size
    rng = np.random.default_rng(0)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    st = llm.engine.stats
    kinds: dict[str, list] = {}  # kind of step -> [calls, host seconds] over the timed reps
    gc_clock = _GcClock(llm.engine)

    def run(timed=True):
        prompts = rng.integers(10, vocab - 10, (n, args.prompt_len)).tolist()
        h0, s0, p0, g0 = st["host_time"], st["steps"], st["preemptions"], gc_clock.seconds
        k0 = {k: list(v) for k, v in st["step_kinds"].items()}
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        host, steps, gc_s = st["host_time"] - h0, st["steps"] - s0, gc_clock.seconds - g0
        for k, v in st["step_kinds"].items() if timed else ():
            acc = kinds.setdefault(k, [0, 0.0])
            before = k0.get(k, [0, 0.0, 0.0, 0.0])
            acc[0] += v[0] - before[0]
            acc[1] += v[2] - before[2]
        print(f"  wall {wall:.2f} s, {steps} steps, {st['preemptions'] - p0} preemptions: "
              f"host {1e3 * host / steps:.2f} ms per step, garbage collection in step() "
              f"{1e3 * gc_s / steps:.2f} ms per step")
        return 1e3 * host / steps, 1e3 * gc_s / steps

    print(f"{n} rows x {args.prompt_len} in / {args.output_len} out, decode blocks of "
          f"{args.decode_steps}, {'device' if args.device else 'host only'}"
          f"{', gc.freeze() after the warm-up' if args.gc_freeze else ''}:")
    try:
        run(timed=False)  # warm-up (compiles, with --device); not counted
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        results = []
        for _ in range(args.reps):
            gc.collect()  # every repetition starts with the collector's generations alike
            results.append(run())
        host, gcs = zip(*results)
        med = statistics.median
        print(f"median of {args.reps}: host ms per step {med(host):.2f} (min {min(host):.2f}, "
              f"max {max(host):.2f}), of which garbage collection {med(gcs):.2f}; without it "
              f"{med(h - g for h, g in zip(host, gcs)):.2f}")
        print("host ms per call of step(), mean over the reps: " + ", ".join(
            f"{k} {1e3 * h / c:.2f} ({c // args.reps} calls)"
            for k, (c, h) in sorted(kinds.items())))
        if args.profile:
            gc.collect()
            prof = cProfile.Profile()
            prof.enable()
            run(timed=False)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        gc_clock.close()
        if args.gc_freeze:
            gc.unfreeze()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
