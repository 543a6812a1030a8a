"""Rank functions of tests/dist/test_buckets.py: ``allreduce``'s DDP-grade buckets (issue 29, item 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.dist import workers

#: small caps so the tiny model below has several buckets (first cap 524 B, then 1048 B)
SPEC = {"name": "allreduce", "bucket_mb": 0.001, "first_bucket_mb": 0.0005}
#: the layout and path before issue 29: one cap, reverse registration order kept, the copy path
OLD = {"first_bucket_mb": 0.001, "rebuild_buckets": False, "bucket_view": False}


class Branches(torch.nn.Module):
    """Two parallel branches and a head. Autograd runs the branch created last in forward first, so its
    gradients become ready first: ``a_last`` computes ``a`` after ``b`` (a's gradients first, against the
    reverse registration order), else ``b`` after ``a``. The arithmetic is the same either way."""

    def __init__(self, a_last: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.a_last = a_last

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)[:, :8]
        if self.a_last:
            yb = self.b(x)
            ya = self.a(x)
        else:
            ya = self.a(x)
            yb = self.b(x)
        return self.head(torch.relu(ya + yb))


def layout(fusion) -> list:
    """Each bucket's parameters as indices into the reducer's parameter list, in launch order."""
    return [[fusion.index[p] for p in b.params] for b in fusion.buckets]


def _engine(rank, world, spec, gas):
    import ds_ext

    engine = workers.make_engine(gas=gas, world=world, model=Branches(a_last=rank == 0))
    att = ds_ext.attach(engine, {"reducer": spec})
    return engine, att


def _train(engine, att, batches, launches, casts=None, views=None):
    """Optimizer steps over ``batches``; per step, the launched buckets (index, bytes, parameter indices) in
    launch order; ``casts``: every ds_ext collective's (op, kind) during them; ``views``: per step, whether
    every ``p.grad`` was its bucket view when ``engine.backward`` returned."""
    from ds_ext import comm as dcomm

    fusion = att.reducer.fusion
    orig = fusion.launch_fn
    step = []

    def spy(buf):
        i = next(i for i, b in enumerate(fusion.buckets) if b.buffer is buf)
        step.append((i, buf.numel() * buf.element_size(), [fusion.index[p] for p in fusion.buckets[i].params]))
        return orig(buf)

    def count(c, op, kind, t, async_op, issue):
        casts.append((op, kind))
        return issue()

    fusion.launch_fn = spy
    remove = dcomm.observe(count) if casts is not None else None
    try:
        for x, y in batches:
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(F.cross_entropy(engine(x), y))
            if boundary and views is not None:
                views.append(all(fusion.is_view(p) for p in att.reducer.params))
            engine.step()
            if boundary:
                launches.append(list(step))
                step.clear()
    finally:
        fusion.launch_fn = orig
        if remove is not None:
            remove()


def rebuild_runs(rank, world, ckpt, steps=4, split=2, gas=2):
    """``allreduce`` with its defaults (views, first bucket, rebuild) on ``Branches`` whose ready order differs
    between the ranks: layouts before and after the rebuild, the order each rank measured, the launches of
    every step, the broadcasts ds_ext issued, parameters; the same data with the pre-issue-29 buckets (``OLD``);
    and a run resumed from a checkpoint of the first at step ``split`` (layout right after the load, params)."""
    batches = list(workers.rank_batches(rank, steps * gas, 8, torch.float32))
    out = {}
    casts, views, launches = [], [], []
    engine, att = _engine(rank, world, SPEC, gas)
    fusion = att.reducer.fusion
    out["initial"] = layout(fusion)
    _train(engine, att, batches[:split * gas], launches, casts, views)
    engine.save_checkpoint(ckpt, tag="mid")
    _train(engine, att, batches[split * gas:], launches, casts, views)
    out.update(rebuilt=layout(fusion), measured=list(fusion.ready_order), launches=launches,
               first_bytes=fusion.buckets[0].numel * 4, params=workers.flat_params(engine),
               broadcasts=[k for op, k in casts if op == "broadcast"], state=att.reducer.state_dict(), views=views)
    att.detach()

    engine, att = _engine(rank, world, {**SPEC, **OLD}, gas)
    out["old_layout"] = layout(att.reducer.fusion)
    _train(engine, att, batches, [])
    out["old_params"] = workers.flat_params(engine)
    att.detach()

    engine, att = _engine(rank, world, SPEC, gas)
    engine.load_checkpoint(ckpt, tag="mid")
    out["loaded"] = layout(att.reducer.fusion)
    resumed = []
    _train(engine, att, batches[split * gas:], resumed)
    out.update(resumed_launches=resumed, resumed_params=workers.flat_params(engine))
    att.detach()
    return out
