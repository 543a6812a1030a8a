"""Sorter overhead per optimizer step (the order half of ``run/bench-order.sh``).

    python -m benchmarks.order [--world 2] [--gas 16] [--steps 30] [--warmup 5] [--project-dim 64]

``--world`` gloo processes on CPU (DeepSpeed engine, digits CNN of the quickstart recipe, one example
per microbatch as in the D-GraB paper, ``--gas`` microbatches per optimizer step). Each row times
whole optimizer steps (``gas`` x forward/backward/``engine.step`` on every rank; median over
``--steps`` after ``--warmup``) and divides by the same step with order ``rr`` and the
``allreduce`` reducer (no sorter):

* ``dgrab``: Tensor hooks + all_gather of the pair difference every 2 microbatches + the sequential
  balancing loop, full gradient and CountSketch-projected to ``--project-dim`` dims;
* ``cdgrab``: all_gather of every microbatch gradient replacing the allreduce, full and projected.

Bytes are what each rank hands to collectives per step (the communication meter).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rank_main(rank, world, port, outdir, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    from ds_ext.comm import init_distributed
    from ds_ext.deepspeed.attach import attach
    from ds_ext.registry import MODELS, ORDERS, load_builtin

    init_distributed(300, backend="gloo")
    load_builtin()
    from ds_ext.data.base import make_loader  # noqa: F401  (registers data sets)
    from ds_ext.registry import DATASETS

    bundle = DATASETS.build("digits", {}, root=None)
    rows = [("rr + allreduce (baseline)", "rr", "allreduce", 0), ("dgrab full gradient", "dgrab", "allreduce", 0),
            (f"dgrab projected k={args.project_dim}", "dgrab", "allreduce", args.project_dim),
            ("cdgrab full gradient", "cdgrab", "cdgrab", 0),
            (f"cdgrab projected k={args.project_dim}", "cdgrab", "cdgrab", args.project_dim)]
    results = []
    for label, oname, rname, k in rows + rows:  # the first pass warms every path up and is discarded
        torch.manual_seed(0)
        model = MODELS.build("digits_cnn", {}, data=bundle)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cfg = {"train_batch_size": args.gas * world, "train_micro_batch_size_per_gpu": 1,
               "gradient_accumulation_steps": args.gas, "steps_per_print": 10**12, "gradient_clipping": 0.0,
               "zero_optimization": {"stage": 0}}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        order = ORDERS.build(oname, {"project_dim": k} if oname != "rr" else {}, len(bundle.train), rank, world, 0)
        steps_per_epoch = order.shard_size // args.gas
        steps_per_epoch, _ = order.plan(1, args.gas, steps_per_epoch)
        att = attach(engine, {"reducer": {"name": rname}}, order=order)
        times, epoch, pos, idx = [], 0, 0, order.epoch_indices(0)
        for s in range(args.warmup + args.steps):
            att.comm.barrier()
            t0 = time.perf_counter()
            for _ in range(args.gas):
                if pos == steps_per_epoch * args.gas:
                    epoch, pos = epoch + 1, 0
                    idx = order.epoch_indices(epoch)
                x, y = bundle.train[idx[pos]]
                pos += 1
                loss = F.cross_entropy(engine(x.unsqueeze(0).float()), torch.as_tensor([y]))
                engine.backward(loss)
                engine.step()
            times.append(time.perf_counter() - t0)
        t = att.comm.all_reduce(att.comm.tensor([statistics.median(times[args.warmup:])]), op="max")
        nparam = sum(p.numel() for p in model.parameters())
        results.append((label, t.item() * 1e3, att.meter.total_bytes / max(att.meter.steps, 1), nparam))
        att.detach()
    if rank == 0:
        torch.save(results[len(rows):], Path(outdir) / "results.pt")
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.order", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--gas", type=int, default=16, help="microbatches (examples) per optimizer step per rank")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--project-dim", type=int, default=64)
    a = ap.parse_args(argv)
    if a.gas % 2:
        print("--gas must be even (PairBalance pairs microbatches)", file=sys.stderr)
        return 2
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="ds_ext_bench_order_")
    mp.start_processes(_rank_main, args=(a.world, port, out, a), nprocs=a.world, start_method="spawn")
    res = torch.load(Path(out) / "results.pt", weights_only=False)
    base = res[0][1]
    print(f"sorter overhead per optimizer step: digits CNN ({res[0][3]} parameters), {a.world} gloo ranks on CPU, "
          f"1 example per microbatch x {a.gas} microbatches per step; median of {a.steps} steps")
    print(f"| {'configuration':<28} | {'ms/step':>8} | {'ratio':>6} | {'bytes/step/rank':>15} |")
    print(f"|{'-' * 30}|{'-' * 10}:|{'-' * 8}:|{'-' * 17}:|")
    for label, ms, b, _ in res:
        print(f"| {label:<28} | {ms:>8.2f} | {ms / base:>6.2f} | {b:>15,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
