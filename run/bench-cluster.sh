#!/usr/bin/env bash
# Every method side by side on an emulated multi-host cluster (root only; not a test), then the cost
# model fitted on it and projected to 8..64 GPUs at 1/10/100 Gbit/s.
#
#   sudo bash run/bench-cluster.sh [--hosts 4] [--bandwidths 1gbit,10gbit] [--calibrate 3,2]
#        [--steps 8] [--warmup 1] [--methods allreduce,powersgd,...] [--compute-ms 30.5]
#        [--compress-file GPU_BENCH_COMPRESS_OUTPUT] [--out runs/bench-cluster] [--id 7]
#
# 1. run/cluster.sh up HOSTS BW: HOSTS network namespaces with their own sshd, links shaped by tc;
# 2. for each bandwidth: `deepspeed --hostfile ... --module benchmarks.cluster run` through
#    pdsh/ssh, one rank per host, every method on ResNet-50-shaped gradients (real reducers, real gloo
#    collectives); results in OUT/N<hosts>-<bw>.json;
# 3. the calibration sizes (default 3 and 2 hosts) at the first bandwidth, for the model check;
# 4. the tables (ratios to allreduce in the same run), the cost model's fit (on N=HOSTS at the first
#    bandwidth), its error at every N, and the projection (OUT/projection.{png,csv}).
# The cluster is removed on exit, also after a failure. The step time adds a per-step compute time
# (--compute-ms, an input: 30.5 ms = ResNet-50 bf16 batch 64 on an H100); compression times are the
# CPU times measured here unless --compress-file gives run/bench-compress.sh output from a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(id -u)" != "0" ]; then
  echo "run/bench-cluster.sh needs root (it builds network namespaces, tc-shaped links and per-host sshd" >&2
  echo "with run/cluster.sh): run it as root, e.g. sudo bash run/bench-cluster.sh" >&2
  exit 2
fi
HOSTS=4; BWS="1gbit,10gbit"; CAL="3,2"; STEPS=8; WARMUP=1; METHODS=""; COMPUTE=30.5; CFILE=""
OUT="runs/bench-cluster"; ID=7
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --bandwidths) BWS="$2"; shift 2 ;;
    --calibrate) CAL="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --methods) METHODS="$2"; shift 2 ;;
    --compute-ms) COMPUTE="$2"; shift 2 ;;
    --compress-file) CFILE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --id) ID="$2"; shift 2 ;;
    *) echo "run/bench-cluster.sh: unknown argument '$1' (see the header of run/bench-cluster.sh)" >&2; exit 2 ;;
  esac
done
[ -z "$CFILE" ] || [ -f "$CFILE" ] || { echo "run/bench-cluster.sh: --compress-file $CFILE: no such file" >&2; exit 2; }
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
# the projection plot needs matplotlib (the `bench` extra); install it on first use
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
  "$PY" -m pip install -q -e "$ROOT[bench]" >/dev/null 2>&1 || echo "[bench-cluster] could not install matplotlib: tables only" >&2
fi
CL=(bash "$ROOT/run/cluster.sh")
trap '"${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true' EXIT
mkdir -p "$OUT"
T0=$SECONDS
say() { echo "[bench-cluster $((SECONDS - T0))s] $*" >&2; }

measure() {  # measure N BW
  local n="$1" bw="$2" extra=()
  [ -n "$METHODS" ] && extra+=(--methods "$METHODS")
  say "N=$n hosts at $bw"
  DS_ENV_FILE="$ROOT/run/.cluster/$ID/deepspeed_env" "$(dirname "$PY")/deepspeed" \
    --hostfile "$ROOT/run/.cluster/$ID/hostfile" --master_addr "10.213.$ID.11" --master_port "$(PY=$PY ds_ext_free_port)" \
    --module benchmarks.cluster run --bandwidth "$bw" --steps "$STEPS" --warmup "$WARMUP" \
    --compute-ms "$COMPUTE" --out "$OUT/N$n-$bw.json" "${extra[@]}" 2>&1 \
    | grep -v -E "^[0-9.]+: \[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]" \
    | sed -e 's/^10\.213\.[0-9]*\.11: //' || true
  [ -f "$OUT/N$n-$bw.json" ] || { echo "run/bench-cluster.sh: the run N=$n $bw wrote no result (output above)" >&2; exit 1; }
}

IFS=, read -r -a BWL <<< "$BWS"
IFS=, read -r -a CALL <<< "$CAL"
rm -f "$OUT"/N*-*.json
"${CL[@]}" down --id "$ID" >/dev/null 2>&1 || true
"${CL[@]}" up "$HOSTS" "${BWL[0]}" --id "$ID"
for bw in "${BWL[@]}"; do
  "${CL[@]}" shape "$bw" --id "$ID"
  measure "$HOSTS" "$bw"
done
"${CL[@]}" down --id "$ID"
for n in "${CALL[@]}"; do
  [ -n "$n" ] || continue
  "${CL[@]}" up "$n" "${BWL[0]}" --id "$ID"
  measure "$n" "${BWL[0]}"
  "${CL[@]}" down --id "$ID"
done
say "measurements done"
rep=("$PY" -m benchmarks.cluster report "$OUT" --compute-ms "$COMPUTE")
[ -n "$CFILE" ] && rep+=(--compress-file "$CFILE")
"${rep[@]}"
echo
cm=("$PY" -m benchmarks.costmodel_fit --fit "$OUT" --compute-ms "$COMPUTE" --png "$OUT/projection.png" --csv "$OUT/projection.csv")
[ -n "$CFILE" ] && cm+=(--compress-file "$CFILE")
"${cm[@]}"
say "done (results in $OUT)"
