#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md ("Whole models on one GPU"), one stage per call:
#   bash benchmarks/gpu_runs.sh STAGE [RESULTS_DIR]
# STAGE: 3b (CUDA == CPU check on one full-size layer, then ties/task_arithmetic/ace/actmat on the
# whole 3B shape), 7b (ties, ace, actmat, task_arithmetic on the whole 7B shape), 7b-variants (ace
# with float64 products, ace under a 2 GiB budget). Checkpoints go to $BENCH_WORK (default
# /dev/shm/bench: tmpfs, as the 7B base + 3 experts are 58 GB). Needs the package installed.
set -uo pipefail
stage=${1:?stage: 3b, 7b or 7b-variants}
results=${2:-${OUT:-gpu-results}}
work=${BENCH_WORK:-/dev/shm/bench}
mkdir -p "$results" "$work"
export PYTHONUNBUFFERED=1
bench() { python3 benchmarks/bench_model.py --cuda --workdir "$work" "$@"; }
case "$stage" in
  3b)
    timeout 150 bench --shape llama-3.2-3b --layers 1 --verify --methods ace actmat 2>&1 | tee "$results/3b-verify.log"
    rm -rf "$work"/llama-3.2-3b-L1-*
    timeout 420 bench --shape llama-3.2-3b --json "$results/3b.json" 2>&1 | tee "$results/3b.log"
    ;;
  7b)
    timeout 560 bench --shape olmo-3-7b --methods ties ace actmat task_arithmetic --json "$results/7b.json" \
      2>&1 | tee "$results/7b.log"
    ;;
  7b-variants)
    MERGEKIT_ACE_MATMUL_DTYPE=float64 timeout 250 bench --shape olmo-3-7b --methods ace --no-plan \
      --json "$results/7b-float64.json" 2>&1 | tee "$results/7b-float64.log"
    MERGEKIT_ACE_MEMORY_BUDGET=2GiB timeout 250 bench --shape olmo-3-7b --methods ace --no-plan \
      --json "$results/7b-budget2g.json" 2>&1 | tee "$results/7b-budget2g.log"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
