"""Process-group start-up shared by the trainer, the benchmarks and the tests.

DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) creates one ~66 MB POSIX shared-memory segment
per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, whenever all
ranks are local (``LOCAL_SIZE`` == world size, which its launcher sets), for its shared-memory
``inference_all_reduce``; it never unlinks them, so every run leaves ~66 MB x ranks of RAM behind
(seen: 348 leftovers held 23 of 24 GB on a CI-sized machine). ``init_distributed`` waits until every
rank has mapped every peer's segment (a barrier after DeepSpeed's start-up, which opens them all) and
then unlinks this rank's name: the mappings stay valid for the life of the processes and nothing is
left in /dev/shm afterwards, even after a crash.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional


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
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def init_distributed(timeout_s: Optional[float] = None, backend: Optional[str] = None) -> None:
    """``deepspeed.init_distributed`` (with a collective timeout) without leaving shm behind."""
    import deepspeed

    kw = {}
    if timeout_s is not None:
        kw["timeout"] = timedelta(seconds=timeout_s)
    if backend is not None:
        kw["dist_backend"] = backend
    deepspeed.init_distributed(**kw)
    release_shm_names()
