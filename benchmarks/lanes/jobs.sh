# Sourced by multi-GPU call scripts (s9_call3_tp.sh, next10_x4.sh): the environment, a deadline
# of ${1:-DEFAULT_BUDGET} seconds, THR (the 1000 x 128/128 bench at 1024 rows) and `run NAME
# GPUS COMMAND...` (one job on those GPUs, cut off at the deadline, its log in $OUT/NAME.log and
# its key lines echoed). Results go under $OUT/res; `pack` archives them and the logs as one
# file (the device tool brings back at most 8).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; mkdir -p "$out/res"
deadline=$(( $(date +%s) + ${budget:?set budget before sourcing jobs.sh} ))
left() { echo $(( deadline - $(date +%s) )); }
THR="python3 -m imp_jax.cli bench throughput --model random:llama3-8b --num-prompts 1000
     --input-len 128 --output-len 128 --max-num-seqs 1024 --max-num-batched-tokens 8192
     --decode-steps 8 --gpu-memory-utilization 0.85 --no-progress"
run() {  # NAME GPUS COMMAND...
    local name=$1 gpus=$2; shift 2
    echo "=== $(date +%T) $name on GPUs $gpus ($(left) s left): $*"
    CUDA_VISIBLE_DEVICES=$gpus timeout "$(left)" "$@" > "$out/$name.log" 2>&1
    echo "=== $name rc $?"
    grep -e '^row' -e 'warm-up' -e 'check ' -e rror -e '"wall_ms"' -e '^| ' -e ' passed' \
        -e ' failed' "$out/$name.log" | cut -c1-700
}
# results and logs in one archive (the device tool brings back at most 8 files)
pack() { (cd "$out" && tar czf results.tgz res ./*.log && rm -rf res ./*.log); }
