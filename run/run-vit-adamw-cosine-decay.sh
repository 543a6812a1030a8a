#!/usr/bin/env bash
# The QSR seed's example-run script, through DeepSpeed: recipes/qsr-vit-b-adamw.yaml on the nodes of a hostfile.
#   hostfile=hostfile bash run/run-vit-adamw-cosine-decay.sh [--set key=value ...]
# The run resumes from its newest checkpoint when restarted (checkpoint.resume: auto), as the seed's
# *-resume.sh scripts do; e.g. switch the period later with --set 'method.sync.alpha=0.0175'.
# ImageNet .beton files come from data_root in .config_<hostname>.yml (see ds_ext/data/ffcv_imagenet.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
hostfile="${hostfile:-hostfile}"
ds_ext_launch 0 --module ds_ext.train --recipe recipes/qsr-vit-b-adamw.yaml "$@"
