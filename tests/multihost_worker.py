"""One process of a multi-process (multi-host) sharded run on localhost CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python tests/multihost_worker.py --port 12345 --process-id 0 --num-processes 2 --out out0.npz

Every process loads the same tiny checkpoint, joins `jax.distributed`, builds one global
("dp", "tp") mesh over all processes' devices, shards a ModelRunner over it and runs the same
steps (SPMD: every process issues the same program). It writes the teacher-forced logits and
the greedy continuation, then two decode blocks (the second fed on the device by the first);
tests/test_sharding.py compares them with a single-process run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def decode_blocks(runner, token: int, start: int, n: int = 3) -> list[int]:
    """Two greedy blocks of n decode steps from `token` at `start` (pages 1-5): the second fed
    on the device by the first's last token (`continue_previous`), as the engine runs them."""
    import numpy as np

    from imp_jax.runner import StepSeq
    from imp_jax.sampling import SamplingParams, SamplingTensors

    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)], [0], [0])
    pages = [1, 2, 3, 4, 5]
    first = runner.decode_steps([StepSeq([token], start, pages)], greedy, n)
    second = runner.decode_steps([StepSeq([0], start + n, pages)], greedy, n,
                                 continue_previous=True)
    return [int(t) for o in (first, second) for t in np.asarray(o.tokens)[:, 0]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--model", default="llama3")
    ap.add_argument("--tp", type=int, default=None)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)

    import jax.numpy as jnp
    import numpy as np

    from imp_jax import sharding
    from imp_jax.loaders.hf_dir import load_hf_dir
    from imp_jax.runner import ModelRunner, StepSeq

    assert jax.process_count() == args.num_processes, jax.process_count()
    n = len(jax.devices())
    tp = args.tp or n // args.dp
    mesh = sharding.make_mesh(tp=tp, dp=args.dp)
    cfg, params = load_hf_dir(os.path.join(DATA, "tiny", args.model), jnp.float32)
    params = jax.tree.map(np.asarray, params)  # host copies: every process holds the same values
    runner = ModelRunner(cfg, params, num_pages=32, page_size=4, max_model_len=64)
    sharding.shard_runner(runner, mesh, sharding.tensor_parallel())
    assert not runner.cache.k[0].sharding.is_fully_addressable  # really spans processes

    # Two programs (prefill Q=8, decode Q=1), both returning logits; greedy on the host.
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 7)]
    pages = [1, 2, 3, 4]
    logits = np.asarray(runner.step([StepSeq(ids, 0, pages, all_logits=True)]).logits)[:len(ids)]
    out, start = [int(logits[-1].argmax())], len(ids)
    for _ in range(4):
        res = runner.step([StepSeq([out[-1]], start, pages, all_logits=True)])
        out.append(int(np.asarray(res.logits)[0].argmax()))
        start += 1
    block = decode_blocks(runner, out[-1], start)
    np.savez(args.out, logits=logits, greedy=np.asarray(out), ids=np.asarray(ids),
             block=np.asarray(block), devices=n, process_count=jax.process_count())
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
