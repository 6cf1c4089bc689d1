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
set -u
budget=$1; shift
deadline=$(( $(date +%s) + budget ))
export PYTHONPATH=${PYTHONPATH:-}:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-out}; mkdir -p "$out"
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
# the device tool brings back at most 8 files: past that, everything but the logs in one archive
if (( $(find "$out" -type f | wc -l) > 8 )); then
    tar czf /tmp/lanes_results.tgz -C "$out" --exclude='lane*.log' \
        --exclude=lanes_results.tgz . \
        && find "$out" -mindepth 1 -type f ! -name 'lane*.log' -delete \
        && find "$out" -mindepth 1 -type d -empty -delete && mv /tmp/lanes_results.tgz "$out/"
fi
