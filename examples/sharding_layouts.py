# %% [markdown]
# # Sharding layouts compared
#
# Runs one random Llama-shaped model under several `imp_jax.sharding` layouts on the devices
# present (8 fake CPU devices when there is no accelerator) and compares, per layout:
#
# * **memory per device** (`sharding.memory_plan`, checked against the placed shards),
# * **collectives** in the compiled decode step's HLO (Megatron TP: one all-reduce after the
#   attention o-projection and one after the MLP down-projection per layer, plus one for the
#   vocab-split embedding lookup; never an all-gather of a weight),
# * **step time** of a prefill and a decode step.
#
# On fake CPU devices all "devices" share the same cores, so the times show overheads, not
# speed-ups; run it on a multi-GPU host for real numbers. The same code is in
# `examples/sharding_layouts.ipynb`.

# %%
import os

if "XLA_FLAGS" not in os.environ and "JAX_PLATFORMS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import time

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax import sharding
from imp_jax.config import ModelConfig
from imp_jax.runner import ModelRunner, StepSeq
from imp_jax.sampling import SamplingParams, SamplingTensors
from imp_jax.spec import init_params

print(jax.devices())
N = len(jax.devices())

# %% [markdown]
# A small model with 8 query heads and 2 KV heads, so tp=8 works and tp=4/8 exercise the KV-head
# repeat (each device keeps the one KV head its query heads read).

# %%
cfg = ModelConfig(family="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536,
                  num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)
params = init_params(cfg, jax.random.key(0), jnp.float32)
PAGES, PAGE = 256, 16
BATCH, PROMPT = 8, 64

# %%
layouts = [("single device", 1, 1, None)]
for tp, dp, rules in [(2, 1, sharding.tensor_parallel()), (4, 1, sharding.tensor_parallel()),
                      (8, 1, sharding.tensor_parallel()),
                      (4, 1, sharding.tensor_parallel("replicate")),
                      (1, 2, sharding.data_parallel()), (1, 8, sharding.data_parallel()),
                      (2, 4, sharding.tp_dp()), (4, 2, sharding.tp_dp())]:
    if tp * dp <= N:
        name = f"tp={tp} dp={dp}" + (" (KV replicated)" if rules.kv_heads_fallback ==
                                     "replicate" else "")
        layouts.append((name, tp, dp, rules))


def run_layout(name, tp, dp, rules):
    runner = ModelRunner(cfg, params, num_pages=PAGES, page_size=PAGE, max_model_len=256)
    if rules is not None:
        mesh = sharding.make_mesh(tp=tp, dp=dp, devices=jax.devices()[:tp * dp])
        sharding.shard_runner(runner, mesh, rules)
        plan = sharding.memory_plan(cfg, mesh, rules, jnp.float32, kv_pages=PAGES, page_size=PAGE)
    else:
        plan = sharding.memory_plan(cfg, "tp=1", sharding.data_parallel(), jnp.float32,
                                    kv_pages=PAGES, page_size=PAGE)
    rng = np.random.default_rng(0)
    per_seq = -(-(PROMPT + 8) // PAGE)
    pages = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(BATCH)]
    prompts = [rng.integers(0, cfg.vocab_size, PROMPT).tolist() for _ in range(BATCH)]
    st = SamplingTensors.from_params([SamplingParams(temperature=0)] * BATCH, [0] * BATCH,
                                     [0] * BATCH, pad_to=BATCH)
    prefill = [StepSeq(p, 0, pg) for p, pg in zip(prompts, pages)]

    def timed(seqs, reps):
        runner.step(seqs, st).sample.tokens.block_until_ready()  # compile + warm up
        t = time.perf_counter()
        for _ in range(reps):
            out = runner.step(seqs, st)
        out.sample.tokens.block_until_ready()
        return (time.perf_counter() - t) / reps, np.asarray(out.sample.tokens)[:BATCH]

    t_prefill, first = timed(prefill, 2)
    decode = [StepSeq([int(t)], PROMPT, pg) for t, pg in zip(first, pages)]
    t_decode, _ = timed(decode, 10)
    hlo = sharding.step_hlo(runner, decode, st)
    counts = sharding.count_collectives(hlo)
    return dict(layout=name, params_MiB=plan.params_bytes / 2**20,
                cache_MiB=plan.cache_bytes / 2**20, kv_repeat=plan.kv_repeat,
                all_reduce=counts["all-reduce"], all_gather=counts["all-gather"],
                weight_all_gathers=len(sharding.weight_all_gathers(hlo, runner.params)),
                prefill_ms=t_prefill * 1e3, decode_ms=t_decode * 1e3, first_tokens=first)


results = [run_layout(*layout) for layout in layouts]

# %%
ref = results[0]["first_tokens"]
cols = ["layout", "params_MiB", "cache_MiB", "kv_repeat", "all_reduce", "all_gather",
        "weight_all_gathers", "prefill_ms", "decode_ms"]
print(" | ".join(f"{c:>14}" for c in cols) + " | same tokens")
for r in results:
    cells = [f"{r[c]:>14.2f}" if isinstance(r[c], float) else f"{str(r[c]):>14}" for c in cols]
    print(" | ".join(cells) + f" | {bool(np.array_equal(r['first_tokens'], ref))}")

# %% [markdown]
# Reading the table:
#
# * TP divides the weights (norms stay replicated) and the KV cache by tp. With tp > KV heads
#   the default "repeat" layout keeps the per-device cache at one KV head; "replicate" keeps all
#   KV heads on every device (`cache_MiB` x tp/kv).
# * The TP decode step has `2 * num_layers + 1` all-reduces (o-proj, down-proj, embedding) and
#   one all-gather (of the logits, for sampling) -- no weight is ever gathered.
# * DP replicates weights and cache; the step's tokens are split over "dp", which costs
#   all-gathers of the new K/V and of queries around attention (see docs/sharding.md).

# %%
for r in results:
    assert np.array_equal(r["first_tokens"], ref), r["layout"]
    assert r["weight_all_gathers"] == 0, r["layout"]
print("all layouts sample the same tokens; no weight all-gathers")
