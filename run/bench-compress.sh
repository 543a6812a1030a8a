#!/usr/bin/env bash
# Compression + decompression cost per step of allreduce / powersgd / acpsgd and of PyTorch's
# powerSGD_hook / batched_powerSGD_hook on ResNet-50 gradients, as ratios to a plain copy and to S-SGD;
# on CPU, and on the GPU too when one is visible.
#   bash run/bench-compress.sh [--model resnet50] [--rank 4] [--steps 5] [--dtype bf16] [--step-ms 30]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
"$PY" -m benchmarks.compress --device cpu "$@"
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PY" -m benchmarks.compress --device cuda "$@"
else
  echo "# no CUDA device visible: GPU rows not measured"
fi
