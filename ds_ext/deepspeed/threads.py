"""The CPU thread default: one rule, applied by the trainer (``ds_ext.trainer.loop.train``) and by ``attach``.

When ``OMP_NUM_THREADS`` is unset, every process of a launch would start torch's intra-op pool on all the cores,
so N processes on one host oversubscribe it N times (a 2-process quickstart on 2 cores trained in 42.9 s
against 2.6 s with one thread each; ``torchrun`` sets ``OMP_NUM_THREADS=1`` when it starts more than one process
per node, the ``deepspeed`` launcher sets nothing). The rule: torch's intra-op threads become cores / local ranks,
at least 1 (cores: the CPUs this process may run on; local ranks: ``LOCAL_WORLD_SIZE`` (torchrun, Accelerate),
else ``LOCAL_SIZE`` (the deepspeed launcher), else 1). It only ever lowers the count, once per process, and never
when ``OMP_NUM_THREADS`` is set (the user's choice, honoured by torch itself).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

_done = False


def local_ranks(environ: Mapping[str, str] = os.environ) -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            n = int(environ.get(key, ""))
        except ValueError:
            continue
        if n >= 1:
            return n
    return 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def target_threads(cores: int, local: int) -> int:
    return max(1, cores // max(1, local))


def apply_default(environ: Mapping[str, str] = os.environ, cores: Optional[int] = None) -> Optional[str]:
    """Apply the rule (module docstring) once per process; the sentence to log when it changed the thread count,
    else None."""
    global _done
    if _done or environ.get("OMP_NUM_THREADS"):
        return None
    _done = True
    import torch

    cores = usable_cores() if cores is None else cores
    local = local_ranks(environ)
    want, have = target_threads(cores, local), torch.get_num_threads()
    if have <= want:
        return None
    torch.set_num_threads(want)
    return (f"OMP_NUM_THREADS is unset: torch intra-op threads {have} -> {want} ({cores} cores / {local} local "
            f"rank(s); torchrun sets 1 per process for several per node); set OMP_NUM_THREADS to choose")
