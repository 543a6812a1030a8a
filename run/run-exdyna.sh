#!/usr/bin/env bash
# The ExDyna seed's run.sh: one training run, the experiment picked by variables.
#   dataset=cifar10 dnn=resnet18 reducer=exdyna density=0.001 nworkers=8 bash run/run-exdyna.sh [--set k=v ...]
# dataset: cifar10 | cifar100 | wikitext2 | ml20m; dnn (CIFAR): resnet18 | resnet152 | vgg19;
# reducer: exdyna | topk | allreduce (S-SGD baseline); hostfile=<path> for several nodes (`host slots=N`).
# Per-worker batch and learning-rate scaling follow the seed: CNN lr 0.1 x (32/128) x n, LSTM 2.5 x (32/64) x n,
# NCF a fixed global batch of 2^20. Data paths come from data_root in .config_<hostname>.yml (or --set data.root=DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
dataset="${dataset:-cifar10}"; reducer="${reducer:-exdyna}"; density="${density:-0.001}"; nworkers="${nworkers:-8}"
sets=()
case "$dataset" in
  cifar10|cifar100)
    dnn="${dnn:-$([ "$dataset" = cifar10 ] && echo resnet18 || echo vgg19)}"
    classes=$([ "$dataset" = cifar10 ] && echo 10 || echo 100)
    recipe="recipes/exdyna-$dataset-$([ "$dataset" = cifar10 ] && echo resnet18 || echo vgg19).yaml"
    case "$dnn" in
      resnet18|resnet152) sets+=(--set "model={name: $dnn, small_input: true, num_classes: $classes}") ;;
      vgg19) sets+=(--set "model={name: vgg_cifar, num_classes: $classes}") ;;
      *) echo "dnn=$dnn: choose resnet18, resnet152 or vgg19 for $dataset" >&2; exit 2 ;;
    esac
    sets+=(--set "train.global_batch_size=$((32 * nworkers))" --set "optimizer.lr=$("$PY" -c "print(0.1 * 32 / 128 * $nworkers)")")
    ;;
  wikitext2)
    recipe=recipes/exdyna-wikitext2-lstm.yaml
    sets+=(--set "train.global_batch_size=$((32 * nworkers))" --set "optimizer.lr=$("$PY" -c "print(2.5 * 32 / 64 * $nworkers)")")
    ;;
  ml20m)
    recipe=recipes/exdyna-ml20m-ncf.yaml
    sets+=(--set "train.micro_batch_size=$((1048576 / nworkers))")
    ;;
  *) echo "dataset=$dataset: choose cifar10, cifar100, wikitext2 or ml20m" >&2; exit 2 ;;
esac
case "$reducer" in
  exdyna|topk) sets+=(--set "method.reducer={name: $reducer, density: $density}") ;;
  allreduce) sets+=(--set "method.reducer={name: allreduce}") ;;
  *) echo "reducer=$reducer: choose exdyna, topk or allreduce" >&2; exit 2 ;;
esac
ds_ext_launch "$nworkers" --module ds_ext.train --recipe "$recipe" "${sets[@]}" "$@"
