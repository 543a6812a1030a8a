#!/usr/bin/env bash
# Data-order benchmark (not a test): (1) the sorter's overhead per optimizer step as a ratio to the same
# step without it (digits CNN on CPU, full gradient and projected), (2) FFCV loader throughput against a
# torch DataLoader over the same JPEG folder (images/s and the ratio).
#   bash run/bench-order.sh                              # both halves with their defaults
#   bash run/bench-order.sh --src /data/imagenet         # the loader half on your own ImageNet-style folder
# Extra arguments go to the loader half (python -m benchmarks.loader --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
echo "== sorter overhead per optimizer step"
"$PY" -m benchmarks.order
echo "== sorter overhead, gradient projected to 1024 dims"
"$PY" -m benchmarks.order --project-dim 1024
echo "== loader throughput"
if "$PY" -c 'import ffcv' 2>/dev/null; then
  "$PY" -m benchmarks.loader "$@"
else
  echo "ffcv is not installed (bash run/setup.sh installs it as root): loader half skipped"
fi
