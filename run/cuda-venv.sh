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
# ds_ext_make_venv BASE_PY VENV [--system-site-packages]
#                                    python -m venv; where that fails (no venv/ensurepip module, as on images
#                                    without python3-venv): offline (DS_EXT_WHEELS set) venv --without-pip and
#                                    pip bootstrapped from the carried pip wheel, online virtualenv from `pip
#                                    install --user virtualenv`. A reused venv must match --system-site-packages
# ds_ext_pip VPY ARGS...             the venv's pip, --isolated (a pip.conf or PIP_* naming a CPU torch index
#                                    must not win; DS_EXT_PIP_ISOLATED=0 lets a mirror configuration through);
#                                    with DS_EXT_WHEELS set: --no-index --find-links $DS_EXT_WHEELS (offline)
# ds_ext_index_url                   the index a reachability probe checks: $PIP_INDEX_URL when pip sees it
#                                    (DS_EXT_PIP_ISOLATED=0), else https://pypi.org/simple
# ds_ext_index_reachable BASE_PY     0 when <index>/pip/ answers within 5 s (8 s hard limit: DNS included)
# ds_ext_cuda_install VPY [REQ...]   torch; then the toolkit and ninja; then deepspeed and REQ... with the torch
#                                    pin repeated (the order run/cuda-build-check.sh has always used)
# ds_ext_offline_install VPY [REQ...] [-- OPTIONAL...]   (DS_EXT_WHEELS set) never torch: deepspeed --no-deps,
#                                    then deepspeed's own requirements but torch, and REQ..., from the wheels
#                                    or the host's site-packages; each OPTIONAL alone, a missing one only noted;
#                                    fails when the venv's torch is not the host's CUDA build afterwards
# ds_ext_find_nvcc VPY [TORCH_CUDA]  prints the toolkit root of a usable nvcc (DS_EXT_GPU_NVCC=PATH|none,
#                                    CUDA_HOME, nvcc on PATH, /usr/local/cuda, the host's pip toolkit) whose
#                                    CUDA major equals the torch's; returns 1 with the reason on stdout
# ds_ext_cuda_toolchain VPY LINKDIR [ROOT]  checks the venv's torch is a CUDA build and ROOT/bin/nvcc is there
#                                    (ROOT: the venv's pip toolkit, <site-packages>/nvidia/cu13); finds
#                                    libcudart.so (the op's link step asks for -lcudart) or, where the toolkit
#                                    ships only libcudart.so.N (pip), links it into LINKDIR; exports CUDA_HOME,
#                                    PATH, LIBRARY_PATH; sets NV (the toolkit's root). Returns 1 with a message.
DS_EXT_CUDA_TORCH_REQ="${DS_EXT_CUDA_TORCH_REQ:-torch==2.13.0}"
DS_EXT_CUDA_TK_REQ="${DS_EXT_CUDA_TK_REQ:-cuda-toolkit[nvcc,cccl]==13.0.3.0}"
DS_EXT_CUDA_DS_REQ="${DS_EXT_CUDA_DS_REQ:-deepspeed==0.19.8}"

_cuda_venv_log() { echo "[cuda-venv] $*" >&2; }

_cuda_venv_host_torch() {  # BASE_PY VENV: where BASE_PY is itself a venv, --system-site-packages gives its base
  local base="$1" venv="$2" dir site  # interpreter's site-packages, not BASE_PY's: add the dir of BASE_PY's torch
  [ -n "${3:-}" ] || return 0
  "$venv/bin/python" -c 'import torch' 2>/dev/null && return 0
  dir="$("$base" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)" || return 0
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  echo "$dir" >"$site/_ds_ext_host_torch.pth"  # after the venv's own site-packages: what the venv installs wins
  _cuda_venv_log "the venv does not see the torch of $base by itself: added $dir (_ds_ext_host_torch.pth)"
}

ds_ext_make_venv() {
  local base="$1" venv="$2" sys="${3:-}" existed=0 whl="${DS_EXT_WHEELS:-}" pipwhl
  if [ -x "$venv/bin/python" ]; then
    local has=false; grep -qi '^include-system-site-packages *= *true' "$venv/pyvenv.cfg" 2>/dev/null && has=true
    if [ "$has" = "$([ -n "$sys" ] && echo true || echo false)" ]; then return 0; fi
    _cuda_venv_log "error: the venv $venv exists with include-system-site-packages=$has, this install needs the other; remove it or set DS_EXT_GPU_VENV"
    return 1
  fi
  [ -e "$venv" ] && existed=1
  if "$base" -m venv $sys "$venv" 2>/dev/null && [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    _cuda_venv_host_torch "$base" "$venv" "$sys"; return
  fi
  [ "$existed" = 0 ] && rm -rf "$venv"  # a half-made venv of ours (never a directory that was there before)
  pipwhl="$(ls "$whl"/pip-*.whl 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$whl" ] && [ -n "$pipwhl" ]; then  # offline: no ensurepip here (python3-venv missing): pip from its wheel
    _cuda_venv_log "$base -m venv (with pip) is unavailable here: venv --without-pip, pip from $pipwhl"
    if "$base" -m venv --without-pip $sys "$venv" && "$venv/bin/python" "$pipwhl/pip" install --quiet --no-index \
         --find-links "$whl" "$pipwhl" && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
      _cuda_venv_host_torch "$base" "$venv" "$sys"; return
    fi
    [ "$existed" = 0 ] && rm -rf "$venv"
  fi
  if [ -n "$whl" ] && ! "$base" -m virtualenv --version >/dev/null 2>&1; then
    _cuda_venv_log "error: offline, $base -m venv does not work here$([ -n "$pipwhl" ] && echo " (nor with pip from $pipwhl)" || echo " (and $whl has no pip wheel: bash run/gpu-check.sh --fetch-wheels)"), and there is no virtualenv"
    return 1
  fi
  _cuda_venv_log "$base -m venv is unavailable here: creating $venv with virtualenv (pip install --user virtualenv)"
  "$base" -m virtualenv --version >/dev/null 2>&1 \
    || "$base" -m pip install --quiet --user virtualenv \
    || "$base" -m pip install --quiet --user --break-system-packages virtualenv \
    || { _cuda_venv_log "error: neither venv nor virtualenv works for $base (and pip could not install virtualenv)"; return 1; }
  "$base" -m virtualenv --quiet $sys "$venv" && _cuda_venv_host_torch "$base" "$venv" "$sys"
}

ds_ext_pip() {
  local vpy="$1"; shift
  local pip=("$vpy" -m pip --disable-pip-version-check)
  [ "${DS_EXT_PIP_ISOLATED:-1}" = 1 ] && pip+=(--isolated)
  local cert="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
  [ -f "$cert" ] && pip+=(--cert "$cert")
  if [ -n "${DS_EXT_WHEELS:-}" ] && [ "${1:-}" = install ]; then shift; pip+=(install --no-index --find-links "$DS_EXT_WHEELS"); fi
  "${pip[@]}" "$@"
}

ds_ext_index_url() {
  if [ "${DS_EXT_PIP_ISOLATED:-1}" != 1 ] && [ -n "${PIP_INDEX_URL:-}" ]; then echo "${PIP_INDEX_URL%/}"; else
    echo "https://pypi.org/simple"; fi
}

ds_ext_index_reachable() {
  timeout -k 1 8 "$1" -c 'import os, ssl, sys, urllib.request
cafile = os.environ.get("SSL_CERT_FILE") or None
ctx = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
urllib.request.urlopen(sys.argv[1] + "/pip/", timeout=5, context=ctx).read(1)' "$(ds_ext_index_url)" >/dev/null 2>&1
}

ds_ext_cuda_install() {
  local vpy="$1"; shift
  ds_ext_pip "$vpy" install --quiet "$DS_EXT_CUDA_TORCH_REQ" || return 1
  ds_ext_pip "$vpy" install --quiet "$DS_EXT_CUDA_TK_REQ" ninja || return 1
  DS_BUILD_OPS=0 ds_ext_pip "$vpy" install --quiet "$DS_EXT_CUDA_TORCH_REQ" "$DS_EXT_CUDA_DS_REQ" "$@"
}

ds_ext_offline_install() {
  local vpy="$1" r opt=0 reqs=() opts=() deps=() before after
  shift
  for r in "$@"; do if [ "$r" = -- ]; then opt=1; elif [ "$opt" = 0 ]; then reqs+=("$r"); else opts+=("$r"); fi; done
  [ -d "${DS_EXT_WHEELS:-}" ] || { _cuda_venv_log "error: no wheel directory (DS_EXT_WHEELS=${DS_EXT_WHEELS:-}): bash run/gpu-check.sh --fetch-wheels on a networked machine, then carry .whl"; return 1; }
  before="$("$vpy" -c 'import torch; print(torch.__file__, torch.__version__, torch.version.cuda or "")' 2>/dev/null)"
  [ -n "$before" ] && [ -n "$(echo "$before" | cut -d' ' -f3)" ] \
    || { _cuda_venv_log "error: $vpy does not see a CUDA torch of the host (${before:-no torch})"; return 1; }
  ds_ext_pip "$vpy" install --quiet --no-deps "$DS_EXT_CUDA_DS_REQ" \
    || { _cuda_venv_log "error: $DS_EXT_CUDA_DS_REQ is not in $DS_EXT_WHEELS: bash run/gpu-check.sh --fetch-wheels"; return 1; }
  while IFS= read -r r; do [ -n "$r" ] && deps+=("$r"); done < <("$vpy" -c '
import importlib.metadata as m, re
for r in m.requires("deepspeed") or []:
    if "extra ==" not in r.replace("extra==", "extra ==") and re.split(r"[^A-Za-z0-9_.-]", r, 1)[0].lower() != "torch":
        print(r)')
  ds_ext_pip "$vpy" install --quiet "${deps[@]}" "${reqs[@]}" \
    || { _cuda_venv_log "error: not all of ${deps[*]} ${reqs[*]} are in $DS_EXT_WHEELS or the host's site-packages (bash run/gpu-check.sh --fetch-wheels)"; return 1; }
  for r in "${opts[@]}"; do
    ds_ext_pip "$vpy" install --quiet "$r" >/dev/null 2>&1 \
      || _cuda_venv_log "note: $r is not installed (neither in $DS_EXT_WHEELS nor the host's site-packages): the steps that need it SKIP"
  done
  after="$("$vpy" -c 'import torch; print(torch.__file__, torch.__version__, torch.version.cuda or "")' 2>/dev/null)"
  [ "$after" = "$before" ] || { _cuda_venv_log "error: the install changed torch ($before -> ${after:-none})"; return 1; }
  _cuda_venv_log "offline install done; torch of the host: $after"
}

ds_ext_find_nvcc() {
  local vpy="$1" c nv root here tcuda="${2:-}" why="" cands=()
  [ -n "$tcuda" ] || tcuda="$("$vpy" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
  if [ "${DS_EXT_GPU_NVCC:-}" = none ]; then echo "DS_EXT_GPU_NVCC=none"; return 1; fi
  if [ -n "${DS_EXT_GPU_NVCC:-}" ]; then cands=("$DS_EXT_GPU_NVCC"); else
    [ -n "${CUDA_HOME:-}" ] && cands+=("$CUDA_HOME/bin/nvcc")
    c="$(command -v nvcc 2>/dev/null)" && cands+=("$c")
    cands+=(/usr/local/cuda/bin/nvcc)
    while IFS= read -r c; do cands+=("$c"); done < <("$vpy" -c '
import os, sys
for p in sys.path:
    for t in ["nvidia/cu13", "nvidia/cuda_nvcc", "nvidia/cu12"]:
        if os.path.isfile(os.path.join(p, t, "bin", "nvcc")):
            print(os.path.join(p, t, "bin", "nvcc"))' 2>/dev/null)
  fi
  for c in "${cands[@]}"; do
    [ -x "$c" ] || continue
    here="$("$c" --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)"  # a wrapper script's too
    [ -n "$here" ] || here="$(dirname "$(readlink -f "$c")")"
    root="$(cd "$here/.." && pwd)"
    nv="$("$c" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -n 1)"
    if [ -n "$tcuda" ] && [ "${nv%%.*}" != "${tcuda%%.*}" ]; then
      why="$c is CUDA ${nv:-?}, the torch is CUDA $tcuda (torch builds only with the same major)"; continue
    fi
    echo "$root"; return 0
  done
  [ -n "$why" ] || why="none at \$CUDA_HOME/bin, on PATH, at /usr/local/cuda/bin or in a pip toolkit of the host"
  echo "$why"
  return 1
}

ds_ext_cuda_toolchain() {
  local vpy="$1" linkdir="$2" site cudart d libdir=""
  if [ -n "${3:-}" ]; then NV="$3"; else
    site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    NV="$site/nvidia/cu13"
  fi
  [ -x "$NV/bin/nvcc" ] || { _cuda_venv_log "error: no nvcc at $NV/bin/nvcc (cuda-toolkit[nvcc] did not install it?)"; return 1; }
  "$vpy" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
    || { _cuda_venv_log "error: the torch of $vpy is not a CUDA build ($("$vpy" -c 'import torch; print(torch.__version__)'))"; return 1; }
  for d in "$NV/lib64" "$NV/lib" "$NV/targets/x86_64-linux/lib" "$NV/lib/x86_64-linux-gnu"; do
    [ -e "$d/libcudart.so" ] && { libdir="$d"; break; }  # a system toolkit: nothing to link
  done
  if [ -z "$libdir" ]; then  # the pip runtime ships only libcudart.so.N
    cudart="$(ls "$NV"/lib/libcudart.so.* "$NV"/lib64/libcudart.so.* "$NV"/targets/x86_64-linux/lib/libcudart.so.* 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$cudart" ] || { _cuda_venv_log "error: no libcudart.so* under $NV/lib, lib64 or targets/x86_64-linux/lib"; return 1; }
    mkdir -p "$linkdir" && ln -sf "$cudart" "$linkdir/libcudart.so" && libdir="$linkdir"
  fi
  export CUDA_HOME="$NV" PATH="$NV/bin:$(dirname "$vpy"):$PATH" LIBRARY_PATH="$libdir${LIBRARY_PATH:+:$LIBRARY_PATH}"
}
