# Sourced by the run/ scripts: pick DeepSpeed's CPU accelerator (gloo) when there is no GPU.
if [ -z "${DS_ACCELERATOR:-}" ]; then
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=cpu
  fi
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
