#!/usr/bin/env bash
# Sparse selection benchmark (not a test): selection time of a 25.6M-element fp32 gradient at density
# 0.001 for torch.topk, the topk reducer, exdyna and a plain copy (ratios to the copy; CPU, and CUDA
# when available), plus exdyna's achieved density vs iteration for both threshold rules (CSV, and a
# PNG when matplotlib is importable) under runs/bench-sparse/.
#   bash run/bench-sparse.sh                      # defaults
#   bash run/bench-sparse.sh --reps 15 --devices cuda --out runs/bench-sparse-h100
# The CPU rows use OMP_NUM_THREADS threads (run/env.sh sets 1 unless already set).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
# the density plot needs matplotlib (the `bench` extra); install it on first use
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
  "$PY" -m pip install -q -e "$ROOT[bench]" >/dev/null 2>&1 || echo "[bench-sparse] could not install matplotlib: CSV only" >&2
fi
exec "$PY" -m benchmarks.sparse "$@"
