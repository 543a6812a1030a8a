#!/usr/bin/env bash
# Flat vs hierarchical (node-aware) communication with the real trainer on an emulated cluster of 2 hosts
# x 2 ranks (root only; not a test), then the tables and the cost model's flat-vs-hierarchical projection.
#
#   sudo bash run/bench-hier.sh [--bandwidth 1gbit] [--parts a,b,c] [--seeds 0,1,2,3,4] [--a-epochs 2]
#        [--out runs/bench-hier] [--id 43] [--report-only]
#
# 1. run/cluster.sh up 2 BW --slots 2 (2 network namespaces with their own sshd, links shaped by tc);
# 2. python -m benchmarks.hier plan: the trainer runs (recipes/quickstart.yaml + --set overrides):
#    (a) allreduce, powersgd, acpsgd, topk, exdyna and local QSR, flat and hierarchical, on a widened
#        digits CNN (model.width=64 model.hidden=2048, 2 epochs, seed 0);
#    (b) the digits quickstart over 5 seeds, flat and hierarchical, for powersgd rank 1 and topk 1 %,
#        and flat allreduce (S-SGD) as the reference;
#    (c) acpsgd flat and hierarchical at ZeRO stage 0 and 1 (part (a)'s model; the stage-0 runs are part
#        (a)'s when both parts run; hierarchical ZeRO 1 partitions the optimizer state within the host,
#        ds_ext.deepspeed.zero.node_mpu, so ZeRO's all-gather stays off the network); part c alone: --parts c;
# 3. deepspeed --hostfile ... --module benchmarks.hier worker, once for parts a+c and once for part b:
#    every run of the plan in the same 4 processes, one progress line per run; raw JSON per run and rank in
#    OUT/raw/<run>/rank<R>.json, trainer logs in OUT/logs/<run>/;
# 4. python -m benchmarks.hier report: OUT/tables.md and OUT/results.json; the cost model's
#    projection (python -m ds_ext.costmodel --hierarchical) in OUT/projection.txt, appended to tables.md.
# The cluster is removed on exit, also after a failure. --report-only redoes step 4 from OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BW="1gbit"; PARTS="a,b,c"; SEEDS="0,1,2,3,4"; AEPOCHS=2; OUT="runs/bench-hier"; ID=43; REPORT_ONLY=0
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --bandwidth) BW="$2"; shift 2 ;;
    --parts) PARTS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --a-epochs) AEPOCHS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --id) ID="$2"; shift 2 ;;
    --report-only) REPORT_ONLY=1; shift ;;
    *) echo "run/bench-hier.sh: unknown argument '$1' (see the header of run/bench-hier.sh)" >&2; exit 2 ;;
  esac
done
if [ "$REPORT_ONLY" = 0 ] && [ "$(id -u)" != "0" ]; then
  echo "run/bench-hier.sh needs root (it builds network namespaces, tc-shaped links and per-host sshd" >&2
  echo "with run/cluster.sh): run it as root, e.g. sudo bash run/bench-hier.sh" >&2
  exit 2
fi
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
mkdir -p "$OUT"
T0=$SECONDS
say() { echo "[bench-hier $((SECONDS - T0))s] $*" >&2; }

report() {
  "$PY" -m ds_ext.costmodel --hierarchical --png '' > "$OUT/projection.txt" \
    || say "the cost model's projection failed (tables without it)"
  "$PY" -m benchmarks.hier report "$OUT" --meta "$OUT/meta.json" --projection "$OUT/projection.txt"
}

if [ "$REPORT_ONLY" = 1 ]; then
  report
  exit 0
fi

rc=0
IFS=, read -r -a PL <<< "$PARTS"
ac=""; b=0
for p in "${PL[@]}"; do
  case "$p" in
    a|c) ac="${ac:+$ac,}$p" ;;
    b) b=1 ;;
    *) echo "run/bench-hier.sh: --parts: unknown part '$p' (a, b, c)" >&2; exit 2 ;;
  esac
done
CL=(bash "$ROOT/run/cluster.sh")
trap '"${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true' EXIT
STARTED="$(date '+%Y-%m-%d %H:%M:%S')"
rm -rf "$OUT/raw" "$OUT/logs"
"$PY" -m benchmarks.hier plan --out "$OUT/plan.json" --parts "$PARTS" --seeds "$SEEDS" --a-epochs "$AEPOCHS" >&2
"${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true
"${CL[@]}" up 2 "$BW" --slots 2 --id "$ID"

launch() {  # launch PARTS: every run of those parts in one deepspeed launch through pdsh/ssh
  say "parts $1: starting the 4 ranks"
  DS_ENV_FILE="$ROOT/run/.cluster/$ID/deepspeed_env" "$(dirname "$PY")/deepspeed" \
    --hostfile "$ROOT/run/.cluster/$ID/hostfile" --master_addr "10.213.$ID.11" \
    --master_port "$(PY=$PY ds_ext_free_port)" \
    --module benchmarks.hier worker --plan "$OUT/plan.json" --out "$OUT" --parts "$1" \
    > "$OUT/launch-${1//,/}.log" 2>&1 &
  local pid=$!
  # one progress line per run, as rank 0 prints it
  tail -n +1 -F "$OUT/launch-${1//,/}.log" 2>/dev/null --pid "$pid" \
    | grep --line-buffered -E "\[bench-hier\] run |Traceback|Error" | sed -u -e 's/^10\.213\.[0-9]*\.1[0-9]: //' >&2 || true
  wait "$pid" || { say "the launch for parts $1 failed (log: $OUT/launch-${1//,/}.log)"; return 1; }
}

if [ -n "$ac" ]; then launch "$ac" || rc=1; fi
if [ "$b" = 1 ]; then launch b || rc=1; fi
"${CL[@]}" down --id "$ID"
WALL=$((SECONDS - T0))
"$PY" - "$OUT" "$BW" "$STARTED" "$WALL" "bash run/bench-hier.sh $ARGS" <<'EOF'
import json, sys, time
from pathlib import Path
out, bw, started, wall, cmd = sys.argv[1:6]
plan = json.loads(Path(out, "plan.json").read_text())
Path(out, "meta.json").write_text(json.dumps({
    "hosts": 2, "slots": 2, "bandwidth": bw, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    "wall_s": float(wall), "command": cmd.strip(), "plan": {k: v for k, v in plan.items() if k != "runs"}}, indent=1))
EOF
say "measurements done in ${WALL} s"
report
say "done (results in $OUT)"
exit $rc
