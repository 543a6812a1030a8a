"""Run a function on N real processes joined by gloo through ``deepspeed.init_distributed``
(``DS_EXT_TEST_BACKEND=nccl``: NCCL instead, as tests/dist/test_gpu.py does at world size 1).

``run(fn, world_size, **kw)`` starts fresh processes, each setting RANK / WORLD_SIZE / MASTER_*
and calling ``fn(rank, world_size, **kw)``; return values come back per rank. They are forked from a
``multiprocessing`` forkserver, a fresh interpreter started once per session that has imported torch,
DeepSpeed, ds_ext and the trainer's modules and nothing else (no process group, no test state; one thread):
each rank skips those imports (about 3 to 6 CPU-s) and gets, as a spawned one does, the parent's environment
and working directory at the call. A call whose start-up variables (``_START_ENV``) differ from the ones the
forkserver started with, a GPU run (``DS_ACCELERATOR`` not ``cpu``, ``DS_EXT_TEST_BACKEND``, ``DS_EXT_TEST_ONE_GPU``:
no fork after imports that may touch CUDA) or ``DS_EXT_TEST_START=spawn`` spawns fresh interpreters instead. Forked ranks share
the forkserver's ``str`` hash seed and numpy's global generator state, where spawned ones draw their own: a
set-iteration order that differs between ranks shows in the pooled ranks (``run_pooled``, spawned) and in the
e2e tests' trainer processes (``python -m ds_ext.train`` per rank, the ``deepspeed`` launcher), not here. A rank that raises
makes the whole call raise with that rank's traceback (the others are terminated); a run past
``timeout`` seconds is terminated and raises ``TimeoutError``. Nothing sleeps: the parent blocks on
the children's process sentinels.

``run_pooled(fn, world_size, **kw)`` is the same call on a pool of ranks that stays up for the whole
session (one pool per world size, as PyTorch's ``MultiProcContinuousTest``): each rank pays
``import torch, deepspeed`` and the process-group start once, then runs one function after another.
Before each call a rank puts back what a fresh interpreter would have (the environment, taken from the
parent at each call, the working directory, torch's default generator state, default dtype,
deterministic flag, thread count and grad mode, DeepSpeed's comms logger). A function that raises on any rank makes the call raise with that
rank's traceback; a rank that dies or a call past ``timeout`` fails with the rank and the reason; in every
failure the pool is torn down and the next call builds a new one. Functions must be importable (module
level in a module under ``tests/``); see tests/README.md for what stays on ``run``.
"""
from __future__ import annotations

import io
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from multiprocessing import connection
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    """The ranks' process-group backend: gloo, or ``$DS_EXT_TEST_BACKEND`` (tests/dist/test_gpu.py: nccl at world 1)."""
    return os.environ.get("DS_EXT_TEST_BACKEND") or "gloo"


class _ParentFd:
    """The parent's file descriptor ``fd`` at the call, passed to a rank as multiprocessing passes descriptors (a
    forkserver child otherwise writes to the forkserver's stdout / stderr: where pytest's capture of the test that
    started the forkserver was)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):  # pickled while the rank is being started: the start method's own descriptor passing
        from multiprocessing import reduction

        return (_detach, (reduction.DupFd(self.fd),))


def _detach(dup) -> int:
    return dup.detach()


def _entry(rank, fn, world_size, port, outdir, kwargs, env=None, cwd=None, fds=None):
    if env is not None:  # the parent's, at the call (a forkserver child starts with the forkserver's)
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for target, fd in zip((1, 2), fds or ()):  # the parent's stdout / stderr at the call (capfd sees the ranks)
        os.dup2(fd, target)
        os.close(fd)
    one_gpu = os.environ.get("DS_EXT_TEST_ONE_GPU") == "1"  # tests/dist/test_gpu.py: every rank on cuda:0
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(0 if one_gpu else rank), WORLD_SIZE=str(world_size),
                      LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ds_ext.comm import init_distributed

    init_distributed(120, backend=_backend())
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


#: what the forkserver of ``run`` imports before it forks ranks: what every rank, and every trainer rank, imports
_PRELOAD = ["torch", "deepspeed", "deepspeed.comm", "ds_ext", "ds_ext.comm", "ds_ext.trainer.cli",
            "ds_ext.trainer.loop", "sklearn.datasets", "torch._dynamo", "tests.harness", "tests.dist.workers"]
_forkserver_env = None  # the start-up variables the session's forkserver was started with


def _start_method() -> str:
    """``forkserver`` when the session's forkserver has (or will have) this call's start-up variables, else
    ``spawn`` (see the module docstring)."""
    global _forkserver_env
    if os.environ.get("DS_EXT_TEST_START", "forkserver") == "spawn":
        return "spawn"
    if os.environ.get("DS_ACCELERATOR") != "cpu" or _backend() != "gloo" or os.environ.get("DS_EXT_TEST_ONE_GPU"):
        return "spawn"  # a GPU: no fork of a process whose imports may have touched CUDA
    now = tuple(os.environ.get(k) for k in _START_ENV)
    if _forkserver_env is None:
        import multiprocessing

        multiprocessing.set_forkserver_preload(_PRELOAD)
        _forkserver_env = now
    return "forkserver" if now == _forkserver_env else "spawn"


def run(fn, world_size: int = 2, timeout: float = 300, **kwargs):
    outdir = tempfile.mkdtemp(prefix="ds_ext_test_")
    method = _start_method()
    sys.stdout.flush()
    sys.stderr.flush()
    fds = (_ParentFd(1), _ParentFd(2)) if method == "forkserver" else None
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), outdir, kwargs, dict(os.environ), os.getcwd(),
                                           fds), nprocs=world_size, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout} s")
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# ---- a pool of ranks kept for the session ----------------------------------------------------------

# read when a rank starts (torch / DeepSpeed import, the accelerator): a pool only serves calls that agree
_START_ENV = ("DS_ACCELERATOR", "DS_EXT_TEST_ONE_GPU", "DS_EXT_TEST_BACKEND", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
              "PYTHONPATH")


def _rank_env(rank, world_size, port, base):
    one_gpu = base.get("DS_EXT_TEST_ONE_GPU") == "1"
    env = dict(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(0 if one_gpu else rank), WORLD_SIZE=str(world_size),
               LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _copied(state: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in state.items()}


def _pool_entry(rank, world_size, port, conn):
    os.environ.update(_rank_env(rank, world_size, port, os.environ))
    import torch.distributed as dist

    from ds_ext.comm import init_distributed

    init_distributed(120, backend=_backend())
    import deepspeed.comm as dcomm

    logger = dcomm.comms_logger  # an engine with "comms_logger" in its config turns it on for the process
    logger_state = _copied(vars(logger))
    cwd, rng = os.getcwd(), torch.random.get_rng_state()
    dtype, det, threads = torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    conn.send_bytes(b"ready")
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            break
        if msg == b"close":
            break
        buf = io.BytesIO()
        try:
            fn, kwargs, env = pickle.loads(msg)
            os.environ.clear()
            os.environ.update(_rank_env(rank, world_size, port, env))
            os.chdir(cwd)
            torch.random.set_rng_state(rng)
            torch.set_default_dtype(dtype)
            torch.use_deterministic_algorithms(det)
            torch.set_num_threads(threads)
            torch.set_grad_enabled(True)
            vars(logger).clear()
            vars(logger).update(_copied(logger_state))
            result = fn(rank, world_size, **kwargs)
            if not dist.is_initialized():
                raise RuntimeError(f"{fn.__qualname__} left no process group: run it with harness.run (fresh ranks)")
            torch.save(("ok", result), buf)
        except BaseException:  # noqa: BLE001 -- reported to the parent, which raises
            buf = io.BytesIO()
            torch.save(("error", traceback.format_exc()), buf)
        conn.send_bytes(buf.getvalue())
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as _entry: no interpreter teardown after the process group is gone


class RankPool:
    """``world_size`` spawned ranks in one gloo process group (through ``deepspeed.init_distributed``)
    that run function after function: ``pool.run(fn, timeout, **kw)``. Broken for good (``closed``) after
    any failure."""

    def __init__(self, world_size: int, timeout: float = 300):
        ctx = mp.get_context("spawn")
        self.world_size, self.closed = world_size, False
        port = free_port()
        self.conns, self.procs = [], []
        for r in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_pool_entry, args=(r, world_size, port, child), daemon=True,
                            name=f"ds_ext-test-rank{r}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self._collect("start-up", timeout)

    def _collect(self, what: str, timeout: float) -> list:
        """One message from every rank; raises (and closes the pool) on a death, an error or the deadline."""
        out = [None] * self.world_size
        pending = dict(enumerate(self.conns))
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            ready = connection.wait(list(pending.values()) + [self.procs[r].sentinel for r in pending],
                                    timeout=max(0.0, left))
            if not ready:
                self.close()
                raise TimeoutError(f"{what} on a pool of {self.world_size} ranks did not finish within {timeout} s "
                                   f"(ranks {sorted(pending)} still busy); the pool is closed")
            for r, c in list(pending.items()):
                if c in ready:
                    try:
                        raw = c.recv_bytes()
                    except (EOFError, OSError):
                        pass  # the rank is gone: its sentinel says so below
                    else:
                        del pending[r]
                        out[r] = self._decode(what, r, raw)
                        continue
                if self.procs[r].sentinel in ready or not self.procs[r].is_alive():
                    self.procs[r].join(timeout=5)
                    code = self.procs[r].exitcode
                    self.close()
                    raise RuntimeError(f"{what}: rank {r} of a pool of {self.world_size} died (exit code {code}); "
                                       f"the pool is closed")
        return out

    def run(self, fn, timeout: float = 300, **kwargs) -> list:
        if self.closed:
            raise RuntimeError("this pool is closed")
        payload = pickle.dumps((fn, kwargs, dict(os.environ)))
        for c in self.conns:
            c.send_bytes(payload)
        return self._collect(getattr(fn, "__qualname__", repr(fn)), timeout)

    def _decode(self, what: str, rank: int, raw: bytes):
        """A rank's reply; the first error to arrive fails the call at once (the other ranks may be
        waiting for the failed one in a collective)."""
        if raw == b"ready":
            return None
        status, value = torch.load(io.BytesIO(raw), weights_only=False)
        if status == "error":
            self.close()
            raise RuntimeError(f"{what} raised on rank {rank} of {self.world_size} (the pool is closed):\n{value}")
        return value

    def close(self, graceful: bool = False) -> None:
        """Stop the ranks: after a failure at once (a rank blocked in a collective never reads "close"),
        at the session's end (``graceful``) they leave their process group first."""
        if self.closed:
            return
        self.closed = True
        for c in self.conns:
            try:
                c.send_bytes(b"close")
            except (OSError, ValueError):
                pass
        for p in self.procs:
            if graceful:
                p.join(timeout=30)
            if p.is_alive():
                p.kill()
            p.join(timeout=30)
        for c in self.conns:
            c.close()


_POOLS: Dict[Tuple, RankPool] = {}


def pool(world_size: int) -> RankPool:
    """The session's pool of ``world_size`` ranks, built on first use or after a failure."""
    key = (world_size, tuple(os.environ.get(k) for k in _START_ENV))
    p = _POOLS.get(key)
    if p is None or p.closed:
        p = _POOLS[key] = RankPool(world_size)
    return p


def run_pooled(fn, world_size: int = 2, timeout: float = 300, **kwargs):
    """``run`` on the session's pool: ``[fn(rank, world_size, **kwargs) for each rank]``."""
    return pool(world_size).run(fn, timeout, **kwargs)


def close_pools() -> None:
    for p in _POOLS.values():
        p.close(graceful=True)
    _POOLS.clear()


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
