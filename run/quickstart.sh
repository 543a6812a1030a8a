#!/usr/bin/env bash
# Install (if needed), then train the embedded default (scikit-learn digits, small CNN) on 2 local
# processes through the `deepspeed` launcher, and print final accuracy and bytes communicated.
#   bash run/quickstart.sh [--set key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
NPROC="${DS_EXT_NPROC:-2}"
exec "$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" --master_port "$(ds_ext_free_port)" \
  --module ds_ext.train --recipe recipes/quickstart.yaml "$@"
