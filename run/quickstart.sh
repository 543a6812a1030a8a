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
args=("$@")
# Run again in this checkout, the quickstart gets its own run directory (runs/quickstart-2, -3, ...): the trainer
# refuses a fresh run over a finished run's records, and a second demo run should not stop at that. A --set
# log.dir=... or log.overwrite=... of your own is left alone.
if [ -s runs/quickstart/summary.json ] && ! printf '%s\n' "$@" | grep -q '^log\.\(dir\|overwrite\)='; then
  dir="$("$PY" -c 'import sys; from ds_ext.trainer.recipe.preflight import free_run_dir; print(free_run_dir(sys.argv[1]))' runs/quickstart)"
  echo "[quickstart] runs/quickstart holds an earlier quickstart run (kept); this one writes to $dir"
  args+=(--set "log.dir=$dir")
fi
exec "$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" --master_port "$(ds_ext_free_port)" \
  --module ds_ext.train --recipe recipes/quickstart.yaml "${args[@]}"
