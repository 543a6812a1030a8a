"""Run a function on N real processes joined by gloo through ``deepspeed.init_distributed``.

``run(fn, world_size, **kw)`` spawns fresh interpreters, each setting RANK / WORLD_SIZE / MASTER_*
and calling ``fn(rank, world_size, **kw)``; return values come back per rank. A rank that raises
makes the whole call raise with that rank's traceback (the others are terminated); a run past
``timeout`` seconds is terminated and raises ``TimeoutError``. Nothing sleeps: the parent blocks on
the children's process sentinels.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, outdir, kwargs):
    one_gpu = os.environ.get("DS_EXT_TEST_ONE_GPU") == "1"  # tests/dist/test_gpu.py: every rank on cuda:0
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(0 if one_gpu else rank), WORLD_SIZE=str(world_size),
                      LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ds_ext.comm import init_distributed

    init_distributed(120, backend="gloo")
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Result saved, process group gone: leave without interpreter teardown. Intermittently (1 CI run, 2 of
    # ~40 local runs of tests/dist/test_nonfinite.py) a rank died there with SIGABRT, "terminate called without
    # an active exception" (a C++ thread object destroyed while joinable, after the work was done); that
    # is not what these tests test. An exception in fn still propagates above with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world_size: int = 2, timeout: float = 300, **kwargs):
    outdir = tempfile.mkdtemp(prefix="ds_ext_test_")
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), outdir, kwargs), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout} s")
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# ---- comparing trainer checkpoints (resume tests) ---------------------------------------------------

def load_ckpt(run_dir, tag: str, world: int = 2):
    """``(DeepSpeed model states, [ds_ext state of each rank])`` of ``<run_dir>/checkpoints/<tag>``."""
    d = Path(run_dir) / "checkpoints" / tag
    states = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = [torch.load(d / f"ds_ext_rank{r}.pt", weights_only=False) for r in range(world)]
    return states, ranks


def assert_tree_equal(a, b, path: str = "") -> None:
    """Bit-identical nested state: tensors (dtype and values), numpy arrays, dicts, lists, scalars."""
    import numpy as np

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path
