#!/usr/bin/env bash
# Every method x seeds on real text (the Python stdlib's sources, byte-level LM; recipes/pytext-gpt.yaml) for a
# fixed budget, then final loss with paired statistics against S-SGD (D-RR for the orders), bytes per rank, step
# time, time-to-loss on modelled links and one plot (python -m benchmarks.convergence; not a test). Resumable:
# cells whose summary.json exists are reused.
#   bash run/bench-convergence.sh                                   # the full grid, seeds 0..2, 2 ranks
#   bash run/bench-convergence.sh --methods S-SGD,topk-0.01 --seeds 0 --epochs 2 --steps-per-epoch 3 --out runs/conv-smoke
# Defaults (each overridable): --recipe recipes/pytext-gpt.yaml --seeds 0..2 --world-size 2 --out runs/convergence
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
args=("$@")
has() { local a; for a in "${args[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
has --out || args+=(--out runs/convergence)
exec "$PY" -m benchmarks.convergence "${args[@]}"
