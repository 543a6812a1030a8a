#!/usr/bin/env bash
# Throughput benchmark with synthetic input, the ACP-SGD seed's perf.sh through DeepSpeed:
#   opt=acpsgd rank=4 dnn=resnet50 bs=64 nworkers=32 bash run/perf.sh
# opt: ssgd | deepspeed | powersgd | acpsgd; dnn: resnet50 | resnet152 | bert_base | bert_large (transformers).
# nworkers local processes; for several nodes set hostfile=<path> (`host slots=N` lines; every slot runs a worker).
# Extra arguments go to `python -m benchmarks.perf` (e.g. --precision bf16 --image-size 64 --iters 3).
# On a CPU-only machine use something small: bs=2 nworkers=2 bash run/perf.sh --image-size 64 --warmup 2 --iters 2 --batches 2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
opt="${opt:-acpsgd}"; rank="${rank:-4}"; dnn="${dnn:-resnet50}"; nworkers="${nworkers:-2}"
case "$dnn" in resnet152|bert_base) bs="${bs:-32}" ;; bert_large) bs="${bs:-8}" ;; *) bs="${bs:-64}" ;; esac
ds_ext_launch "$nworkers" --module benchmarks.perf --opt "$opt" --rank "$rank" --dnn "$dnn" --bs "$bs" "$@"
