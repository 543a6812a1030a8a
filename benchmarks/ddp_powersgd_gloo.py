"""Why PyTorch DDP's ``powerSGD_hook`` with DDP's default (several) buckets aborts on gloo, a minimal reproduction,
and the serialising wrapper bench-train runs it with (``serialized_hook``).

    python -m benchmarks.ddp_powersgd_gloo [--variant plain|serialized|start3|all] [--steps 6]

spawns 2 local gloo ranks (no DeepSpeed) training a small MLP under ``DistributedDataParallel`` with 4 buckets
(``bucket_cap_mb`` small) and ``powerSGD_hook`` (rank 2, ``start_powerSGD_iter`` 2), and prints per variant
whether the ranks finished (exit code 0 when every variant behaved as stated below, 1 otherwise).

**The cause** (torch's ``torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py``): per bucket the hook
issues the all_reduce of the uncompressed tensors from the thread that runs backward (DDP's reducer calls the hook
there), and returns a chain of futures, ``.then(P all_reduce).then(Q all_reduce).then(decompress)``. On gloo a
future completes on one of the process group's worker threads, so bucket k's P and Q all_reduces are issued from
those threads while the main thread goes on with backward and issues bucket k+1's all_reduce. Gloo gives each
collective the next tag of the process group at the moment it is issued, and matches tags across ranks: when
the two threads interleave differently on the two ranks, rank 0's tag t is, say, bucket k's P (a few KB) and
rank 1's is bucket k+1's uncompressed tensors, and gloo aborts the process
(``gloo::EnforceNotMet ... Received data size doesn't match expected size`` or a mismatched-operation error).
With one bucket nothing else is issued while the chain runs; on NCCL the chain's callbacks run in issue order on
the main thread, so neither aborts.

**Not the cause**: DDP's bucket rebuild after the first iteration (the hook's per-bucket state is first
allocated at ``start_powerSGD_iter`` = 2, after the rebuild; ``start3`` with 3 aborts the same way); ranks with
different layouts (DDP broadcasts rank 0's rebuilt order); ``min_compression_rate``, error feedback and warm
start (per-bucket state, keyed by ``bucket.index()``, same on every rank).

**The harness fix** (``serialized_hook``): PyTorch's ``powerSGD_hook`` function, called unmodified, but before a
bucket's call the main thread waits for the previous bucket's future. Every collective of the hook then has the
same order on every rank (bucket k's uncompressed, P, Q, then bucket k+1's), a bucket's chain still runs
during the backward of the layers after it, and backward blocks only when the next bucket is ready before the
previous chain is done. DDP's last bucket is waited for by DDP itself at the end of backward, as without the
wrapper. The arithmetic (error feedback, warm start, per-bucket P and Q) is PyTorch's.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def serialized_hook(hook):
    """``hook`` (a DDP comm hook ``(state, bucket) -> Future``) with each call waiting, on the calling thread, for
    the future of the previous call: the collectives its callbacks issue keep one order on every rank."""
    last = {"fut": None}

    def serialized(state, bucket):
        prev = last["fut"]
        if prev is not None:
            prev.wait()
        fut = hook(state, bucket)
        last["fut"] = None if bucket.is_last() else fut
        return fut

    serialized.__wrapped__ = hook
    serialized.__qualname__ = f"serialized({getattr(hook, '__qualname__', hook)})"
    return serialized


def _worker(rank: int, world: int, port: int, variant: str, steps: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ph
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])   # 8 x 257 KB of gradient
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.5)                        # 4 buckets after the rebuild
    state = ph.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                             start_powerSGD_iter=3 if variant == "start3" else 2)
    hook = serialized_hook(ph.powerSGD_hook) if variant == "serialized" else ph.powerSGD_hook
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 256, generator=g)
    for _ in range(steps):
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    buckets = len(state.p_memory_dict)   # buckets the hook compressed (DDP's logging keeps the first layout)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dist.all_reduce(w0 := w.clone())
    same = bool(torch.equal(w0, 2 * w)) if world == 2 else True
    q.put((rank, state.iter, buckets, same))
    dist.destroy_process_group()


def run_variant(variant: str, steps: int = 6, timeout: float = 60.0) -> dict:
    """Run ``variant`` on 2 spawned gloo ranks: {"ok": both exited 0, "exitcodes", "iter": the hook's iteration
    count, "buckets": buckets with P/Q state (compressed), "replicas_equal": the ranks' weights identical}."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, variant, steps, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    got = {}
    while not q.empty():
        rank, it, buckets, same = q.get()
        got[rank] = (it, buckets, same)
    codes = [p.exitcode for p in procs]
    return {"ok": all(c == 0 for c in codes) and len(got) == 2, "exitcodes": codes,
            "iter": [got[r][0] for r in sorted(got)], "buckets": got.get(0, (0, 0))[1],
            "replicas_equal": all(v[2] for v in got.values()) if got else None}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ddp_powersgd_gloo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="all", choices=("plain", "serialized", "start3", "all"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant (the race need not hit every run)")
    args = ap.parse_args(argv)
    variants = ("plain", "start3", "serialized") if args.variant == "all" else (args.variant,)
    expect_ok = {"plain": False, "start3": False, "serialized": True}
    good = True
    for v in variants:
        res = [run_variant(v, args.steps) for _ in range(args.repeat)]
        oks = sum(r["ok"] for r in res)
        print(f"{v:<11} finished {oks}/{len(res)}  exit codes {[r['exitcodes'] for r in res]}  hook iter "
              f"{[r['iter'] for r in res]}  buckets {res[0]['buckets']}  replicas equal "
              f"{[r['replicas_equal'] for r in res]}", flush=True)
        good &= (oks == len(res)) if expect_ok[v] else (oks < len(res))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
