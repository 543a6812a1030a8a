# Sourced (not run) by run/cuda-build-check.sh and run/gpu-check.sh: the pinned CUDA stack from PyPI in a
# virtualenv of its own, and the toolchain environment that builds ds_ext's CUDA op with it.
#
#   DS_EXT_CUDA_TORCH_REQ  torch==2.13.0: PyPI's default torch 2.13.0 wheel is the CUDA 13.0 build (needs an
#                          R580+ driver); run/setup.sh pins the same version for CPU machines
#   DS_EXT_CUDA_TK_REQ     cuda-toolkit[nvcc,cccl]==13.0.3.0: nvcc, crt, nvvm and cccl as wheels, under
#                          <site-packages>/nvidia/cu13 (no system CUDA toolkit needed)
#   DS_EXT_CUDA_DS_REQ     deepspeed==0.19.8: inside setup.cfg's window (>=0.19,<0.20) and the ZeRO bridge's
#                          ZERO_BRIDGE_DEEPSPEED (ds_ext/deepspeed/zero.py); installed with DS_BUILD_OPS=0 and
#                          after torch, so that its own torch requirement is already met (no second torch)
#
# ds_ext_make_venv BASE_PY VENV      python -m venv; where that fails (no venv/ensurepip module, as on images
#                                    without python3-venv), virtualenv from `pip install --user virtualenv`
# ds_ext_pip VPY ARGS...             the venv's pip, --isolated (a pip.conf or PIP_* naming a CPU torch index
#                                    must not win; DS_EXT_PIP_ISOLATED=0 lets a mirror configuration through)
# ds_ext_cuda_install VPY [REQ...]   torch; then the toolkit and ninja; then deepspeed and REQ... with the torch
#                                    pin repeated (the order run/cuda-build-check.sh has always used)
# ds_ext_cuda_toolchain VPY LINKDIR  checks the venv's torch is a CUDA build and nvcc is there; links an
#                                    unversioned libcudart.so into LINKDIR (the pip runtime ships only
#                                    libcudart.so.13; the op's link step asks for -lcudart); exports CUDA_HOME,
#                                    PATH, LIBRARY_PATH; sets NV (the toolkit's root). Returns 1 with a message.
DS_EXT_CUDA_TORCH_REQ="${DS_EXT_CUDA_TORCH_REQ:-torch==2.13.0}"
DS_EXT_CUDA_TK_REQ="${DS_EXT_CUDA_TK_REQ:-cuda-toolkit[nvcc,cccl]==13.0.3.0}"
DS_EXT_CUDA_DS_REQ="${DS_EXT_CUDA_DS_REQ:-deepspeed==0.19.8}"

_cuda_venv_log() { echo "[cuda-venv] $*" >&2; }

ds_ext_make_venv() {
  local base="$1" venv="$2" existed=0
  [ -x "$venv/bin/python" ] && return 0
  [ -e "$venv" ] && existed=1
  if "$base" -m venv "$venv" 2>/dev/null && [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  [ "$existed" = 0 ] && rm -rf "$venv"  # a half-made venv of ours (never a directory that was there before)
  _cuda_venv_log "$base -m venv is unavailable here: creating $venv with virtualenv (pip install --user virtualenv)"
  "$base" -m virtualenv --version >/dev/null 2>&1 \
    || "$base" -m pip install --quiet --user virtualenv \
    || "$base" -m pip install --quiet --user --break-system-packages virtualenv \
    || { _cuda_venv_log "error: neither venv nor virtualenv works for $base (and pip could not install virtualenv)"; return 1; }
  "$base" -m virtualenv --quiet "$venv"
}

ds_ext_pip() {
  local vpy="$1"; shift
  local pip=("$vpy" -m pip --disable-pip-version-check)
  [ "${DS_EXT_PIP_ISOLATED:-1}" = 1 ] && pip+=(--isolated)
  local cert="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
  [ -f "$cert" ] && pip+=(--cert "$cert")
  "${pip[@]}" "$@"
}

ds_ext_cuda_install() {
  local vpy="$1"; shift
  ds_ext_pip "$vpy" install --quiet "$DS_EXT_CUDA_TORCH_REQ" || return 1
  ds_ext_pip "$vpy" install --quiet "$DS_EXT_CUDA_TK_REQ" ninja || return 1
  DS_BUILD_OPS=0 ds_ext_pip "$vpy" install --quiet "$DS_EXT_CUDA_TORCH_REQ" "$DS_EXT_CUDA_DS_REQ" "$@"
}

ds_ext_cuda_toolchain() {
  local vpy="$1" linkdir="$2" site cudart
  site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  NV="$site/nvidia/cu13"
  [ -x "$NV/bin/nvcc" ] || { _cuda_venv_log "error: no nvcc at $NV/bin/nvcc (cuda-toolkit[nvcc] did not install it?)"; return 1; }
  "$vpy" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
    || { _cuda_venv_log "error: the torch of $vpy is not a CUDA build ($("$vpy" -c 'import torch; print(torch.__version__)'))"; return 1; }
  cudart="$(ls "$NV"/lib/libcudart.so.* 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$cudart" ] || { _cuda_venv_log "error: no libcudart.so.* under $NV/lib"; return 1; }
  mkdir -p "$linkdir" && ln -sf "$cudart" "$linkdir/libcudart.so"
  export CUDA_HOME="$NV" PATH="$NV/bin:$(dirname "$vpy"):$PATH" LIBRARY_PATH="$linkdir${LIBRARY_PATH:+:$LIBRARY_PATH}"
}
