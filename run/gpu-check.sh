#!/usr/bin/env bash
# The one-shot GPU check: everything about ds_ext that needs an NVIDIA GPU, in ONE command on a BARE Linux
# x86-64 host with one H100 or H200 (python3, g++ and pip access to PyPI; nothing else installed), within 480 s
# by the step budgets printed below. NOT RUN ON A GPU YET: no device has been lent to this project so far;
# `--dry-run` (checked in CI by tests/e2e/test_gpu_check.py) is all that has run.
#
#   bash run/gpu-check.sh            # the check; log and results in ${OUT:-runs/gpu-check}/
#   bash run/gpu-check.sh --dry-run  # no GPU, no install: the plan (steps, budgets, total <= 480 s, each
#                                    # command echoed) and checks of the script's own logic (below)
#
# Steps, each under its own budget (a timeout: past it the step FAILs and the next one runs; a failed step
# never stops the others; DS_EXT_OPS=compiled only in steps 3-4, which test the compiled op, `auto` elsewhere,
# `torch` when step 3 failed, so that no later step retries the build):
#   1. environment: nvidia-smi (driver, GPUs, compute capability), python3, g++, disk. Proves: a GPU is visible.
#   2. install: a venv of its own (${DS_EXT_GPU_VENV:-/tmp/ds_ext-gpu-venv}; python3 -m venv, else virtualenv)
#      with the pins of run/cuda-venv.sh (torch 2.13.0 = PyPI's CUDA 13.0 build, cuda-toolkit[nvcc,cccl]
#      13.0.3.0, ninja, deepspeed 0.19.8) and setup.cfg's install_requires + pytest/hypothesis; ds_ext itself
#      from this checkout (PYTHONPATH); the libcudart.so link; prints torch/CUDA/NCCL/deepspeed/nvcc versions.
#      Proves: the pinned stack installs and torch sees the GPU (torch.cuda.is_available()).
#   3. build: ds_ext.ops.prepare("cuda") with TORCH_CUDA_ARCH_LIST=<this GPU's X.Y> only (plain 9.0: DeepSpeed's
#      op builder cannot parse 9.0a), the CPU op beside it. Proves: the CUDA op compiles and loads here.
#   4. CUDA op tests: tests/unit/test_ops.py -k "cuda and not cpu". Proves: every kernel equals torch on CUDA.
#   5. every method in a real DeepSpeed engine on CUDA, fp32 and bf16 (tests/dist/test_gpu.py
#      test_method_on_cuda; 2-4 ranks share the GPU through gloo on CUDA tensors: NCCL refuses two ranks on one
#      GPU, "Duplicate GPU detected"). Proves: the methods' CUDA arithmetic and placement, ranks bit-identical
#      where they must be (a non-deterministic scatter fails), no torch deterministic-algorithm warning.
#   6. every ds_ext collective through a real NCCL group of ONE rank with DS_EXT_FORCE_COLLECTIVES=1
#      (tests/dist/test_gpu.py test_one_rank_nccl: every reducer, synchronizer and order once, bf16, ZeRO 1/2,
#      the stop vote on). Proves: NCCL accepts every payload's dtype/device, async handles and streams work.
#      Not proved: anything between two GPUs (steps 10-11).
#   7. CUDA syncs per optimizer step of every method over that 1-rank NCCL group (tests/dist/cuda_syncs.py:
#      torch.cuda.set_sync_debug_mode(1), each sync with its file:line): ds_ext's <= 1 per step (2 for topk
#      exchange union), DeepSpeed's own (ZeRO 1/2) reported apart; a negative control must be seen.
#   8. the trainer on the GPU: python -m ds_ext.train, recipes/quickstart.yaml, 1 epoch, under the deepspeed
#      launcher at world size 1 (allreduce; acpsgd with DS_EXT_FORCE_COLLECTIVES=1, so its start-up
#      collectives enter NCCL). Proves: the trainer's CUDA path end to end.
#   9. benchmarks on CUDA at small sizes: benchmarks.compress (ResNet-50 shapes, rank 4), benchmarks.sparse,
#      benchmarks.ops. Proves: they run on CUDA (their numbers are in the log, not judged).
#  With >= 2 GPUs (SKIP otherwise; their budgets are not in the 480 s):
#  10. tests/dist/cuda_syncs.py on 2 NCCL ranks through the deepspeed launcher (every method; device binding
#      cuda:LOCAL_RANK; sync counts per rank).
#  11. the trainer on 2 ranks through the launcher (the start-up path that used to crash, issue 27 N1).
#
# Output: each step's output in ${OUT:-runs/gpu-check}/gpu-check.log, one summary table at the end (step,
# PASS/FAIL/SKIP, seconds, budget), also in summary.tsv; junit XML of the pytest steps; cuda-syncs.json.
# Exit code: the number of failed steps (0: all passed or skipped); 64: bad arguments or, without
# --dry-run, no NVIDIA GPU visible (nothing run).
#
# Environment: DS_EXT_GPU_VENV (venv path, reused when present), DS_EXT_PYTHON (the interpreter that makes
# the venv, and that --dry-run checks with; python3), OUT, TORCH_CUDA_ARCH_LIST (plain X.Y values only;
# default: the GPU's), MAX_JOBS (nproc), TORCH_EXTENSIONS_DIR (${DS_EXT_GPU_VENV}/torch_extensions).
# --fetch-wheels is gone: the CUDA wheels are several GB (no carried wheel directory can hold them) and the
# host installs from PyPI; pip's own PIP_FIND_LINKS/PIP_NO_INDEX serve an offline wheelhouse together with
# DS_EXT_PIP_ISOLATED=0 (run/cuda-venv.sh).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=run/cuda-venv.sh
source "$ROOT/run/cuda-venv.sh"
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $a (see --help)" >&2; exit 64 ;;
  esac
done

BUDGET_TOTAL=480
BASE_PY="${DS_EXT_PYTHON:-python3}"
VENV="${DS_EXT_GPU_VENV:-/tmp/ds_ext-gpu-venv}"
VPY="$VENV/bin/python"
LOGDIR="${OUT:-$ROOT/runs/gpu-check}"
LOG="$LOGDIR/gpu-check.log"
NGPU=0
ARCH="${TORCH_CUDA_ARCH_LIST:-}"
if [ "$DRY" = 0 ]; then
  mkdir -p "$LOGDIR" && : >"$LOG"
  NGPU="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
  if [ "${NGPU:-0}" -lt 1 ]; then
    echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L lists none): nothing to check here; --dry-run shows the plan" | tee -a "$LOG"
    exit 64
  fi
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
  if ! [[ "$ARCH" =~ ^[0-9]+\.[0-9]+(\;[0-9]+\.[0-9]+)*$ ]]; then
    [ -n "$ARCH" ] && echo "gpu-check: TORCH_CUDA_ARCH_LIST=$ARCH is not plain X.Y (DeepSpeed cannot parse 9.0a / +PTX): using the GPU's" | tee -a "$LOG"
    ARCH="$CAP"  # empty when this driver's nvidia-smi lacks compute_cap: torch tells after step 2
  fi
else
  NGPU=1
  ARCH="${ARCH:-9.0}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled DS_ACCELERATOR=cuda \
       MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}" \
       OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

# ------------------------------------------------------------------------------------------ the plan
# the packages beyond run/cuda-venv.sh's pins: setup.cfg's install_requires (torch and deepspeed are pinned
# there) and what the test steps import
REQS=()
while IFS= read -r r; do [ -n "$r" ] && REQS+=("$r"); done < <("$BASE_PY" - "$ROOT/setup.cfg" <<'PY'
import configparser, re, sys
c = configparser.ConfigParser(); c.read(sys.argv[1])
for line in c["options"]["install_requires"].splitlines():
    line = line.split("#")[0].strip()
    if line and re.split(r"[<>=!~ ]", line)[0] not in ("torch", "deepspeed"):
        print(line)
print("pytest>=7"); print("hypothesis>=6.100")
PY
)
SEL_OPS=(tests/unit/test_ops.py -k "cuda and not cpu")
SEL_METHODS=(tests/dist/test_gpu.py -k test_method_on_cuda)
SEL_NCCL=(tests/dist/test_gpu.py -k test_one_rank_nccl)
q() { printf '%q ' "$@"; }
PYTEST="$(q "$VPY") -m pytest -q -p no:cacheprovider -rfEs"
JUNIT_PY='import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot(); s = r if r.tag == "testsuite" else r.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"[gpu-check] {sys.argv[1]}: {n - f - e - k} passed, {f} failed, {e} errors, {k} skipped")
sys.exit(0 if n - f - e - k > 0 and f + e == 0 else 1)'
export JUNIT_PY
pytest_step() {  # pytest_step ID SELECTION...: pytest, and at least one test passed (all-skipped is a FAIL)
  local id="$1"; shift
  echo "$PYTEST --junitxml=$(q "$LOGDIR/step-$id.xml") $(q "$@")&& $(q "$VPY") -c \"\$JUNIT_PY\" $(q "$LOGDIR/step-$id.xml")"
}
TRAIN=(--module ds_ext.train --recipe recipes/quickstart.yaml --set train.epochs=1 --set log.progress=false
       --set log.wandb.mode=disabled --set checkpoint.every_epochs=0)
trainer() {  # trainer NPROC REDUCER: the launcher command of one trainer run
  echo "$(q "$VENV/bin/deepspeed") --num_gpus $1 --master_port $((RANDOM % 20000 + 20000)) $(q "${TRAIN[@]}")" \
       "--set $(q "method.reducer={name: $2}") --set $(q "log.dir=$LOGDIR/train-$1-$2")"
}
BENCH=("-m benchmarks.compress --device cuda --rank 4 --steps 2 --warmup 1"
       "-m benchmarks.sparse --devices cuda --numel 2000000 --reps 3 --trace-steps 20 --trace-numel 200000 --out $(q "$LOGDIR/bench-sparse")"
       "-m benchmarks.ops --devices cuda --numel 2000000 --reps 3")
PREPARE="import logging, time; logging.basicConfig(level=logging.INFO); from ds_ext import ops
import sys; dev = sys.argv[1]; t = time.time(); st = ops.prepare(dev); print(f'ops.prepare({dev}):', st, f'{time.time() - t:.0f} s')
assert st.get('in_use') == 'compiled', st"
export PREPARE

S_ID=(); S_NAME=(); S_BUDGET=(); S_OPS=(); S_NEED=(); S_CMD=()
plan() {  # plan ID BUDGET_S DS_EXT_OPS NEED NAME COMMAND (NEED: - | venv | op | gpus2)
  S_ID+=("$1"); S_BUDGET+=("$2"); S_OPS+=("$3"); S_NEED+=("$4"); S_NAME+=("$5"); S_CMD+=("$6")
}
plan 1 10 auto - "environment" \
  "nvidia-smi; nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv; $(q "$BASE_PY") --version; g++ --version | head -n 1; df -h /tmp | tail -n 1"
plan 2 140 auto - "install (venv, pinned CUDA torch, nvcc, deepspeed)" \
  "source run/cuda-venv.sh && ds_ext_make_venv $(q "$BASE_PY" "$VENV") && ds_ext_cuda_install $(q "$VPY" "${REQS[@]}") && ds_ext_cuda_toolchain $(q "$VPY" "$VENV/cudalib") && $(q "$VPY") -c 'import torch, deepspeed, sys; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), \"deepspeed\", deepspeed.__version__); print(\"device\", torch.cuda.get_device_name(0), \"cc\", torch.cuda.get_device_capability(0), \"count\", torch.cuda.device_count()); sys.exit(0 if torch.cuda.is_available() else 1)' && nvcc --version | tail -n 2"
plan 3 75 compiled venv "build the ops (CUDA for arch ${ARCH:-<GPU>}, CPU beside)" \
  "TORCH_CUDA_ARCH_LIST=\$ARCH $(q "$VPY") -c \"\$PREPARE\" cpu & cpu=\$!; TORCH_CUDA_ARCH_LIST=\$ARCH $(q "$VPY") -c \"\$PREPARE\" cuda; rc=\$?; wait \$cpu && exit \$rc"
plan 4 25 compiled op "CUDA op vs torch (${SEL_OPS[*]})" "$(pytest_step 4 "${SEL_OPS[@]}")"
plan 5 85 auto venv "every method in an engine on CUDA, fp32 + bf16 (gloo ranks)" "$(pytest_step 5 "${SEL_METHODS[@]}")"
plan 6 35 auto venv "every collective through 1-rank NCCL (forced)" "$(pytest_step 6 "${SEL_NCCL[@]}")"
plan 7 35 auto venv "CUDA syncs per step, 1-rank NCCL (tests/dist/cuda_syncs.py)" \
  "$(q "$VPY") tests/dist/cuda_syncs.py --json $(q "$LOGDIR/cuda-syncs.json")"
plan 8 45 auto venv "trainer, world 1 (allreduce; acpsgd forced collectives)" \
  "$(trainer 1 allreduce) && DS_EXT_FORCE_COLLECTIVES=1 $(trainer 1 acpsgd)"
plan 9 30 auto venv "benchmarks on CUDA (compress, sparse, ops; small)" \
  "$(q "$VPY") ${BENCH[0]} && $(q "$VPY") ${BENCH[1]} && $(q "$VPY") ${BENCH[2]}"
plan 10 60 auto gpus2 "2 NCCL ranks: every method + syncs (launcher)" \
  "$(q "$VENV/bin/deepspeed") --num_gpus 2 --no_local_rank --master_port $((RANDOM % 20000 + 20000)) tests/dist/cuda_syncs.py --json $(q "$LOGDIR/cuda-syncs-2ranks.json")"
plan 11 45 auto gpus2 "trainer, 2 ranks (launcher start-up path)" "$(trainer 2 allreduce)"

total=0
for i in "${!S_ID[@]}"; do [ "${S_NEED[$i]}" = gpus2 ] || total=$((total + S_BUDGET[i])); done
total2=0
for i in "${!S_ID[@]}"; do total2=$((total2 + S_BUDGET[i])); done

# ------------------------------------------------------------------------------------------ --dry-run
if [ "$DRY" = 1 ]; then
  echo "gpu-check --dry-run: the plan (nothing is installed or run; commands as they would run)"
  printf '%-4s %-62s %6s  %-8s %s\n' step name budget DS_EXT_OPS needs
  for i in "${!S_ID[@]}"; do
    printf '%-4s %-62s %5ss  %-8s %s\n' "${S_ID[$i]}" "${S_NAME[$i]}" "${S_BUDGET[$i]}" "${S_OPS[$i]}" "${S_NEED[$i]}"
  done
  echo "total budget, one GPU: $total s (limit $BUDGET_TOTAL s); with >= 2 GPUs: $total2 s"
  echo
  for i in "${!S_ID[@]}"; do echo "[step ${S_ID[$i]}] ${S_CMD[$i]}"; done
  echo
  fail=0
  [ "$total" -le "$BUDGET_TOTAL" ] || { echo "FAIL: the one-GPU budgets add to $total s > $BUDGET_TOTAL s"; fail=1; }
  all=""
  for i in "${!S_CMD[@]}"; do all+="step_${S_ID[$i]}() {"$'\n'"${S_CMD[$i]}"$'\n'"}"$'\n'; done
  if ! bash -n -c "$all" 2>/dev/null; then  # then name the step(s)
    for i in "${!S_CMD[@]}"; do
      bash -n -c "${S_CMD[$i]}" 2>/dev/null || { echo "FAIL: step ${S_ID[$i]}'s command is not valid bash"; fail=1; }
    done
  fi
  for f in run/cuda-venv.sh tests/unit/test_ops.py tests/dist/test_gpu.py tests/dist/cuda_syncs.py recipes/quickstart.yaml \
           benchmarks/compress.py benchmarks/sparse.py benchmarks/ops.py; do
    [ -f "$f" ] || { echo "FAIL: $f is missing"; fail=1; }
  done
  declare -F ds_ext_make_venv ds_ext_cuda_install ds_ext_cuda_toolchain ds_ext_pip >/dev/null \
    || { echo "FAIL: run/cuda-venv.sh lacks a function the install step calls"; fail=1; }
  echo "install: $DS_EXT_CUDA_TORCH_REQ, $DS_EXT_CUDA_TK_REQ, ninja, $DS_EXT_CUDA_DS_REQ, ${REQS[*]}"
  # the Python side, in one interpreter (the one that has torch and deepspeed here): every pytest selection
  # collects tests, the scripts' arguments parse, the trainer's overrides validate, the pins agree
  out="$(DRY_SELECTIONS="$(q "${SEL_OPS[@]}")"$'\n'"$(q "${SEL_METHODS[@]}")"$'\n'"$(q "${SEL_NCCL[@]}")" \
         DRY_TRAIN="$(q "${TRAIN[@]}")" DRY_BENCH="$(printf '%s\n' "${BENCH[@]}")" DRY_DS_REQ="$DS_EXT_CUDA_DS_REQ" \
         "$BASE_PY" "$ROOT/run/gpu_check_dry.py" 2>&1)"
  rc=$?
  echo "$out" | grep '^\[dry-run\]'
  if [ "$rc" != 0 ] || ! grep -q '^\[dry-run\] all .* checks passed' <<<"$out"; then
    echo "FAIL: run/gpu_check_dry.py (exit $rc); its output:"; echo "$out" | grep -v '^\[dry-run\]' | tail -n 30; fail=1
  fi
  [ "$fail" = 0 ] && echo "dry run: OK" || echo "dry run: FAILED"
  exit "$fail"
fi

# ------------------------------------------------------------------------------------------ the run
say() { echo "$*" | tee -a "$LOG"; }
declare -A RESULT=() TIME=()
failed=0
say "gpu-check $(date -u +%FT%TZ) on $(hostname): $NGPU GPU(s), arch ${ARCH:-?}, venv $VENV, log $LOG"
say "budgets: $total s for one GPU ($total2 s with >= 2 GPUs)"
for i in "${!S_ID[@]}"; do
  id="${S_ID[$i]}" need="${S_NEED[$i]}" ops="${S_OPS[$i]}"
  say ""
  say "=== step $id: ${S_NAME[$i]} (budget ${S_BUDGET[$i]} s)"
  why=""
  case "$need" in
    venv|op) [ "${RESULT[2]:-}" = PASS ] || why="the install (step 2) did not pass" ;;&
    op) [ -z "$why" ] && [ "${RESULT[3]:-}" != PASS ] && why="the op build (step 3) did not pass" ;;
    gpus2) [ "$NGPU" -ge 2 ] || why="needs >= 2 GPUs (this host has $NGPU)" ;;
  esac
  if [ -n "$why" ]; then
    RESULT[$id]=SKIP; TIME[$id]=0; say "=== step $id: SKIP ($why)"; continue
  fi
  if [ "$ops" = auto ] && [ "${RESULT[3]:-}" != PASS ] && [ "$id" -gt 3 ]; then
    ops=torch; say "(DS_EXT_OPS=torch: the op build did not pass, and auto would retry it in every process)"
  fi
  say "\$ ${S_CMD[$i]}"
  t0=$SECONDS
  ARCH="$ARCH" DS_EXT_OPS="$ops" timeout -k 10 "${S_BUDGET[$i]}" bash -c "${S_CMD[$i]}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  TIME[$id]=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then RESULT[$id]=PASS; else
    RESULT[$id]=FAIL; failed=$((failed + 1))
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "(past its budget of ${S_BUDGET[$i]} s: stopped)"
  fi
  say "=== step $id: ${RESULT[$id]} (exit $rc, ${TIME[$id]} s of ${S_BUDGET[$i]} s)"
  if [ "$id" = 2 ] && [ "$rc" = 0 ]; then  # the toolchain for the steps that follow (this shell's environment)
    ds_ext_cuda_toolchain "$VPY" "$VENV/cudalib" || { RESULT[2]=FAIL; failed=$((failed + 1)); }
    [ -n "$ARCH" ] || ARCH="$("$VPY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
  fi
done

say ""
say "gpu-check summary ($NGPU GPU(s), arch $ARCH; NOT a judgement of anything a SKIP names)"
printf '%-4s %-62s %-6s %8s %8s\n' step name result seconds budget | tee -a "$LOG"
printf 'step\tname\tresult\tseconds\tbudget\n' >"$LOGDIR/summary.tsv"
for i in "${!S_ID[@]}"; do
  id="${S_ID[$i]}"
  printf '%-4s %-62s %-6s %8s %8s\n' "$id" "${S_NAME[$i]}" "${RESULT[$id]}" "${TIME[$id]}" "${S_BUDGET[$i]}" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\t%s\n' "$id" "${S_NAME[$i]}" "${RESULT[$id]}" "${TIME[$id]}" "${S_BUDGET[$i]}" >>"$LOGDIR/summary.tsv"
done
say "gpu-check: $failed step(s) failed; log $LOG"
exit "$failed"
