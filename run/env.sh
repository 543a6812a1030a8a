# Sourced by the run/ scripts: pick DeepSpeed's CPU accelerator (gloo) when there is no GPU.
if [ -z "${DS_ACCELERATOR:-}" ]; then
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=cpu
  fi
fi
# JIT builds (DeepSpeed's deepspeed_shm_comm, ds_ext's op) go to a torch extensions directory inside the venv
# ($PY's, from run/setup.sh, else the active $VIRTUAL_ENV) unless TORCH_EXTENSIONS_DIR is set: a build killed in
# one venv (torch's lock file left behind) never blocks another venv's start-up. tests/conftest.py does the same.
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
  _ds_ext_venv="${VIRTUAL_ENV:-}"
  if [ -n "${PY:-}" ] && [ -f "$(dirname "$(dirname "$PY")")/pyvenv.cfg" ]; then
    _ds_ext_venv="$(cd "$(dirname "$(dirname "$PY")")" && pwd)"
  fi
  if [ -n "$_ds_ext_venv" ]; then
    export TORCH_EXTENSIONS_DIR="$_ds_ext_venv/torch_extensions"
  fi
  unset _ds_ext_venv
fi
# Do not let every rank spin OpenMP threads on all cores of a small machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ds_ext_free_port() {
  "${PY:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# ds_ext_launch NPROC ARGS...: exec the venv's deepspeed launcher ($PY from run/setup.sh) on a free port,
# on every slot of $hostfile when it is set (the file must exist), else on NPROC local processes.
ds_ext_launch() {
  local n="$1"; shift
  local where=(--num_gpus "$n")
  if [ -n "${hostfile:-}" ]; then
    if [ ! -f "$hostfile" ]; then
      echo "no hostfile at $hostfile: copy hostfile.example, one 'host slots=N' line per node (or set hostfile=PATH)" >&2
      exit 2
    fi
    where=(--hostfile "$hostfile")
  fi
  exec "$(dirname "$PY")/deepspeed" "${where[@]}" --master_port "$(ds_ext_free_port)" "$@"
}
