#!/usr/bin/env bash
# The DS-Sync seed's start scripts: one training run, DS-Sync or its BSP baseline.
#   dataset=cifar10 sync=dssync nworkers=4 bash run/run-dssync.sh [--set k=v ...]
# dataset: cifar10 | cifar100 (WRN-26-10) | imagenet (WRN-50-2, FFCV .beton files) | criteo (DeepFM); sync: dssync | bsp (gradient allreduce every step);
# groups=G (default 2) and grouping=patterns|shuffle for dssync; hostfile=<path> for several nodes.
# Data paths come from data_root in .config_<hostname>.yml (or --set data.root=DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
dataset="${dataset:-cifar10}"; sync="${sync:-dssync}"; nworkers="${nworkers:-4}"
case "$dataset" in
  cifar10|cifar100) recipe="recipes/dssync-$dataset-wrn26.yaml"; per=32 ;;
  imagenet) recipe=recipes/dssync-imagenet-wrn50.yaml; per=25 ;;
  criteo) recipe=recipes/dssync-criteo-deepfm.yaml; per=20480 ;;
  *) echo "dataset=$dataset: choose cifar10, cifar100, imagenet or criteo" >&2; exit 2 ;;
esac
sets=(--set "train.global_batch_size=$((per * nworkers))")
case "$sync" in
  dssync) sets+=(--set "method.sync={name: dssync, groups: ${groups:-2}, grouping: ${grouping:-patterns}, h: 1}") ;;
  bsp) sets+=(--set "method.reducer={name: allreduce}" --set "method.sync={name: none}") ;;
  *) echo "sync=$sync: choose dssync or bsp" >&2; exit 2 ;;
esac
ds_ext_launch "$nworkers" --module ds_ext.train --recipe "$recipe" "${sets[@]}" "$@"
