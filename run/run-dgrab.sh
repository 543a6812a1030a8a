#!/usr/bin/env bash
# The D-GraB seed's README commands through DeepSpeed (16 local processes, gloo on CPU):
#   task=glue bash run/run-dgrab.sh          # logistic regression on GLUE QQP embeddings (task=glue-qnli for QNLI)
#   task=lenet bash run/run-dgrab.sh         # LeNet on CIFAR-10
#   task=lstm bash run/run-dgrab.sh          # LSTM on WikiText-2
# order=rr runs the D-RR baseline; nworkers=N changes the process count (global batch = 2 N); extra
# arguments go to the trainer (--set key=value ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
task="${task:-glue}"; order="${order:-dgrab}"; nworkers="${nworkers:-16}"
sets=(--set "train.global_batch_size=$((2 * nworkers))" --set "method.order={name: $order}")
case "$task" in
  glue) recipe=recipes/dgrab-glue-qqp-logreg.yaml ;;
  glue-qnli) recipe=recipes/dgrab-glue-qqp-logreg.yaml; sets+=(--set "data.task=qnli" --set "name=dgrab-glue-qnli-logreg") ;;
  lenet) recipe=recipes/dgrab-cifar10-lenet.yaml ;;
  lstm) recipe=recipes/dgrab-wikitext2-lstm.yaml ;;
  *) echo "task=$task: choose glue, glue-qnli, lenet or lstm" >&2; exit 2 ;;
esac
exec "$(dirname "$PY")/deepspeed" --num_gpus "$nworkers" --master_port "$(ds_ext_free_port)" \
  --module ds_ext.train --recipe "$recipe" "${sets[@]}" "$@"
