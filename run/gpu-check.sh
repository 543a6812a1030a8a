#!/usr/bin/env bash
# The one-shot GPU check: everything about ds_ext that needs an NVIDIA GPU, in ONE command on a Linux x86-64
# host with one H100 or H200, within 480 s by the step budgets printed below, on either kind of host (decided
# at start, printed as "install path:" in the plan and the log):
#   online:  a BARE host (python3, g++) whose pip reaches the package index -> the pinned CUDA stack from it;
#   offline: no index (a quick probe of <index>/pip/, 5 s) but the host's python3 has a CUDA torch -> that torch,
#            never replaced, plus the small wheels carried in .whl/ (made beforehand by --fetch-wheels on a
#            networked machine; git-ignored, so it travels as a carried path, 64 MiB at most); nvcc only where
#            the host has one (else steps 3-4 SKIP and the rest runs with DS_EXT_OPS=torch);
#   none:    neither -> step 2 FAILs with one line naming both ways out, the steps after it SKIP.
# NOT RUN ON A GPU YET, online or offline: `--dry-run` (checked in CI by tests/e2e/test_gpu_check.py) and
# `--fetch-wheels` (by hand, on a CPU machine) are all that has run; the offline install (step 2 up to its
# version print) was tried once on a CPU host against a stub CUDA torch.
#
#   bash run/gpu-check.sh                 # the check; log and results in ${OUT:-runs/gpu-check}/
#   bash run/gpu-check.sh --dry-run       # no GPU, no install: the install path, the plan (steps, budgets, total
#                                         # <= 480 s, each command echoed) and checks of the script's own logic
#   bash run/gpu-check.sh --fetch-wheels  # networked machine, before an offline run: .whl/ (below)
#
# Steps, each under its own budget (a timeout: past it the step FAILs and the next one runs; a failed step
# never stops the others; DS_EXT_OPS=compiled only in steps 3-4, which test the compiled op, `auto` elsewhere,
# `torch` when step 3 failed, so that no later step retries the build):
#   1. environment: nvidia-smi (driver, GPUs, compute capability), python3, g++, disk. Proves: a GPU is visible.
#   2. install: a venv of its own (${DS_EXT_GPU_VENV:-/tmp/ds_ext-gpu-venv}; python3 -m venv, else virtualenv)
#      online: with the pins of run/cuda-venv.sh (torch 2.13.0 = PyPI's CUDA 13.0 build, cuda-toolkit[nvcc,cccl]
#      13.0.3.0, ninja, deepspeed 0.19.8) and setup.cfg's install_requires + pytest/hypothesis. offline: venv
#      --system-site-packages (the host's torch), pip --no-index --find-links .whl/: deepspeed --no-deps, its
#      requirements but torch, setup.cfg's but wandb, + pytest; scikit-learn only if carried or on the host
#      (step 8 SKIPs without it); the host's nvcc (CUDA_HOME, PATH, /usr/local/cuda, a pip toolkit; same CUDA
#      major as the torch). ds_ext itself from this checkout (PYTHONPATH); libcudart.so found or linked; prints
#      torch/CUDA/NCCL/deepspeed/nvcc versions. Proves: the stack installs and torch sees the GPU.
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
# --dry-run/--fetch-wheels, no NVIDIA GPU visible (nothing run). --dry-run, --fetch-wheels: 0 ok, 1 not.
#
# --fetch-wheels (on a networked CPU machine): into .whl/ (DS_EXT_GPU_WHEELS) the wheels the offline path needs
# for the GPU host's CPython (DS_EXT_GPU_PYTHON_VERSION, 3.12; x86-64 manylinux): deepspeed built here with
# DS_BUILD_OPS=0, its requirements but torch, setup.cfg's install_requires but torch/deepspeed/wandb/
# scikit-learn, pytest, pip (for a python without ensurepip); scikit-learn only while the total stays under
# DS_EXT_GPU_WHEELS_MAX_MB (48; with scipy it does not: skipped, said so). Prints every file and the total
# (~25 MiB); never torch or CUDA wheels (several GB: the offline host must have its own CUDA torch).
#
# Environment: DS_EXT_GPU_VENV (venv path, reused when present and of the same kind), DS_EXT_PYTHON (the
# interpreter that makes the venv, whose torch the offline path uses, and that --dry-run checks with; python3),
# OUT, TORCH_CUDA_ARCH_LIST (plain X.Y values only; default: the GPU's), MAX_JOBS (nproc), TORCH_EXTENSIONS_DIR
# (${DS_EXT_GPU_VENV}/torch_extensions), DS_EXT_GPU_FORCE_OFFLINE (1: offline without probing; 0: online without
# probing), DS_EXT_GPU_NVCC (PATH of the nvcc the offline path uses, or none), PIP_INDEX_URL (probed and used
# only with DS_EXT_PIP_ISOLATED=0, run/cuda-venv.sh). --dry-run only: DS_EXT_GPU_DRY_PY=0 (skip the Python checks), DS_EXT_GPU_DRY_HOST_CUDA=X.Y (or none)
# pretends the host's torch is that CUDA build, to show the offline plan on a CPU host.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=run/cuda-venv.sh
source "$ROOT/run/cuda-venv.sh"
DRY=0 FETCH=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
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
WHL="${DS_EXT_GPU_WHEELS:-$ROOT/.whl}"
NGPU=0
ARCH="${TORCH_CUDA_ARCH_LIST:-}"
[ "$DRY" = 1 ] && [ "$FETCH" = 1 ] && { echo "gpu-check: --dry-run and --fetch-wheels exclude each other" >&2; exit 64; }
if [ "$DRY" = 0 ] && [ "$FETCH" = 0 ]; then
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
# the offline install's share of them (no package index; .whl/ from --fetch-wheels, or the host's own): not
# wandb (every step logs with wandb disabled) nor hypothesis (no GPU step imports it); scikit-learn optional
# (only step 8 needs it: the quickstart's digits data; with scipy it is ~45 MB, more than .whl/ can carry)
OFF_REQS=(); OFF_OPT=()
for r in "${REQS[@]}"; do
  case "${r%%[<>=!~ ]*}" in
    wandb|hypothesis) ;;
    scikit-learn) OFF_OPT+=("$r") ;;
    *) OFF_REQS+=("$r") ;;
  esac
done

# ------------------------------------------------------------------------------------------ --fetch-wheels
fetch_wheels() {  # on a networked machine: .whl/ for the offline install (the GPU host's CPython, x86-64 Linux)
  local pyv="${DS_EXT_GPU_PYTHON_VERSION:-3.12}" maxmb="${DS_EXT_GPU_WHEELS_MAX_MB:-48}" dsw r f new have total
  local deps=() stage="$WHL/.stage" plat=(--only-binary=:all: --python-version "$pyv" --implementation cp
    --abi "cp${pyv/./}" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform any)
  mkdir -p "$WHL" || return 1
  echo "[fetch-wheels] into $WHL, for CPython $pyv x86-64 Linux (DS_EXT_GPU_PYTHON_VERSION); never torch or CUDA wheels"
  # deepspeed is an sdist on PyPI: its wheel is built here without ops (DS_BUILD_OPS=0: pure Python, py3-none-any)
  DS_BUILD_OPS=0 "$BASE_PY" -m pip wheel --quiet --no-deps -w "$WHL" "$DS_EXT_CUDA_DS_REQ" 2>&1 | grep -v 'is ignored'
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "[fetch-wheels] FAIL: could not build the $DS_EXT_CUDA_DS_REQ wheel"; return 1; }
  dsw="$(ls "$WHL/deepspeed-${DS_EXT_CUDA_DS_REQ#*==}-"*.whl 2>/dev/null | head -n 1)"
  [ -n "$dsw" ] || { echo "[fetch-wheels] FAIL: no deepspeed wheel in $WHL"; return 1; }
  while IFS= read -r r; do [ -n "$r" ] && deps+=("$r"); done < <("$BASE_PY" - "$dsw" <<'PY'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:"):
        r = line.split(":", 1)[1].strip()
        if "extra ==" not in r and re.split(r"[^A-Za-z0-9_.-]", r, 1)[0].lower() != "torch":
            print(r)
PY
)
  echo "[fetch-wheels] deepspeed's requirements but torch: ${deps[*]}"
  echo "[fetch-wheels] the steps': ${OFF_REQS[*]}; pip (a venv without ensurepip gets pip from it)"
  "$BASE_PY" -m pip download --quiet "${plat[@]}" -d "$WHL" "${deps[@]}" "${OFF_REQS[@]}" pip 2>&1 | grep -v 'is ignored'
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "[fetch-wheels] FAIL: pip download"; return 1; }
  for r in "${OFF_OPT[@]}"; do  # optional: only while .whl/ stays under DS_EXT_GPU_WHEELS_MAX_MB
    rm -rf "$stage"
    "$BASE_PY" -m pip download --quiet "${plat[@]}" -d "$stage" "$r" 2>&1 | grep -v 'is ignored'
    new=0
    for f in "$stage"/*.whl; do [ -e "$f" ] && [ ! -e "$WHL/${f##*/}" ] && new=$((new + $(stat -c %s "$f"))); done
    have="$(cat "$WHL"/*.whl | wc -c)"
    if [ "$new" -gt 0 ] && [ $(((have + new) / 1048576)) -le "$maxmb" ]; then
      for f in "$stage"/*.whl; do [ -e "$WHL/${f##*/}" ] || mv "$f" "$WHL/"; done
      echo "[fetch-wheels] $r: added ($((new / 1048576)) MiB with its requirements)"
    else
      echo "[fetch-wheels] $r: SKIPPED: it and its requirements (scipy, ...) add $((new / 1048576)) MiB, over the ${maxmb} MiB cap (DS_EXT_GPU_WHEELS_MAX_MB; the carry limit is 64 MiB). Only step 8 (the trainer on recipes/quickstart.yaml's digits data) needs it: offline, step 8 runs when the host's python has scikit-learn and SKIPs otherwise"
    fi
  done
  rm -rf "$stage"
  echo "[fetch-wheels] $WHL:"
  for f in "$WHL"/*.whl; do printf '  %10s  %s\n' "$(stat -c %s "$f")" "${f##*/}"; done
  total="$(cat "$WHL"/*.whl | wc -c)"
  echo "[fetch-wheels] $(ls "$WHL"/*.whl | wc -l) wheels, $total bytes ($((total / 1048576)) MiB; carry limit 64 MiB; older versions left from an earlier fetch count too: rm -rf .whl to start over)"
  [ "$total" -le $((64 * 1048576)) ] || { echo "[fetch-wheels] FAIL: over the 64 MiB carry limit"; return 1; }
  echo "[fetch-wheels] .whl/ is git-ignored: carry it to the GPU host (run's carry: [\".whl\"]), then: bash run/gpu-check.sh"
}
if [ "$FETCH" = 1 ]; then fetch_wheels; exit $?; fi

# ------------------------------------------------------------------------------------------ the install path
# online: the package index answers within 5 s -> the pinned CUDA stack from it. offline: it does not (or
# DS_EXT_GPU_FORCE_OFFLINE=1) and the host's python has a CUDA torch -> a venv on the host's site-packages
# (its torch, never replaced) plus .whl/ (--fetch-wheels); nvcc only where the host has one, else steps 3-4 SKIP.
# none: neither -> step 2 FAILs with what is missing. DS_EXT_GPU_FORCE_OFFLINE=0 takes online without asking.
INSTALL="" WHY="" HOST_TORCH="" HOST_CUDA="" NVROOT="" NVCC_WHY="" WHL_NOTE="" NONE_MSG=""
declare -A PRESKIP=()
case "${DS_EXT_GPU_FORCE_OFFLINE:-}" in
  1) INSTALL=offline WHY="DS_EXT_GPU_FORCE_OFFLINE=1" ;;
  0) INSTALL=online WHY="DS_EXT_GPU_FORCE_OFFLINE=0" ;;
  *) if ds_ext_index_reachable "$BASE_PY"; then INSTALL=online WHY="$(ds_ext_index_url) answered"
     else INSTALL=offline WHY="$(ds_ext_index_url) did not answer within 5 s"; fi ;;
esac
if [ "$INSTALL" = offline ]; then
  HOST_TORCH="$(timeout 120 "$BASE_PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "")' 2>/dev/null)"
  if [ "$DRY" = 1 ] && [ -n "${DS_EXT_GPU_DRY_HOST_CUDA:-}" ]; then  # --dry-run only: pretend the host's torch
    HOST_TORCH="pretended(DS_EXT_GPU_DRY_HOST_CUDA) ${DS_EXT_GPU_DRY_HOST_CUDA#none}"
  fi
  HOST_TORCH="${HOST_TORCH% }" HOST_CUDA="$(echo "$HOST_TORCH" | cut -s -d' ' -f2)"
  if [ -z "$HOST_CUDA" ]; then
    INSTALL=none
  else
    NVROOT="$(ds_ext_find_nvcc "$BASE_PY" "$HOST_CUDA")" || { NVCC_WHY="$NVROOT"; NVROOT=""; }
    if [ -z "$NVROOT" ]; then
      PRESKIP[3]="no usable nvcc on this host ($NVCC_WHY): the CUDA op cannot be built; later steps DS_EXT_OPS=torch"
      PRESKIP[4]="the CUDA op is not built here (no usable nvcc)"
    fi
    hvd="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" && hv="cp${hvd/./}"
    if ! ls "$WHL"/*.whl >/dev/null 2>&1; then WHL_NOTE="no .whl/ here: only what the host's python already has"
    elif ls "$WHL"/*-cp3*-*.whl >/dev/null 2>&1 && ! ls "$WHL"/*-"$hv"-*.whl >/dev/null 2>&1; then
      WHL_NOTE="$(ls "$WHL"/*.whl | wc -l) wheels, none for $hv (this python): DS_EXT_GPU_PYTHON_VERSION=$hvd bash run/gpu-check.sh --fetch-wheels"
    else WHL_NOTE="$(ls "$WHL"/*.whl | wc -l) wheels"; fi
  fi
fi
NONE_MSG="gpu-check: cannot install: the package index is unreachable ($WHY) and $BASE_PY has no CUDA torch (${HOST_TORCH:-no torch}); either give this host network access to the package index, or use a host whose python3 (or DS_EXT_PYTHON) has a CUDA torch and carry .whl/ from 'bash run/gpu-check.sh --fetch-wheels' (run beforehand on a networked machine)"
case "$INSTALL" in
  online) INSTALL_LINE="install path: online ($WHY): the pinned CUDA stack from the index" ;;
  offline) INSTALL_LINE="install path: offline ($WHY): the host's torch ${HOST_TORCH% *} (CUDA $HOST_CUDA; never replaced) in a venv --system-site-packages; the rest with pip --no-index --find-links .whl/ ($WHL_NOTE); nvcc: ${NVROOT:-none ($NVCC_WHY): steps 3-4 SKIP, later steps DS_EXT_OPS=torch}" ;;
  none) INSTALL_LINE="install path: none: $NONE_MSG" ;;
esac

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
VERSIONS="$(q "$VPY") -c 'import torch, deepspeed, sys; print(\"torch\", torch.__version__, torch.__file__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), \"deepspeed\", deepspeed.__version__); print(\"device\", torch.cuda.get_device_name(0), \"cc\", torch.cuda.get_device_capability(0), \"count\", torch.cuda.device_count()); sys.exit(0 if torch.cuda.is_available() else 1)'"
# step 2 for each install path (all three are checked by --dry-run; the one of $INSTALL runs)
STEP2_ONLINE="source run/cuda-venv.sh && ds_ext_make_venv $(q "$BASE_PY" "$VENV") && ds_ext_cuda_install $(q "$VPY" "${REQS[@]}") && ds_ext_cuda_toolchain $(q "$VPY" "$VENV/cudalib") && $VERSIONS && nvcc --version | tail -n 2"
STEP2_OFFLINE="source run/cuda-venv.sh && export DS_EXT_WHEELS=$(q "$WHL") && ds_ext_make_venv $(q "$BASE_PY" "$VENV") --system-site-packages && ds_ext_offline_install $(q "$VPY" "${OFF_REQS[@]}" -- "${OFF_OPT[@]}") && "
if [ -n "$NVROOT" ]; then STEP2_OFFLINE+="ds_ext_cuda_toolchain $(q "$VPY" "$VENV/cudalib" "$NVROOT") && $VERSIONS && nvcc --version | tail -n 2"
else STEP2_OFFLINE+="$VERSIONS && echo $(q "no usable nvcc: ${NVCC_WHY:-?}")"; fi
STEP2_NONE="echo $(q "$NONE_MSG") >&2; exit 1"
case "$INSTALL" in online) STEP2="$STEP2_ONLINE" ;; offline) STEP2="$STEP2_OFFLINE" ;; *) STEP2="$STEP2_NONE" ;; esac
case "$INSTALL" in
  online) STEP2_NAME="install (venv, pinned CUDA torch, nvcc, deepspeed)" ;;
  offline) STEP2_NAME="install offline (venv on the host's CUDA torch, .whl/)" ;;
  *) STEP2_NAME="install (impossible here: no index, no host CUDA torch)" ;;
esac
plan 2 140 auto - "$STEP2_NAME" "$STEP2"
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

if [ -n "${PRESKIP[3]:-}" ]; then  # no op build: torch from the start (as after a failed step 3)
  for i in "${!S_ID[@]}"; do [ "${S_ID[$i]}" -gt 4 ] && [ "${S_OPS[$i]}" = auto ] && S_OPS[i]=torch; done
fi
total=0
for i in "${!S_ID[@]}"; do [ "${S_NEED[$i]}" = gpus2 ] || total=$((total + S_BUDGET[i])); done
total2=0
for i in "${!S_ID[@]}"; do total2=$((total2 + S_BUDGET[i])); done

# ------------------------------------------------------------------------------------------ --dry-run
if [ "$DRY" = 1 ]; then
  echo "gpu-check --dry-run: the plan (nothing is installed or run; commands as they would run)"
  echo "$INSTALL_LINE"
  printf '%-4s %-62s %6s  %-8s %s\n' step name budget DS_EXT_OPS needs
  for i in "${!S_ID[@]}"; do
    printf '%-4s %-62s %5ss  %-8s %s\n' "${S_ID[$i]}" "${S_NAME[$i]}" "${S_BUDGET[$i]}" "${S_OPS[$i]}" "${S_NEED[$i]}"
  done
  echo "total budget, one GPU: $total s (limit $BUDGET_TOTAL s); with >= 2 GPUs: $total2 s"
  for i in "${!S_ID[@]}"; do
    [ -n "${PRESKIP[${S_ID[$i]}]:-}" ] && echo "planned SKIP: step ${S_ID[$i]} (${PRESKIP[${S_ID[$i]}]})"
  done
  echo
  for i in "${!S_ID[@]}"; do echo "[step ${S_ID[$i]}] ${S_CMD[$i]}"; done
  echo
  fail=0
  [ "$total" -le "$BUDGET_TOTAL" ] || { echo "FAIL: the one-GPU budgets add to $total s > $BUDGET_TOTAL s"; fail=1; }
  all=""
  for i in "${!S_CMD[@]}"; do all+="step_${S_ID[$i]}() {"$'\n'"${S_CMD[$i]}"$'\n'"}"$'\n'; done
  for c in "$STEP2_ONLINE" "$STEP2_OFFLINE" "$STEP2_NONE"; do  # every install path's step 2, not only this one's
    bash -n -c "$c" 2>/dev/null || { echo "FAIL: a step-2 command (online/offline/none) is not valid bash: $c"; fail=1; }
  done
  case "$STEP2_OFFLINE" in
    *ds_ext_cuda_install*|*torch==*|*cuda-toolkit*) echo "FAIL: the offline install could pull torch or the CUDA wheels"; fail=1 ;;
    *--system-site-packages*ds_ext_offline_install*) ;;
    *) echo "FAIL: the offline install does not use the host's site-packages"; fail=1 ;;
  esac
  grep -q -- '--fetch-wheels' <<<"$NONE_MSG$STEP2_NONE" && grep -q 'network' <<<"$STEP2_NONE" \
    || { echo "FAIL: the no-install message does not name both ways out"; fail=1; }
  if ! bash -n -c "$all" 2>/dev/null; then  # then name the step(s)
    for i in "${!S_CMD[@]}"; do
      bash -n -c "${S_CMD[$i]}" 2>/dev/null || { echo "FAIL: step ${S_ID[$i]}'s command is not valid bash"; fail=1; }
    done
  fi
  for f in run/cuda-venv.sh tests/unit/test_ops.py tests/dist/test_gpu.py tests/dist/cuda_syncs.py recipes/quickstart.yaml \
           benchmarks/compress.py benchmarks/sparse.py benchmarks/ops.py; do
    [ -f "$f" ] || { echo "FAIL: $f is missing"; fail=1; }
  done
  declare -F ds_ext_make_venv ds_ext_cuda_install ds_ext_cuda_toolchain ds_ext_pip ds_ext_offline_install \
    ds_ext_find_nvcc ds_ext_index_reachable >/dev/null \
    || { echo "FAIL: run/cuda-venv.sh lacks a function the install step calls"; fail=1; }
  case "$INSTALL" in
    online) echo "install: $DS_EXT_CUDA_TORCH_REQ, $DS_EXT_CUDA_TK_REQ, ninja, $DS_EXT_CUDA_DS_REQ, ${REQS[*]}" ;;
    offline) echo "install offline: the host's torch (not installed), $DS_EXT_CUDA_DS_REQ --no-deps + its requirements but torch, ${OFF_REQS[*]}; optional: ${OFF_OPT[*]} (step 8); left out: wandb, hypothesis" ;;
    *) echo "install: none (step 2 FAILs; the steps that need the venv SKIP)" ;;
  esac
  # the Python side, in one interpreter (the one that has torch and deepspeed here): every pytest selection
  # collects tests, the scripts' arguments parse, the trainer's overrides validate, the pins agree
  # (DS_EXT_GPU_DRY_PY=0: the plan and the shell checks only; the Python side does not depend on the install path)
  if [ "${DS_EXT_GPU_DRY_PY:-1}" = 0 ]; then
    echo "[dry-run] Python checks skipped (DS_EXT_GPU_DRY_PY=0)"
    [ "$fail" = 0 ] && echo "dry run: OK" || echo "dry run: FAILED"
    exit "$fail"
  fi
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
say "$INSTALL_LINE"
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
  [ -z "$why" ] && [ -n "${PRESKIP[$id]:-}" ] && why="${PRESKIP[$id]}"
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
    if [ "$INSTALL" = online ] || [ -n "$NVROOT" ]; then
      ds_ext_cuda_toolchain "$VPY" "$VENV/cudalib" ${NVROOT:+"$NVROOT"} || { RESULT[2]=FAIL; failed=$((failed + 1)); }
    fi
    "$VPY" -c 'import sklearn' 2>/dev/null || PRESKIP[8]="scikit-learn is not importable in the venv (the quickstart's digits data): carry it in .whl/ or use a host python that has it"
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
