"""Process-group start-up shared by the trainer, the benchmarks and the tests.

DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) creates one ~66 MB POSIX shared-memory segment
per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, whenever all
ranks are local (``LOCAL_SIZE`` == world size, which its launcher sets), for its shared-memory
``inference_all_reduce``; it never unlinks them, so every run leaves ~66 MB x ranks of RAM behind
(seen: 348 leftovers held 23 of 24 GB on a CI-sized machine). ``init_distributed`` waits until every
rank has mapped every peer's segment (a barrier after DeepSpeed's start-up, which opens them all) and
then unlinks this rank's name: the mappings stay valid for the life of the processes and nothing is
left in /dev/shm afterwards, even after a crash.

Collective timeout. The trainer passes ``train.collective_timeout_s`` (default 600 s) to
``deepspeed.init_distributed(timeout=...)``, which hands it to ``torch.distributed`` for every
collective of the default process group (measured: with 2 s, a gloo allreduce waiting for a rank that
is still alive but busy fails after 2.0 s with ``Timed out waiting 2000ms for recv operation``).
A dead rank does not wait for it: gloo fails at once when the peer's sockets close, and the peer
watchdog (``ds_ext.faults``) stops every rank within seconds on NCCL too. The timeout therefore only
bounds a rank that is alive but stuck, and must stay longer than the longest legitimate wait at a
collective: rank 0 writing DeepSpeed's files while the others wait at the checkpoint barrier, or one
rank indexing a data set (criteo: about 15 minutes once) while the others wait in DeepSpeed's
start-up broadcast. 600 s (torch's NCCL default, DeepSpeed's default) is kept: ten idle minutes
after a hang, against the risk of killing a healthy run. Raising it just for start-up and lowering
it afterwards is not possible for gloo: ``torch.distributed.distributed_c10d._set_pg_timeout`` did
not change the timeout of an existing gloo group here (still 2.0 s after setting 10 s).
Process groups created later (DS-Sync's groups, ``ds_ext.comm.Communicator.subgroup``) get the same
timeout: ``collective_timeout()`` is passed to ``new_group`` (torch's own default there would be 30 min
for gloo).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

_TIMEOUT: Optional[timedelta] = None  # what init_distributed was given (None: DeepSpeed's default)


def _shm_name(rank: int) -> str:
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names() -> None:
    """Collective. Unlink this rank's DeepSpeed CPU shm segment name once every rank has mapped it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    path = _shm_name(dist.get_rank())
    if not os.path.exists(path):
        return
    from .comm import barrier

    barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def standalone_env(environ=os.environ) -> bool:
    """Run without any launcher (``python -m ds_ext.train ...``, how people debug): then the process
    is rank 0 of a world of 1. Sets the launcher's variables (a free local port) and returns True;
    leaves a launched or MPI-started process alone (returns False). Without this DeepSpeed would try
    MPI discovery and die importing ``mpi4py``."""
    if any(k in environ for k in _LAUNCHER_ENV) or any(k in environ for k in _MPI_ENV):
        return False
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return True


def init_distributed(timeout_s: Optional[float] = None, backend: Optional[str] = None) -> None:
    """``deepspeed.init_distributed`` (with a collective timeout, seconds; DeepSpeed's 10 min or
    ``$DEEPSPEED_TIMEOUT`` minutes when None) without leaving shm behind. Without a launcher the
    process runs as world size 1 (``standalone_env``)."""
    import deepspeed

    standalone_env()

    kw = {}
    if timeout_s is not None:
        kw["timeout"] = timedelta(seconds=timeout_s)
    if backend is not None:
        kw["dist_backend"] = backend
    deepspeed.init_distributed(**kw)
    global _TIMEOUT
    _TIMEOUT = kw.get("timeout")
    release_shm_names()


def collective_timeout() -> Optional[timedelta]:
    """The timeout the default process group was started with here (None when DeepSpeed chose it)."""
    return _TIMEOUT


