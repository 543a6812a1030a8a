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
