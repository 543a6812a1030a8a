"""Functions executed inside the spawned ranks for tests/dist/test_order.py (see tests/harness.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sorter_tables(rank, world, m=8, d=5, epochs=3, odd_rank=None, project_dim=0, comm=None):
    """Drive a ``dgrab`` order through all_gathers (the process group, or ``comm``: a ``LoopbackWorld``
    rank) with random per-rank gradients; rank ``odd_rank`` gets gradients of another scale and
    distribution. Returns every epoch's full table."""
    from ds_ext.comm import Communicator
    from ds_ext.meter import CommMeter
    from ds_ext.order.dgrab import DGrab, DGrabOptions

    order = DGrab(m * world, rank, world, seed=3, options=DGrabOptions(project_dim=project_dim))
    order.plan(1, 2, m // 2)
    meter = CommMeter()
    order.bind(Communicator(device="cpu", meter=meter) if comm is None else comm.with_meter(meter), numel=d)
    g = torch.Generator().manual_seed(100 + rank)
    tables, local = [], []
    for epoch in range(epochs):
        idx = order.epoch_indices(epoch)
        tables.append(order.sorter.orders.clone())
        local.append((idx, order.local_order()))
        for _ in range(m):
            v = torch.randn(d, generator=g)
            if rank == odd_rank:
                v = 50 * v.exp()
            order.observe_microbatch(v)
    return {"tables": tables, "local": local, "shard": order.shard, "bytes": meter.step_bytes}


def engine_dgrab(rank, world, gas=2, epochs=2, order_name="dgrab", reducer="allreduce", scale_rank1=1.0,
                 options=None):
    """A real DeepSpeed engine (tiny CNN, per-example microbatches) with a gradient-driven order
    attached; records what the order observes next to the change of ``p.grad`` over each backward, twice:
    ``deltas`` read after ``engine.backward`` returns (with bucket views the boundary microbatch's ``p.grad``
    then holds the ranks' mean), ``local`` read by a post-accumulate hook registered before ``attach``'s, i.e.
    right after autograd accumulated the microbatch and before any reducer saw it. ``boundary``: whether each
    microbatch closed its window; ``options``: the reducer's options."""
    from ds_ext.deepspeed.attach import attach
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine

    n_ex = 24 * world
    gx = torch.Generator().manual_seed(7)
    X, Y = torch.randn(n_ex, 1, 8, 8, generator=gx), torch.randint(0, 10, (n_ex,), generator=gx)
    engine = make_engine(gas=gas, micro=1, world=world)
    order = ORDERS.build(order_name, {}, n_ex, rank, world, 0)
    steps, note = order.plan(1, gas, order.shard_size // gas)
    params = list(engine.module.parameters())
    accumulated = {}
    for k, p in enumerate(params):  # runs before attach's hook (registered first)
        p.register_post_accumulate_grad_hook(lambda p, k=k: accumulated.__setitem__(k, p.grad.detach().clone()))
    att = attach(engine, {"reducer": {"name": reducer, **(options or {})}}, order=order)
    observed = []
    feed = att._feed
    if order_name == "dgrab":
        def spy(flat):
            observed.append(flat.clone())
            feed(flat)
        att._feed = spy

    def grads():
        return [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for p in params]

    deltas, local, tables, boundaries, afters, views = [], [], [], [], [], []
    for epoch in range(epochs):
        idx = order.epoch_indices(epoch)[: steps * gas]
        tables.append(order.sorter.orders.clone())
        for i in idx:
            before = grads()
            accumulated.clear()
            loss = F.cross_entropy(engine(X[i:i + 1]), Y[i:i + 1]) * (scale_rank1 if rank == 1 else 1.0)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            if boundary and reducer == "allreduce":
                views.append(all(att.reducer.fusion.is_view(p) for p in params))
            after = grads()
            deltas.append(torch.cat([(a - b).reshape(-1) for a, b in zip(after, before)]))
            local.append(torch.cat([(accumulated.get(k, b) - b).reshape(-1) for k, b in enumerate(before)]))
            boundaries.append(boundary)
            afters.append(torch.cat([a.reshape(-1) for a in after]))
            engine.step()
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    return {"observed": observed, "deltas": deltas, "local": local, "boundary": boundaries, "after": afters,
            "tables": tables, "params": flat, "note": note, "state": order.state_dict(),
            "views": views}


def cdgrab_vs_allreduce(rank, world, gas=2, steps=6):
    """Same data, same init: reducer allreduce vs reducer+order cdgrab; the applied gradient of each
    step (params after the step) and the gradients written before the step are compared."""
    from ds_ext.deepspeed.attach import attach
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine

    gx = torch.Generator().manual_seed(11 + rank)
    data = [(torch.randn(1, 1, 8, 8, generator=gx), torch.randint(0, 10, (1,), generator=gx))
            for _ in range(steps * gas)]
    out = {}
    for name in ("allreduce", "cdgrab"):
        engine = make_engine(gas=gas, micro=1, world=world)
        order = ORDERS.build("cdgrab" if name == "cdgrab" else "rr", {}, steps * gas * world, rank, world, 0)
        order.plan(1, gas, steps)
        att = attach(engine, {"reducer": {"name": name}}, order=order)
        grads, params = [], []
        orig_finish = att.reducer.finish

        def finish(orig=orig_finish, eng=engine, rec=grads):
            orig()
            rec.append(torch.cat([p.grad.reshape(-1) for p in eng.module.parameters()]).clone())
        att.reducer.finish = finish
        for x, y in data:
            engine.backward(F.cross_entropy(engine(x), y))
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:
                params.append(torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()]).clone())
        out[name] = {"grads": grads, "params": params, "bytes": att.meter.total_bytes,
                     "table": order.sorter.orders.clone() if name == "cdgrab" else None}
    return out
