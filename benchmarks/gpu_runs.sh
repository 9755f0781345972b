#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md ("GPU"), for a session that is lent the device machine.
#   bash benchmarks/gpu_wheels.sh                       # here, once: wheels that machine lacks -> .whl/
#   device run, carry [".whl"], timeout_s 600:
#     bash benchmarks/gpu_runs.sh all                   # the stages below in priority order, <= 9 min
#   or one stage per call: bash benchmarks/gpu_runs.sh STAGE [RESULTS_DIR]
# STAGE: verify (CUDA == CPU on one full-size 3B layer, float32 output), 7b (ties and ace on the
# whole OLMo-3-7B shape: the time and memory targets), 7b-actmat, 7b-variants (ace on a
# 2-layer 7B shape under a 2 GiB budget, which drives the OOM retry / CPU fallback path, and with
# float64 products), 3b (ace, actmat, ties on the whole 3B shape); all = the first four in that
# order, each step cut to what is left of GPU_RUNS_BUDGET_S (default 540) seconds.
# What comes back (at most 8 files): env.txt (with calibration.py's GPU figures, once: the bench
# runs skip theirs to save device time), runs.log, one NAME.json per step, skipped.txt.
# Checkpoints go to $BENCH_WORK (default /dev/shm/bench: the 7B base + 3 experts are 58 GB, more
# than the 64 GiB disk holds beside a merge); merges go to $BENCH_OUT (default /tmp/bench-out).
set -uo pipefail
stage=${1:?stage: all, 7b, verify, 7b-variants, 7b-actmat or 3b}
results=${2:-${OUT:-gpu-results}}
work=${BENCH_WORK:-/dev/shm/bench}
merges=${BENCH_OUT:-/tmp/bench-out}
deadline=$((SECONDS + ${GPU_RUNS_BUDGET_S:-540}))
mkdir -p "$results" "$work" "$merges"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! python3 -c "import mergekit" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
left() { echo $((deadline - SECONDS)); }
bench() {  # bench NAME SECONDS ARGS...: one bench_model.py run, its log and JSON in $results
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt 30 ]; then echo "skipped $name: budget spent" | tee -a "$results/skipped.txt"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $name (limit ${limit}s, $(left)s left)"
  timeout "$limit" python3 benchmarks/bench_model.py --cuda --no-calibrate --workdir "$work" --out-root "$merges" \
    --json "$results/$name.json" "$@" 2>&1 | tee -a "$results/runs.log"
}
env_record() {
  { nvidia-smi; python3 -c "import torch, mergekit, sys; print(sys.version); print('torch', torch.__version__, \
torch.cuda.get_device_name()); print('mergekit', mergekit.__file__)"; df -h /dev/shm /tmp; nproc; free -g; \
    timeout 60 python3 benchmarks/calibration.py --cuda --reps 1; } > "$results/env.txt" 2>&1
}
case "$stage" in
  all)
    env_record
    bench verify 90 --shape llama-3.2-3b --layers 1 --verify --methods ace actmat
    bench 7b 300 --shape olmo-3-7b --methods ties ace
    bench 7b-actmat 120 --shape olmo-3-7b --methods actmat
    rm -rf "$work"/olmo-3-7b-Lall-*  # room in /dev/shm for the 2-layer checkpoints
    MERGEKIT_ACE_MEMORY_BUDGET=2GiB bench 7b-budget2g 60 --shape olmo-3-7b --layers 2 --methods ace --no-plan
    MERGEKIT_ACE_MATMUL_DTYPE=float64 bench 7b-float64 45 --shape olmo-3-7b --layers 2 --methods ace --no-plan
    ;;
  7b) env_record; bench 7b 560 --shape olmo-3-7b --methods ties ace ;;
  verify) bench verify 300 --shape llama-3.2-3b --layers 1 --verify --methods ace actmat ;;
  7b-variants)
    MERGEKIT_ACE_MEMORY_BUDGET=2GiB bench 7b-budget2g 250 --shape olmo-3-7b --layers 2 --methods ace --no-plan
    MERGEKIT_ACE_MATMUL_DTYPE=float64 bench 7b-float64 250 --shape olmo-3-7b --layers 2 --methods ace --no-plan
    ;;
  7b-actmat) bench 7b-actmat 560 --shape olmo-3-7b --methods actmat ;;
  3b) bench 3b 560 --shape llama-3.2-3b --methods ace actmat ties ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
exit 0
