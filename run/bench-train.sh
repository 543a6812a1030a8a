#!/usr/bin/env bash
# The end-to-end headline: real training steps (forward, backward, optimizer) of every method on an emulated
# cluster, beside PyTorch DDP's own hooks on the same links (root only for the cluster; not a test), then the
# table and the cost model's overlap check and projection.
#
#   sudo bash run/bench-train.sh [--bandwidth 500mbit] [--hosts 2] [--slots 1] [--model resnet50]
#        [--image-size 128] [--batch 4] [--steps 8] [--warmup 2] [--methods allreduce,powersgd,...]
#        [--unshaped] [--out runs/bench-train] [--id 19] [--report-only]
#   bash run/bench-train.sh --local [...]     # no cluster, no root: 2 local ranks, no shaping
#
# 1. run/cluster.sh up HOSTS BW --slots SLOTS (network namespaces with their own sshd, links shaped by tc);
# 2. deepspeed --hostfile ... --module benchmarks.train run (through pdsh/ssh), twice: ds_ext's methods and
#    DeepSpeed's own reduction (OUT/ds.json), then PyTorch DDP with allreduce_hook and powerSGD_hook, without
#    DeepSpeed (--ddp, OUT/ddp.json). Every rank is pinned to one core (os.sched_setaffinity on all its
#    threads; core = global rank mod cores): 2 hosts x 1 rank on 2 cores gives each rank its own core;
# 3. --unshaped: the same two launches again with the links unshaped (run/cluster.sh shape unlimited), in
#    OUT/unshaped/, for the with/without-shaping comparison of step times;
# 4. python -m benchmarks.train report OUT (OUT/table.md, OUT/results.json; the cost model's check of its
#    overlap term against the measurement) and python -m benchmarks.costmodel_fit --overlap-from OUT (16-64 GPUs,
#    OUT/projection.txt).
# The cluster is removed on exit, also after a failure. --report-only redoes step 4 from OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BW="500mbit"; HOSTS=2; SLOTS=1; MODEL="resnet50"; IMG=128; BATCH=4; STEPS=8; WARMUP=2; METHODS=""
UNSHAPED=0; OUT="runs/bench-train"; ID=19; LOCAL=0; REPORT_ONLY=0
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --bandwidth) BW="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --slots) SLOTS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --image-size) IMG="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --methods) METHODS="$2"; shift 2 ;;
    --unshaped) UNSHAPED=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --id) ID="$2"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --report-only) REPORT_ONLY=1; shift ;;
    *) echo "run/bench-train.sh: unknown argument '$1' (see the header of run/bench-train.sh)" >&2; exit 2 ;;
  esac
done
if [ "$LOCAL" = 0 ] && [ "$REPORT_ONLY" = 0 ] && [ "$(id -u)" != "0" ]; then
  echo "run/bench-train.sh needs root (it builds network namespaces, tc-shaped links and per-host sshd with" >&2
  echo "run/cluster.sh): run it as root, e.g. sudo bash run/bench-train.sh; or --local (2 local ranks, no shaping)" >&2
  exit 2
fi
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
mkdir -p "$OUT"
T0=$SECONDS
say() { echo "[bench-train $((SECONDS - T0))s] $*" >&2; }

# split --methods into the DeepSpeed launch and the DDP launch
DSM=""; DDPM=""
if [ -n "$METHODS" ]; then
  IFS=, read -r -a ML <<< "$METHODS"
  for m in "${ML[@]}"; do
    case "$m" in
      ddp_*) DDPM="${DDPM:+$DDPM,}$m" ;;
      *) DSM="${DSM:+$DSM,}$m" ;;
    esac
  done
fi

report() {
  "$PY" -m benchmarks.train report "$OUT"
  "$PY" -m benchmarks.costmodel_fit --overlap-from "$OUT" --gpus 16,32,64 --png '' > "$OUT/projection.txt" \
    || say "the cost model's projection failed (table without it)"
  say "projection (16-64 GPUs, overlap from this run): $OUT/projection.txt"
}
if [ "$REPORT_ONLY" = 1 ]; then report; exit 0; fi

launch() {  # launch OUTFILE LABEL [--ddp] : one deepspeed launch of the worker, every rank
  local out="$1" label="$2"; shift 2
  local extra=() where=()
  if [ "${1:-}" = "--ddp" ]; then extra+=(--ddp); [ -n "$DDPM" ] && extra+=(--methods "$DDPM"); shift
  else [ -n "$DSM" ] && extra+=(--methods "$DSM"); fi
  if [ "$LOCAL" = 1 ]; then
    where=(--num_gpus 2)
  else
    where=(--hostfile "$ROOT/run/.cluster/$ID/hostfile" --master_addr "10.213.$ID.11")
    export DS_ENV_FILE="$ROOT/run/.cluster/$ID/deepspeed_env"
  fi
  say "$label: starting"
  "$(dirname "$PY")/deepspeed" "${where[@]}" --master_port "$(PY=$PY ds_ext_free_port)" \
    --module benchmarks.train run --model "$MODEL" --image-size "$IMG" --batch "$BATCH" --steps "$STEPS" \
    --warmup "$WARMUP" --bandwidth "$label" --out "$out" "${extra[@]}" > "${out%.json}.log" 2>&1 &
  local pid=$!
  tail -n +1 -F "${out%.json}.log" 2>/dev/null --pid "$pid" \
    | grep --line-buffered -E "^(10\.213\.[0-9]+\.1[0-9]: )?(# bench-train|  [a-z_]+(:| +rank 0))|Traceback|Error" \
    | sed -u -e 's/^10\.213\.[0-9]*\.1[0-9]: //' >&2 || true
  wait "$pid" || { say "the launch '$label' failed (log: ${out%.json}.log)"; return 1; }
  [ -f "$out" ] || { say "the launch '$label' wrote no result (log: ${out%.json}.log)"; return 1; }
}

both() {  # both DIR LABEL: the DeepSpeed launch and the DDP launch
  local dir="$1" label="$2"
  mkdir -p "$dir"
  rm -f "$dir/ds.json" "$dir/ddp.json"
  if [ -z "$METHODS" ] || [ -n "$DSM" ]; then launch "$dir/ds.json" "$label"; fi
  if [ -z "$METHODS" ] || [ -n "$DDPM" ]; then launch "$dir/ddp.json" "$label" --ddp; fi
}

STARTED="$(date '+%Y-%m-%d %H:%M:%S')"
if [ "$LOCAL" = 1 ]; then
  BW="local"
  both "$OUT" local
else
  CL=(bash "$ROOT/run/cluster.sh")
  trap '"${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true' EXIT
  "${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true
  "${CL[@]}" up "$HOSTS" "$BW" --slots "$SLOTS" --id "$ID"
  both "$OUT" "$BW"
  if [ "$UNSHAPED" = 1 ]; then
    "${CL[@]}" shape unlimited --id "$ID"
    both "$OUT/unshaped" unlimited
  fi
  "${CL[@]}" down --id "$ID"
fi
WALL=$((SECONDS - T0))
"$PY" - "$OUT" "$BW" "$HOSTS" "$SLOTS" "$STARTED" "$WALL" "bash run/bench-train.sh $ARGS" <<'EOF'
import json, sys, time
from pathlib import Path
out, bw, hosts, slots, started, wall, cmd = sys.argv[1:8]
Path(out, "meta.json").write_text(json.dumps({
    "hosts": int(hosts), "slots": int(slots), "bandwidth": bw, "started": started,
    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": float(wall), "command": cmd.strip()}, indent=1))
EOF
say "measurements done in ${WALL} s"
report
if [ "$UNSHAPED" = 1 ]; then
  "$PY" -m benchmarks.train report "$OUT/unshaped" --no-check > /dev/null
  "$PY" -m benchmarks.train compare "$OUT" "$OUT/unshaped" | tee "$OUT/shaping.md"
fi
say "done (results in $OUT)"
