#!/usr/bin/env bash
# The one-shot GPU check: everything about ds_ext that needs an NVIDIA GPU, in one prepared run
# (under 8 minutes on one H100/H200), written to one log.
#
#   bash run/gpu-check.sh                  # on the GPU host; log: ${OUT:-runs/gpu-check}/gpu-check.log
#   bash run/gpu-check.sh --fetch-wheels   # on a host WITH network, before: the Python packages a bare GPU
#                                          # image lacks (deepspeed, pydantic, ...) as wheels in .whl/
#
# Steps (each timed; a failed step is reported and the next one runs; the exit code is the number of
# failed steps, 0 when all passed):
#   1. environment: nvidia-smi, torch / CUDA / NCCL versions, compute capability
#   2. build the CUDA op (ds_ext.ops.prepare, TORCH_CUDA_ARCH_LIST=<this GPU>, DeepSpeed's op builder)
#   3. CUDA kernel tests against torch (tests/unit/test_ops.py, DS_EXT_OPS=compiled)
#   4. every method on CUDA tensors, 2-4 ranks sharing the GPU through gloo (tests/dist/test_gpu.py)
#   5. the trainer on the GPU with NCCL, world size 1 under the deepspeed launcher (quickstart recipe;
#      allreduce, acpsgd, exdyna)
#   6. benchmarks on CUDA: bench-compress (ResNet-50, rank 4), bench-sparse (25.6M, density 0.001),
#      bench-ops (every kernel vs torch vs a device copy)
# Never installs or replaces torch: the host's CUDA build is used (python3, or $DS_EXT_PYTHON).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${DS_EXT_PYTHON:-python3}"
WHL="$ROOT/.whl"

if [ "${1:-}" = "--fetch-wheels" ]; then
  # deepspeed ships an sdist only: build its (pure Python, ops not prebuilt) wheel here; the rest are
  # binary wheels for the GPU image's Python (3.12, x86-64)
  mkdir -p "$WHL"
  PYV="${DS_EXT_GPU_PYTHON_VERSION:-3.12}"
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps -w "$WHL" "deepspeed==$("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null || echo 0.19.8)"
  for pkg in pydantic pydantic-core annotated-types typing-inspection hjson py-cpuinfo msgpack; do
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHL" "$pkg" || echo "[gpu-check] could not fetch $pkg" >&2
  done
  ls -la "$WHL"
  exit 0
fi

LOGDIR="${OUT:-$ROOT/runs/gpu-check}"
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu-check.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
FAILED=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  say ""
  say "=== $name ==="
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then say "=== $name: PASS ($((SECONDS - t0)) s)"; else
    say "=== $name: FAIL (exit $rc after $((SECONDS - t0)) s)"; FAILED=$((FAILED + 1)); fi
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  say "gpu-check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to check here."
  say "Run it on a GPU host; the CPU suite is run/test.sh."
  exit 3
fi

# dependencies a bare GPU image lacks: carried wheels first, the index otherwise
SITE="${DS_EXT_GPU_SITE:-/tmp/ds_ext-gpu-site}"
if ! "$PY" -c 'import deepspeed, pydantic' 2>/dev/null; then
  if ls "$WHL"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/*.whl
  else
    "$PY" -m pip install -q --target "$SITE" deepspeed pydantic hjson py-cpuinfo msgpack
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
CC_ARCH="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}.{b}")')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CC_ARCH}"  # plain X.Y: DeepSpeed cannot parse 9.0a
export MAX_JOBS="${MAX_JOBS:-16}" DS_EXT_OPS=compiled
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/ds_ext-gpu-check-ext}"

step "1 environment" 60 bash -c "nvidia-smi -L; $PY -c 'import torch, deepspeed; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), \"device\", torch.cuda.get_device_name(0), \"cc\", torch.cuda.get_device_capability(0), \"deepspeed\", deepspeed.__version__)'"
step "2 build the CUDA op (arch $TORCH_CUDA_ARCH_LIST)" 420 "$PY" -c "
import logging, time; logging.basicConfig(level=logging.INFO)
from ds_ext import ops
t = time.time(); st = ops.prepare('cuda'); print('ops.prepare(cuda):', st, f'{time.time() - t:.0f} s')
assert st.get('in_use') == 'compiled', st
"
step "3 CUDA kernels vs torch (tests/unit/test_ops.py)" 300 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_ops.py -k cuda
step "4 every method on CUDA tensors, 2-4 ranks (tests/dist/test_gpu.py)" 420 "$PY" -m pytest -q -p no:cacheprovider tests/dist/test_gpu.py
for red in allreduce acpsgd exdyna; do
  step "5 trainer, NCCL, world 1, reducer $red" 180 env DS_ACCELERATOR=cuda "$PY" -m deepspeed.launcher.runner \
    --num_gpus 1 --master_port 29517 --module ds_ext.train --recipe recipes/quickstart.yaml \
    --set "method.reducer={name: $red}" --set train.epochs=2 --set "log.dir=$LOGDIR/train-$red" --set log.progress=false
done
step "6a bench-compress on CUDA (ResNet-50, rank 4)" 300 "$PY" -m benchmarks.compress --device cuda --rank 4
step "6b bench-sparse on CUDA (25.6M, density 0.001)" 300 "$PY" -m benchmarks.sparse --devices cuda --out "$LOGDIR/bench-sparse"
step "6c bench-ops on CUDA" 300 "$PY" -m benchmarks.ops --devices cuda
say ""
say "gpu-check: $FAILED step(s) failed; log $LOG"
exit "$FAILED"
