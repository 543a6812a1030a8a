#!/usr/bin/env bash
# Data orders x seeds on a recipe, then the paired comparison against the first order (not a test): wins, mean
# ratio with a 95% confidence interval, paired t-test and sign-test p-values for the final all-rank training loss,
# validation accuracy and loss, and a plot of the mean all-rank training loss per epoch (python -m benchmarks.orders).
#   bash run/bench-orders.sh                              # digits quickstart, rr vs dgrab, seeds 0..2, 4 ranks,
#                                                         # one example per microbatch (the D-GraB paper's setting)
#   bash run/bench-orders.sh --set optimizer.lr=0.02      # the same with extra overrides (appended to the defaults)
#   bash run/bench-orders.sh --recipe recipes/X.yaml --orders rr,dgrab --seeds 0..9 --world-size 4 --out runs/orders-X
# With --recipe, nothing is defaulted but --out (runs/orders-<recipe stem>) and --seeds (0..2 in the module).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
args=("$@")
has() { local a; for a in "${args[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
if ! has --recipe; then
  args=(--recipe recipes/quickstart.yaml --orders rr,dgrab --world-size 4 --set train.micro_batch_size=1 "${args[@]}")
  has --out || args+=(--out runs/orders-digits)
elif ! has --out; then
  stem="$(basename "$(for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = --recipe ] && echo "${args[$((i + 1))]}"; done)" .yaml)"
  args+=(--out "runs/orders-$stem")
fi
exec "$PY" -m benchmarks.orders "${args[@]}"
