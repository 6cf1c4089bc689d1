#!/usr/bin/env bash
# Independent single-GPU benchmarks side by side on a multi-GPU host: lane k runs on GPU k
# (CUDA_VISIBLE_DEVICES=k), its commands one after another, each cut off at the shared deadline.
# Each GPU has its own HBM, so the lanes' timings do not share the resource they measure; they
# do share the host's CPUs (64 cores on the 4 x H100 machine).
#
#   benchmarks/lanes.sh SECONDS LANEFILE0 [LANEFILE1 ...]
#   FIRST_GPU=2 benchmarks/lanes.sh ...     # lanes on GPUs 2, 3, ... (others busy elsewhere)
#
# A LANEFILE holds one shell command per line (# comments allowed). Logs: $OUT/laneK.log.
#
# XLA's GEMM autotuning is ~91% of an FP8 program's first call (~105 of 116 s for the FP8 prompt
# program, session 13), and every lent machine starts empty. So the lanes share one compilation
# cache ($IMP_JAX_CACHE_DIR, which imp_jax's LLM and benchmarks/mixed_step.py use unless
# IMP_JAX_NO_CACHE=1; JAX keeps XLA's per-fusion autotune results inside it). Those results come
# back as $OUT/autotune_cache.tgz, and a .autotune/ folder in the tree is restored into the
# cache first. .autotune/ is ignored by git, so it travels only when the call carries it (e.g.
# inside the carried snapshot: `mkdir -p .autotune && tar xzf .../autotune_cache.tgz -C
# .autotune`, then copy it into the snapshot). Only the autotune results travel, not the
# compiled programs; they are per GPU model (others are cache misses). Commands that compile
# the same programs see each other's cache within a call: a warm-up figure is then warm. A
# command that sets JAX_COMPILATION_CACHE_DIR itself keeps its results out of this. $OUT brings
# back at most 8 files: the lane logs, lanes_results.tgz and autotune_cache.tgz (<= 6 lanes).
set -u
budget=$1; shift
deadline=$(( $(date +%s) + budget ))
export PYTHONPATH=${PYTHONPATH:-}:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-out}; mkdir -p "$out"
export IMP_JAX_CACHE_DIR=${IMP_JAX_CACHE_DIR:-/tmp/imp_jax_cache}
autotune=$IMP_JAX_CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir
if [ -d .autotune ]; then  # the archive's own folder name, or its contents
    src=.autotune; [ -d .autotune/xla_gpu_per_fusion_autotune_cache_dir ] \
        && src=.autotune/xla_gpu_per_fusion_autotune_cache_dir
    mkdir -p "$autotune" && cp -r "$src"/. "$autotune"/ \
        && echo "autotune results restored: $(find "$autotune" -type f | wc -l) files"
fi
if [ -d .whl ]; then  # packages the GPU machine lacks (the server's), carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

lane() {  # lane INDEX FILE
    local k=$1 file=$2
    while IFS= read -r cmd || [ -n "$cmd" ]; do
        case "$cmd" in ''|'#'*) continue;; esac
        local left=$(( deadline - $(date +%s) ))
        if (( left < 20 )); then echo "SKIPPED (deadline): $cmd"; continue; fi
        echo "=== $(date +%T) gpu $k (${left}s left): $cmd"
        CUDA_VISIBLE_DEVICES=$k timeout "$left" bash -c "$cmd" 2>&1 \
            | grep -v -e '^W0000' -e 'UserWarning' -e '^  warnings.warn'
        echo "=== rc ${PIPESTATUS[0]} after $(( $(date +%s) - deadline + left ))s"
    done < "$file"
}

k=${FIRST_GPU:-0}
for file in "$@"; do
    lane "$k" "$file" > "$out/lane$k.log" 2>&1 &
    k=$((k + 1))
done
wait
tail -n 25 "$out"/lane*.log
if [ -d "$autotune" ]; then
    tar czf "$out/autotune_cache.tgz" -C "$autotune" . \
        && echo "autotune results saved: $(find "$autotune" -type f | wc -l) files"
fi
# the device tool brings back at most 8 files: past that, everything but the logs in one archive
if (( $(find "$out" -type f | wc -l) > 8 )); then
    tar czf /tmp/lanes_results.tgz -C "$out" --exclude='lane*.log' \
        --exclude=autotune_cache.tgz \
        --exclude=lanes_results.tgz . \
        && find "$out" -mindepth 1 -type f ! -name 'lane*.log' ! -name autotune_cache.tgz -delete \
        && find "$out" -mindepth 1 -type d -empty -delete && mv /tmp/lanes_results.tgz "$out/"
fi
