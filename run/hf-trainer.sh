#!/usr/bin/env bash
# A Hugging Face Trainer with a ds_ext method from the DeepSpeed config's ds_ext block (ds_ext/examples/hf_trainer.py):
#   bash run/hf-trainer.sh [--method JSON|none] [--steps N] [--zero 0|1|2] [--out DIR]
# On DS_EXT_NPROC local processes (default 2), or on every slot of $hostfile when it is set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
ds_ext_launch "${DS_EXT_NPROC:-2}" --module ds_ext.examples.hf_trainer "$@"
