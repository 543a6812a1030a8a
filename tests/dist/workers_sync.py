"""Rank-side functions for the synchronizer tests (see tests/harness.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist import workers


class CollectiveCounter:
    """Counts calls of torch.distributed collectives made while installed (instrumentation only: the
    real collective still runs)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")

    def __init__(self):
        self.calls = 0
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*a, __orig=orig, **k):
                self.calls += 1
                return __orig(*a, **k)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def engine_with(sync: dict, reducer: dict, optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
                total_steps=None):
    import deepspeed

    import ds_ext

    model = workers.tiny_model()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    world = dist.get_world_size()
    cfg = {"train_batch_size": 8 * world, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
           "steps_per_print": 10**12, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    att = ds_ext.attach(engine, {"reducer": reducer, "sync": sync}, total_steps=total_steps)
    return engine, att


def local_run(rank, world, sync, reducer=None, optimizer="sgd", steps=10, momentum=0.9, lr=0.05, nan_at=None):
    """Train ``steps`` steps; per step: params, whether the step communicated, collectives issued,
    bytes metered, H; plus the final optimizer state. ``nan_at``: ``(rank, step)`` whose input is all NaN
    (that rank's guard skips the step)."""
    engine, att = engine_with(sync, reducer or {"name": "none"}, optimizer, lr=lr, momentum=momentum,
                              total_steps=steps)
    out = {"params": [], "comm": [], "calls": [], "bytes": [], "H": []}
    for i, (x, y) in enumerate(workers.rank_batches(rank, steps, 8, torch.float32)):
        if nan_at == (rank, i):
            x = torch.full_like(x, float("nan"))
        with CollectiveCounter() as cc:
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
        out["params"].append(workers.flat_params(engine))
        out["comm"].append(att.last_step_communicated)
        out["calls"].append(cc.calls)
        out["bytes"].append(att.meter.last_step_bytes)
        out["H"].append(getattr(att.sync, "h", None))
    opt = engine.optimizer
    out["opt_state"] = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                        for p in engine.module.parameters()]
    out["skipped"] = att.skipped_steps
    return out


def dssync_direct(rank, world, options, syncs=2, local_update=False, comm=None):
    """Drive ``dssync`` directly on rank-specific parameters: groups seen, parameters after each sync,
    and the cross-rank sum before / after. ``comm``: a communicator (``LoopbackWorld`` rank) instead of
    the process group."""
    from ds_ext.meter import CommMeter
    from ds_ext.registry import SYNCS, load_builtin

    load_builtin()
    g = torch.Generator().manual_seed(10 + rank)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    meter = CommMeter()
    sync = SYNCS.build("dssync", options, [(f"p{i}", p) for i, p in enumerate(params)], meter=meter,
                       comm=None if comm is None else comm.with_meter(meter))
    rec = {"groups": [], "params": [], "bytes": [], "start": [p.detach().clone() for p in params]}
    for i in range(syncs):
        rec["groups"].append(sync.grouping(sync.rounds))
        sync._average_now()
        sync.rounds += 1
        rec["params"].append([p.detach().clone() for p in params])
        rec["bytes"].append(meter.end_step())
        if local_update:
            with torch.no_grad():
                for p in params:
                    p.add_(0.1 * (rank + 1))
    return rec
