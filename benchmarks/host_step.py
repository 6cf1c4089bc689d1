"""Host time to build one step's inputs (ModelRunner, no device work): decode rows and prompt
chunks, at engine-sized batches. CPU is enough; the figure is per step.

    PYTHONPATH=$PWD python benchmarks/host_step.py [--rows 1024] [--pages 17] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024, help="decode rows of the step")
    ap.add_argument("--pages", type=int, default=17, help="pages per sequence")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.rows < 1 or args.pages < 1 or args.reps < 1:
        ap.error(f"--rows, --pages and --reps must be >= 1, got {args.rows}, {args.pages}, "
                 f"{args.reps}")
    from imp_jax.loaders import load_model
    from imp_jax.runner import ModelRunner, StepSeq
    from imp_jax.sampling import SamplingParams, SamplingTensors

    page = 16
    m = load_model("random:tiny", "float32")
    r = ModelRunner(m.cfg, m.params, num_pages=args.rows * args.pages + 2, page_size=page,
                    max_model_len=args.pages * page, max_num_seqs=args.rows)
    rng = np.random.default_rng(0)
    n = args.rows
    seqs = [StepSeq([5], (args.pages - 1) * page, rng.integers(1, n * args.pages, args.pages)
                    .tolist()) for _ in range(n)]
    greedy = [SamplingParams(temperature=0)] * n

    def timed(fn):
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    t_sampling = timed(lambda: SamplingTensors.from_params(greedy, list(range(n)), [0] * n))
    t = SamplingTensors.from_params(greedy, list(range(n)), [0] * n)
    t_step = timed(lambda: r._step(seqs, t, 0, compile_only=True))
    t_block = timed(lambda: r.decode_steps(seqs, t, 8, compile_only=True))
    print(f"{n} decode rows x {args.pages} pages, median of {args.reps} (ms): "
          f"step inputs {t_step:.2f}, 8-step block inputs {t_block:.2f}, "
          f"sampling tensors {t_sampling:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
