#!/usr/bin/env bash
# Compile ds_ext's CUDA op (ds_ext_comm_cuda, ds_ext/csrc/cuda) on a machine WITHOUT a GPU, warnings as
# errors, and show what came out. Nothing runs on a GPU; this checks that the sources compile cleanly
# for the arch list and that the result carries machine code and PTX.
#
#   bash run/cuda-build-check.sh                 # venv (first run only: ~5 GB download), build, checks
#   bash run/cuda-build-check.sh --install-only  # only create / update the check venv
#   bash run/cuda-build-check.sh --prebuilt      # also the setup.py route (DS_BUILD_DS_EXT_COMM_CUDA=1,
#                                                # TORCH_CUDA_ARCH_LIST unset: the prebuilt default arch list;
#                                                # the install's own flags: setuptools passes torch's headers
#                                                # with -I, so -Wextra would flag torch's code, not ours)
#
# What it does:
#   1. a SEPARATE virtualenv in $DS_EXT_CUDA_CHECK_DIR (default ~/.cache/ds_ext-cuda-check; never the
#      repository's .venv, never inside the repository), reused on later runs, with PyPI's CUDA build of
#      torch==2.13.0 (CUDA 13.0), cuda-toolkit[nvcc,cccl]==13.0.3.0 (nvcc, crt, nvvm, cccl), ninja and
#      deepspeed (the pins and the install live in run/cuda-venv.sh, shared with run/gpu-check.sh). pip runs
#      with --isolated: a pip.conf / PIP_FIND_LINKS pointing at a CPU torch wheel must not win. The pip CUDA
#      runtime ships only libcudart.so.13, so an unversioned libcudart.so symlink goes on LIBRARY_PATH for
#      the link step;
#   2. a from-scratch JIT build (its own TORCH_EXTENSIONS_DIR, wiped first) through ds_ext's op builder
#      (ds_ext/op_builder: CommCUDABuilder -> DeepSpeed's jit_load -> torch cpp_extension + ninja), for
#      TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" ($DS_EXT_CUDA_CHECK_ARCHS), with -Xcompiler -Wall,-Wextra for
#      nvcc's host compiler and -Wall -Wextra for the C++ bindings (DS_EXT_NVCC_FLAGS / DS_EXT_CXX_FLAGS,
#      read by the op builder). torch.cuda.is_available is patched to True: without a GPU DeepSpeed's
#      jit_load builds "for CPU" and drops every nvcc flag (-O3, the arch list, the PTX);
#   3. fails (exit 1) on a build error or on ANY line of the build output that mentions a warning or an
#      error (ninja's echo of the command lines excepted);
#   4. prints the elapsed times, the machine code / PTX in the built module (cuobjdump --list-elf /
#      --list-ptx when the toolkit wheel has cuobjdump, else the fatbin headers read directly) and fails if
#      an arch of the list is missing or no PTX is embedded; imports the module (no GPU needed to import)
#      and checks it exposes every function of ds_ext/ops.py's compiled path.
#
# Environment: DS_EXT_CUDA_CHECK_DIR, DS_EXT_CUDA_CHECK_ARCHS (default "8.0;9.0+PTX"),
# DS_EXT_CUDA_CHECK_DEEPSPEED (default deepspeed==0.19.8), DS_EXT_PYTHON (python3), MAX_JOBS (2),
# DS_NVCC_THREADS (2). Needs g++ and PyPI access (first run). About 5 GB of disk.
set -euo pipefail
T_START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${DS_EXT_CUDA_CHECK_DIR:-$HOME/.cache/ds_ext-cuda-check}"
W="$(realpath -m "$W")"
ARCHS="${DS_EXT_CUDA_CHECK_ARCHS:-8.0;9.0+PTX}"
# shellcheck source=run/cuda-venv.sh
source "$ROOT/run/cuda-venv.sh"
DS_REQ="${DS_EXT_CUDA_CHECK_DEEPSPEED:-$DS_EXT_CUDA_DS_REQ}"
DS_EXT_CUDA_DS_REQ="$DS_REQ"
TORCH_REQ="$DS_EXT_CUDA_TORCH_REQ"
TK_REQ="$DS_EXT_CUDA_TK_REQ"
BASE_PY="${DS_EXT_PYTHON:-python3}"
INSTALL_ONLY=0
PREBUILT=0
for a in "$@"; do
  case "$a" in
    --install-only) INSTALL_ONLY=1 ;;
    --prebuilt) PREBUILT=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cuda-build-check: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "[cuda-build-check] $*"; }
case "$W/" in
  "$ROOT"/*) log "error: DS_EXT_CUDA_CHECK_DIR=$W is inside the repository; choose a directory outside it"; exit 2 ;;
esac
command -v "$BASE_PY" >/dev/null || { log "error: $BASE_PY not found (set DS_EXT_PYTHON)"; exit 2; }
command -v g++ >/dev/null || command -v c++ >/dev/null || { log "error: no host C++ compiler (g++)"; exit 2; }
mkdir -p "$W"
VENV="$W/venv"
VPY="$VENV/bin/python"

# ------------------------------------------------------------------------------------------ 1. venv
STAMP="$W/installed.txt"
WANT="$TORCH_REQ | $TK_REQ ninja numpy pyyaml | $DS_REQ | $("$BASE_PY" -c 'import sys; print(sys.version.split()[0])')"
if [ -x "$VPY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] \
   && "$VPY" -c "import torch, deepspeed, ninja, yaml" >/dev/null 2>&1; then
  log "reusing $VENV ($(cat "$STAMP"))"
else
  T0=$(date +%s)
  [ -x "$VPY" ] || { log "creating $VENV"; ds_ext_make_venv "$BASE_PY" "$VENV"; }
  rm -f "$STAMP"
  log "installing $TORCH_REQ (PyPI's CUDA build), then $TK_REQ, ninja, then $DS_REQ (several GB, first run only)"
  ds_ext_cuda_install "$VPY" numpy pyyaml
  echo "$WANT" > "$STAMP"
  log "venv ready in $(( $(date +%s) - T0 )) s"
fi
ds_ext_cuda_toolchain "$VPY" "$W/cudalib" || exit 1  # NV, CUDA_HOME, PATH, LIBRARY_PATH (run/cuda-venv.sh)
log "torch $("$VPY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), " \
    "$("$NV/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*'), deepspeed $("$VPY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -n 1)," \
    "host $(g++ --version | head -n 1)"
[ "$INSTALL_ONLY" = 1 ] && { log "--install-only: done in $(( $(date +%s) - T_START )) s"; exit 0; }

# ------------------------------------------------------------------------------------------ 2. build
export MAX_JOBS="${MAX_JOBS:-2}" DS_NVCC_THREADS="${DS_NVCC_THREADS:-2}" \
       DS_EXT_NVCC_FLAGS="-Xcompiler -Wall,-Wextra" DS_EXT_CXX_FLAGS="-Wall -Wextra" \
       DS_EXT_REPO="$ROOT" DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
unset DS_BUILD_OPS DS_BUILD_DS_EXT_COMM_CUDA DS_BUILD_DS_EXT_COMM_CPU
FUNCS="threshold_select threshold_count scatter_add_ sign_pack sign_unpack sign_pack_segments sign_unpack_segments pack_values torch_version"
fail=0

# the build + import in Python; ds_ext is loaded as a bare package so that only ds_ext/op_builder (torch +
# deepspeed) is imported, not the rest of ds_ext (its dependencies are not in this venv)
PYPRE='
import os, sys, time, types
import torch
torch.cuda.is_available = lambda: True  # else DeepSpeed builds "for CPU": no nvcc flags, no arch list, no PTX
pkg = types.ModuleType("ds_ext"); pkg.__path__ = [os.path.join(os.environ["DS_EXT_REPO"], "ds_ext")]
sys.modules["ds_ext"] = pkg
from ds_ext.op_builder import CommCUDABuilder
'

scan() {  # scan LOG LABEL: any warning / error line in a build log fails the check
  local hits
  hits="$(grep -niE 'warn|error' "$1" | grep -vE '^[0-9]+:\[[0-9]+/[0-9]+\] ' || true)"
  if [ -n "$hits" ]; then
    log "FAIL: $2 build output has warnings/errors ($1):"; echo "$hits" | head -n 60; fail=1
  else
    log "$2 build output: 0 warnings, 0 errors ($(wc -l < "$1") lines in $1)"
  fi
}

content() {  # content SO EXPECT_ARCHS: machine code + PTX in the module
  local so="$1" cuobjdump=""
  for c in "$NV/bin/cuobjdump" "$(command -v cuobjdump || true)"; do [ -n "$c" ] && [ -x "$c" ] && { cuobjdump="$c"; break; }; done
  if [ -n "$cuobjdump" ]; then
    log "cuobjdump --list-elf / --list-ptx $(basename "$so"):"
    "$cuobjdump" --list-elf "$so" | sed 's/^/    /'
    "$cuobjdump" --list-ptx "$so" | sed 's/^/    /'
  else
    log "cuobjdump is not in the toolkit wheel (cuda-toolkit[nvcc,cccl]); the .nv_fatbin headers of $(basename "$so"), read directly:"
  fi
  "$VPY" - "$so" "$2" <<'PY' || fail=1
import struct, sys
so, archs = sys.argv[1], sys.argv[2]
data = open(so, "rb").read()
# ELF64 section headers -> .nv_fatbin
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
def sh(i):
    name, typ, flags, addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    return name, off, size
_, stroff, _ = sh(shstrndx)
fat = None
for i in range(shnum):
    name, off, size = sh(i)
    if data[stroff + name:data.index(b"\0", stroff + name)] == b".nv_fatbin":
        fat = data[off:off + size]
if fat is None:
    sys.exit("no .nv_fatbin section: no device code at all")
elf, ptx, pos = set(), set(), 0
while pos + 16 <= len(fat):
    magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", fat, pos)
    if magic != 0xBA55ED50:
        pos += 8  # sections are 8-byte aligned; skip padding
        continue
    e, end = pos + hsize, pos + hsize + fsize
    while e < end:
        kind, _u, ehsize, psize = struct.unpack_from("<HHIQ", fat, e)
        arch, = struct.unpack_from("<I", fat, e + 28)
        (ptx if kind == 1 else elf).add(arch)
        e += ehsize + psize
    pos = end
print("    fatbin: machine code (ELF) for " + ", ".join(f"sm_{a}" for a in sorted(elf))
      + "; PTX for " + (", ".join(f"compute_{a}" for a in sorted(ptx)) or "nothing"))
want = {}
for tok in archs.replace(" ", ";").split(";"):
    if tok:
        base = tok.upper().replace("+PTX", "")
        want[int(base.replace(".", ""))] = want.get(int(base.replace(".", "")), False) or tok.upper().endswith("+PTX")
bad = [f"sm_{a} machine code missing" for a in want if a not in elf]
bad += [f"compute_{a} PTX missing" for a, p in want.items() if p and a not in ptx]
if not ptx:
    bad.append("no PTX at all: the module cannot run on GPUs newer than its machine code")
if bad:
    sys.exit("FAIL: " + "; ".join(bad))
print(f"    as asked by {archs!r}: " + ", ".join(f"sm_{a}" + (f" + compute_{a} PTX" if p else "") for a, p in sorted(want.items())))
PY
}

T0=$(date +%s)
export TORCH_EXTENSIONS_DIR="$W/torch_extensions"
rm -rf "$TORCH_EXTENSIONS_DIR"
log "JIT build through ds_ext's op builder: TORCH_CUDA_ARCH_LIST=\"$ARCHS\", MAX_JOBS=$MAX_JOBS," \
    "DS_NVCC_THREADS=$DS_NVCC_THREADS, host flags -Wall -Wextra (log: $W/jit-build.log)"
set +e
TORCH_CUDA_ARCH_LIST="$ARCHS" "$VPY" - > "$W/jit-build.log" 2>&1 <<PY
$PYPRE
b = CommCUDABuilder()
probs = b.problems()
assert not probs, probs
t = time.time()
m = b.jit_load(verbose=True)  # always compiles: TORCH_EXTENSIONS_DIR was wiped
print(f"[check] built {b.name} in {time.time() - t:.0f} s -> {m.__file__}")
missing = [f for f in "$FUNCS".split() if not hasattr(m, f)]
assert not missing, f"the module lacks {missing}"
print(f"[check] imported {m.__name__}: device={m.device!r}, torch_version()={m.torch_version()},"
      f" functions: {', '.join('$FUNCS'.split())}")
open(os.path.join("$W", "jit-so.txt"), "w").write(m.__file__)
PY
rc=$?
set -e
T_BUILD=$(( $(date +%s) - T0 ))
if [ $rc -ne 0 ]; then
  log "FAIL: the JIT build / import exited $rc after $T_BUILD s; the end of $W/jit-build.log:"
  tail -n 60 "$W/jit-build.log"; exit 1
fi
grep '^\[check\]' "$W/jit-build.log" | sed 's/^\[check\] /[cuda-build-check] /'
scan "$W/jit-build.log" "JIT"
content "$(cat "$W/jit-so.txt")" "$ARCHS"
log "JIT build + checks: $T_BUILD s"

if [ "$PREBUILT" = 1 ]; then
  T0=$(date +%s)
  rm -rf "$W/prebuilt"
  log "setup.py route: DS_BUILD_DS_EXT_COMM_CUDA=1 python setup.py build_ext, TORCH_CUDA_ARCH_LIST unset," \
      "the install's flags (log: $W/prebuilt-build.log)"
  set +e
  (cd "$ROOT" && env -u TORCH_CUDA_ARCH_LIST -u DS_EXT_NVCC_FLAGS -u DS_EXT_CXX_FLAGS DS_BUILD_DS_EXT_COMM_CUDA=1 \
     "$VPY" - > "$W/prebuilt-build.log" 2>&1 <<PY
$PYPRE
from ds_ext.op_builder import install_ext_modules
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
exts = install_ext_modules()
print("[check] TORCH_CUDA_ARCH_LIST for the prebuilt op:", os.environ.get("TORCH_CUDA_ARCH_LIST"))
setup(name="ds_ext_cuda_check", ext_modules=exts, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
      script_args=["build_ext", "--build-lib", "$W/prebuilt/lib", "--build-temp", "$W/prebuilt/tmp"])
PY
  )
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    log "FAIL: the setup.py build exited $rc; the end of $W/prebuilt-build.log:"; tail -n 60 "$W/prebuilt-build.log"; exit 1
  fi
  grep '^\[check\]' "$W/prebuilt-build.log" | sed 's/^\[check\] /[cuda-build-check] /'
  scan "$W/prebuilt-build.log" "setup.py"
  so="$(ls "$W"/prebuilt/lib/ds_ext/op_builder/ds_ext_comm_cuda*.so)"
  content "$so" "8.0;9.0+PTX"
  "$VPY" - "$so" "$FUNCS" <<'PY' || fail=1
import importlib.util, sys
import torch  # noqa: F401  (the module links against torch's libraries)
spec = importlib.util.spec_from_file_location("ds_ext_comm_cuda", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
missing = [f for f in sys.argv[2].split() if not hasattr(m, f)]
if missing:
    sys.exit(f"[cuda-build-check] FAIL: the prebuilt module lacks {missing}")
print(f"[cuda-build-check] imported the prebuilt ds_ext.op_builder.ds_ext_comm_cuda: device={m.device!r}, "
      f"torch_version()={m.torch_version()}, all {len(sys.argv[2].split())} functions present")
PY
  log "setup.py build + checks: $(( $(date +%s) - T0 )) s"
fi

if [ $fail -ne 0 ]; then
  log "FAILED after $(( $(date +%s) - T_START )) s"; exit 1
fi
log "OK: compiled cleanly, $(( $(date +%s) - T_START )) s in all (JIT build $T_BUILD s)"
