#!/usr/bin/env bash
# Kernel benchmark (not a test): every ds_ext compiled op vs its torch fallback vs a plain copy of the
# same bytes, CPU and (when available) CUDA, plus the from-scratch JIT build time of the CPU op.
#   bash run/bench-ops.sh                          # 25.6M fp32, density 0.001, build time included
#   bash run/bench-ops.sh --numel 1000000 --reps 3 --devices cpu
#   bash run/bench-ops.sh --devices cuda           # the CUDA kernels only (a GPU machine)
# The CPU rows use OMP_NUM_THREADS threads (run/env.sh sets 1 unless already set).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
exec "$PY" -m benchmarks.ops --build-time "$@"
