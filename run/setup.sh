#!/usr/bin/env bash
# Install ds_ext into .venv (created if absent) and print the interpreter path on the last line.
#
#   bash run/setup.sh            # idempotent: re-installs only when setup.cfg / pyproject.toml changed
#
# Environment knobs:
#   DS_EXT_VENV=path          venv location (default: <repo>/.venv)
#   DS_EXT_PYTHON=python3     interpreter used to create the venv
#   DS_EXT_TORCH="torch==X"   torch requirement used when no torch is importable
#                             (default: torch==2.13.0 on a machine without a GPU, plain `torch` with one)
#   DS_EXT_FFCV=0             skip ffcv (the FFCV ImageNet loaders); default 1
#   DS_BUILD_OPS=1            prebuild every compatible compiled op at install (DeepSpeed's convention;
#                             DS_BUILD_DS_EXT_COMM_CPU=1 / DS_BUILD_DS_EXT_COMM_CUDA=1: that op, or fail);
#                             default: ops are JIT-built on first use, or torch code is used (ds_ext.report)
#   DS_EXT_CLUSTER_TOOLS=0    skip openssh-server, pdsh, iproute2 (only run/cluster.sh needs them); default 1
# ffcv 1.0.2 (the `ffcv` extra) builds from source against Debian's libopencv-dev libturbojpeg0-dev
# pkg-config. As root, missing ones are installed with apt-get; otherwise the script names them and the
# command to install them, and installs everything else (ffcv_imagenet then raises an ImportError).
# The emulated cluster (run/cluster.sh) needs openssh-server, pdsh and iproute2: installed the same way
# as root, named with the command otherwise (nothing else depends on them).
# An already installed torch (CPU or CUDA build) is never replaced: when the creating interpreter
# already imports torch, the venv is made with --system-site-packages so that build is reused.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DS_EXT_VENV:-$ROOT/.venv}"
BASE_PY="${DS_EXT_PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

if ! command -v "$BASE_PY" >/dev/null 2>&1; then
  log "error: '$BASE_PY' not found; install Python >= 3.10 or set DS_EXT_PYTHON"; exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  opts=()
  if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
    log "reusing the torch already installed for $BASE_PY (venv with --system-site-packages)"
    opts+=(--system-site-packages)
  fi
  log "creating $VENV"
  "$BASE_PY" -m venv "${opts[@]}" "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || log "warning: could not upgrade pip (continuing)"
fi
PY="$VENV/bin/python"
# pip's output is shown only when it fails
pip_install() {
  local out
  out="$(mktemp)"
  if "$PY" -m pip install --disable-pip-version-check "$@" >"$out" 2>&1; then rm -f "$out"; return 0; fi
  grep -v "is ignored" "$out" >&2; rm -f "$out"
  log "error: pip install $* failed (output above)"; return 1
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    req="${DS_EXT_TORCH:-torch}"; log "GPU found: installing $req"
  else
    req="${DS_EXT_TORCH:-torch==2.13.0}"; log "no torch and no GPU: installing $req (CPU build where the index provides one)"
  fi
  pip_install "$req"
  "$PY" -c "import torch" >/dev/null 2>&1 || { log "error: torch did not install"; exit 1; }
fi

# --- system packages (Debian names) ---------------------------------------------------------------
# ffcv builds against FFCV_PKGS; run/cluster.sh (the emulated multi-host cluster) needs CLUSTER_PKGS:
# sshd for each emulated host, pdsh (DeepSpeed's default multi-node runner), ip / tc.
FFCV_PKGS=(libopencv-dev libturbojpeg0-dev pkg-config)
CLUSTER_PKGS=(openssh-server pdsh iproute2)
deb_missing() {  # prints those of the named Debian packages that are not installed (all when dpkg is absent)
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
wanted=()
[ "${DS_EXT_FFCV:-1}" != "0" ] && wanted+=("${FFCV_PKGS[@]}")
[ "${DS_EXT_CLUSTER_TOOLS:-1}" != "0" ] && wanted+=("${CLUSTER_PKGS[@]}")
if [ "${#wanted[@]}" -gt 0 ]; then
  mapfile -t missing < <(deb_missing "${wanted[@]}")
  if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages: ${missing[*]} (apt-get)"
    out="$(mktemp)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$out" 2>&1; then
      # a fresh machine may have no package lists yet
      DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$out" 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$out" 2>&1 || cat "$out" >&2
    fi
    rm -f "$out"
  fi
fi
with_ffcv=0
if [ "${DS_EXT_FFCV:-1}" != "0" ]; then
  mapfile -t missing < <(deb_missing "${FFCV_PKGS[@]}")
  if [ "${#missing[@]}" -eq 0 ]; then
    with_ffcv=1
  else
    log "warning: ffcv (FFCV ImageNet loaders) is not installed: missing Debian packages: ${missing[*]}"
    log "  install them with:  sudo apt-get install -y ${missing[*]}   then re-run: bash run/setup.sh"
    log "  (continuing without ffcv; everything else works, ffcv_imagenet raises an ImportError)"
  fi
fi
if [ "${DS_EXT_CLUSTER_TOOLS:-1}" != "0" ]; then
  mapfile -t missing < <(deb_missing "${CLUSTER_PKGS[@]}")
  if [ "${#missing[@]}" -gt 0 ]; then
    log "warning: the emulated cluster (run/cluster.sh, run/bench-cluster.sh) needs Debian packages: ${missing[*]}"
    log "  install them with:  sudo apt-get install -y ${missing[*]}   (continuing: nothing else needs them)"
  fi
fi

# --- prebuilt ops: DS_BUILD_OPS=1 or DS_BUILD_DS_EXT_COMM_{CPU,CUDA}=1 compile ds_ext/csrc at install ---------
# (setup.py; the build needs the installed torch and deepspeed, so no build isolation)
build_vars="$(env | grep -E '^DS_BUILD_[A-Z0-9_]+=' | grep -vE '=(0|)$' | sort || true)"
ext_opts=()
if [ -n "$build_vars" ]; then
  log "prebuilding ops at install ($(echo $build_vars)): pip install --no-build-isolation"
  ext_opts=(--no-build-isolation)
  pip_install setuptools wheel ninja
  if ! "$PY" -c "import ds_ext.op_builder" >/dev/null 2>&1; then  # the build imports torch, deepspeed, ds_ext
    log "installing the dependencies first (pip install -e .[test] without DS_BUILD_*)"
    ( for v in $(echo "$build_vars" | cut -d= -f1); do unset "$v"; done; pip_install -e "$ROOT[test]" )
  fi
fi

stamp="$VENV/.ds_ext-setup-stamp"
want="$( (cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/setup.py"; echo "ffcv=$with_ffcv"; echo "$build_vars") | sha256sum | cut -c1-16)"
check="import ds_ext, deepspeed, matplotlib"  # matplotlib: from the test extra (the benchmarks' plots), re-installed when missing
[ "$with_ffcv" = 1 ] && check="$check, importlib.util; assert importlib.util.find_spec('ffcv')"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! "$PY" -c "$check" >/dev/null 2>&1; then
  if [ "$with_ffcv" = 1 ]; then
    log "installing ds_ext and its dependencies (pip install -e .[test,ffcv]; ffcv builds from source)"
    if ! pip_install ${ext_opts[@]+"${ext_opts[@]}"} -e "$ROOT[test,ffcv]"; then
      log "warning: the install with ffcv failed (output above); installing without it"
      with_ffcv=0
      want="$( (cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/setup.py"; echo "ffcv=0"; echo "$build_vars") | sha256sum | cut -c1-16)"
      pip_install ${ext_opts[@]+"${ext_opts[@]}"} -e "$ROOT[test]"
    fi
  else
    log "installing ds_ext and its dependencies (pip install -e .[test])"
    pip_install ${ext_opts[@]+"${ext_opts[@]}"} -e "$ROOT[test]"
  fi
  "$PY" -c "import ds_ext, deepspeed, torch" >/dev/null 2>&1 || { log "error: ds_ext does not import after install"; exit 1; }
  if [ "$with_ffcv" = 1 ] && ! "$PY" -c "import ffcv.loader" >/dev/null 2>&1; then
    log "warning: ffcv was installed but does not import: $("$PY" -c 'import ffcv.loader' 2>&1 | tail -n 1)"
  fi
  echo "$want" > "$stamp"
fi
log "$("$PY" -c 'import torch, deepspeed; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, cuda {torch.cuda.is_available()}")' 2>/dev/null | tail -n 1)"
echo "$PY"
