#!/usr/bin/env bash
# Regenerates the committed bench results, benchmarks/results/bench_* (see benchmarks/README.md):
#   bash benchmarks/run_bench.sh
# Reference solves go to a fresh cache folder, so the printed times include them (EPD_SOLVER_CACHE=... to reuse one).
# Learned rows load the committed parameter files (PARAMS_DIR); rows without a file are distilled on the fly.
set -euo pipefail
cd "$(dirname "$0")/.."
EPD=${EPD:-.venv/bin/epd}
THREADS=${THREADS:-1}  # 1 thread: small batches, and 2 threads are 5x slower when other jobs share the cores
PARAMS_DIR=${PARAMS_DIR:-}
export EPD_SOLVER_CACHE=${EPD_SOLVER_CACHE:-$(mktemp -d)}
R=benchmarks/results
params=()
if [ -n "$PARAMS_DIR" ]; then params=(--params-dir "$PARAMS_DIR"); fi

run() {  # run NAME ARGS...: fresh output folder, wall-clock time printed
  local name=$1; shift
  rm -rf "$R/$name"
  local start=$(date +%s)
  "$EPD" bench --threads "$THREADS" --out "$R/$name" --quiet "$@" > /dev/null
  echo "$name: $(( $(date +%s) - start )) s"
}

total=$(date +%s)
run bench_gmm-digits --model gmm:digits --nfe 3,5,7,9 --solvers all --samples 1000 "${params[@]}"
run bench_digits --model digits --nfe 3,5,7,9 --solvers all --samples 512 "${params[@]}"
echo "full default bench (both models): $(( $(date +%s) - total )) s"
# The paper's DPM-Solver++/UniPC rows threshold D dynamically; the same rows without it, on the exact problem.
run bench_gmm-digits_no-thresholding --model gmm:digits --nfe 3,5,7,9 --solvers dpmpp_2m,dpmpp_3m,unipc \
  --samples 1000 --set dpmpp_2m.thresholding=false --set dpmpp_3m.thresholding=false --set unipc.thresholding=false
# ParaDiGMS as truncated Picard iteration on a fixed 20-step grid (the solvers' paper_setting), for comparison.
run bench_gmm-digits_paradigms-20 --model gmm:digits --nfe 3,5,7,9 --solvers paradigms --samples 1000 \
  --set paradigms.base_steps=20
run bench_latency_cpu --latency --model digits --nfe 5 --batch-sizes 1,16,64 --ks 1,2,3 --warmup 1 --repeats 5
