#!/usr/bin/env bash
# The end-to-end headline: real training steps (forward, backward, optimizer) of every method on an emulated
# cluster, beside PyTorch DDP's own hooks on the same links, alternated in one sequence (root only for the cluster;
# not a test), then the table, the cost model's overlap check and its GPU projection.
#
#   sudo bash run/bench-train.sh [--bandwidth 500mbit] [--hosts 2] [--slots 1] [--model resnet50]
#        [--image-size 128] [--batch 4] [--rounds 3] [--steps 3] [--warmup 2] [--methods allreduce,powersgd,...]
#        [--unshaped] [--out runs/bench-train] [--id 19] [--report-only]
#   bash run/bench-train.sh --local [...]     # no cluster, no root: 2 local ranks, no shaping
#   DS_EXT_BENCH_PY=/path/to/python bash run/bench-train.sh ...   # that interpreter instead of run/setup.sh's venv
#
# 1. run/cluster.sh up HOSTS BW --slots SLOTS (network namespaces with their own sshd, links shaped by tc);
# 2. one deepspeed --hostfile ... --module benchmarks.train run (through pdsh/ssh, OUT/train.json): ds_ext's
#    methods, DeepSpeed's own reduction and PyTorch DDP's hooks on the same gloo group, in ROUNDS rounds that each
#    run every method (and a compute-alone entry) once in a rotated order, reversed every other round
#    (docs/dev/notes/bench-train.md). Every rank is pinned to one core (core = global rank mod cores). The launch
#    has its own torch extensions directory (OUT/.torch_extensions/LABEL, handed to the hosts through its own
#    DS_ENV_FILE): a lock left in a shared one by a killed build cannot hang it;
# 3. --unshaped: the same launch again with the links unshaped (run/cluster.sh shape unlimited), in OUT/unshaped/,
#    for the with/without-shaping comparison of step times;
# 4. python -m benchmarks.train report OUT (OUT/table.md, OUT/results.json; the cost model's check of its
#    overlap term against the measurement) and python -m benchmarks.costmodel_fit --overlap-from OUT (8-64 GPUs at
#    10, 25, 100 Gbit/s with every assumption printed: OUT/projection.txt), and python -m benchmarks.train_chart
#    OUT (samples/s per method, median and min-max over the rounds: OUT/chart.png).
# The cluster is removed on exit, also after a failure. --report-only redoes step 4 from OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BW="500mbit"; HOSTS=2; SLOTS=1; MODEL="resnet50"; IMG=128; BATCH=4; ROUNDS=3; STEPS=3; WARMUP=2; METHODS=""
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
    --rounds) ROUNDS="$2"; shift 2 ;;
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
PY="${DS_EXT_BENCH_PY:-}"   # an interpreter given (a checkout whose venv is elsewhere), else run/setup.sh's venv
[ -n "$PY" ] || PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
mkdir -p "$OUT"
T0=$SECONDS
say() { echo "[bench-train $((SECONDS - T0))s] $*" >&2; }

report() {
  "$PY" -m benchmarks.train report "$OUT"
  "$PY" -m benchmarks.costmodel_fit --overlap-from "$OUT" --gpus 8,16,32,64 --bandwidth 10,25,100 --png '' \
    > "$OUT/projection.txt" || say "the cost model's projection failed (table without it)"
  say "projection (8-64 GPUs at 10/25/100 Gbit/s, launch term, readiness from this run): $OUT/projection.txt"
  "$PY" -m benchmarks.train_chart "$OUT" --out "$OUT/chart.png" || say "no chart (matplotlib missing?): the table is complete"
}
if [ "$REPORT_ONLY" = 1 ]; then report; exit 0; fi

SEED_TX="${TORCH_EXTENSIONS_DIR:-}"   # built ops are copied from here (never written to): see seed_tx
seed_tx() {  # seed_tx FROM TO: copy every finished build (a .so, no lock: no build running or killed) of FROM
  local d
  [ -n "$1" ] && [ -d "$1" ] || return 0
  for d in "$1"/*/; do
    [ -d "$d" ] && [ ! -e "$d/lock" ] && compgen -G "$d*.so" > /dev/null || continue
    cp -a "$d" "$2/" 2>/dev/null || true
  done
}

launch() {  # launch OUTFILE LABEL : one deepspeed launch of the worker, every rank, every method
  local out="$1" label="$2"
  local extra=() where=()
  [ -n "$METHODS" ] && extra+=(--methods "$METHODS")
  # this launch's own torch extensions directory (DeepSpeed JIT-builds its shm op at start-up): nothing else
  # builds there, so no lock left by another process can hang it; finished builds are copied in first (the
  # previous launch's, else the environment's), so that torch finds the op built and does not rebuild it
  local tx
  tx="$(cd "$(dirname "$out")" && pwd)/.torch_extensions/$label-$$"
  mkdir -p "$tx"
  seed_tx "$SEED_TX" "$tx"
  if [ "$LOCAL" = 1 ]; then
    where=(--num_gpus 2)
    export TORCH_EXTENSIONS_DIR="$tx"
  else
    where=(--hostfile "$ROOT/run/.cluster/$ID/hostfile" --master_addr "10.213.$ID.11")
    local envf="${out%.json}.deepspeed_env"
    { grep -v '^TORCH_EXTENSIONS_DIR=' "$ROOT/run/.cluster/$ID/deepspeed_env" || true; echo "TORCH_EXTENSIONS_DIR=$tx"; } \
      > "$envf"
    export DS_ENV_FILE="$envf"
  fi
  say "$label: starting ($ROUNDS rounds; torch extensions in $tx)"
  "$(dirname "$PY")/deepspeed" "${where[@]}" --master_port "$(PY=$PY ds_ext_free_port)" \
    --module benchmarks.train run --model "$MODEL" --image-size "$IMG" --batch "$BATCH" --rounds "$ROUNDS" \
    --steps "$STEPS" --warmup "$WARMUP" --bandwidth "$label" --out "$out" "${extra[@]}" > "${out%.json}.log" 2>&1 &
  local pid=$!
  tail -n +1 -F "${out%.json}.log" 2>/dev/null --pid "$pid" \
    | grep --line-buffered -E "^(10\.213\.[0-9]+\.1[0-9]: )?(# bench-train|  [a-z_0-9]+(:| +rank 0))|Traceback|Error" \
    | sed -u -e 's/^10\.213\.[0-9]*\.1[0-9]: //' >&2 || true
  wait "$pid" || { say "the launch '$label' failed (log: ${out%.json}.log)"; return 1; }
  [ -f "$out" ] || { say "the launch '$label' wrote no result (log: ${out%.json}.log)"; return 1; }
  SEED_TX="$tx"
}

one() {  # one DIR LABEL: the launch of every method into DIR/train.json (older result files there are removed)
  local dir="$1" label="$2"
  mkdir -p "$dir"
  rm -f "$dir/train.json" "$dir/ds.json" "$dir/ddp.json"
  launch "$dir/train.json" "$label"
}

STARTED="$(date '+%Y-%m-%d %H:%M:%S')"
if [ "$LOCAL" = 1 ]; then
  BW="local"
  one "$OUT" local
else
  CL=(bash "$ROOT/run/cluster.sh")
  trap '"${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true' EXIT
  "${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true
  "${CL[@]}" up "$HOSTS" "$BW" --slots "$SLOTS" --id "$ID"
  one "$OUT" "$BW"
  if [ "$UNSHAPED" = 1 ]; then
    "${CL[@]}" shape unlimited --id "$ID"
    one "$OUT/unshaped" unlimited
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
