"""Rank bodies for tests/dist/test_overlap.py: the flat reducers' work started during backward."""
from __future__ import annotations

import torch

from tests.dist.workers import make_engine, train_steps

# repeated, 1-D and odd sizes (not multiples of 8: segment bytes are padded), 200 to 9000 elements
SHAPES = [(40, 30), (30,), (17, 9), (200,), (16, 8, 3, 3), (64,), (5, 7), (90, 100), (33,), (8, 8)]


def drive(comm, name, options, steps=4, hooks="reverse", missing=(), seed=0, watch=False, poison=None):
    """``name`` built on ``SHAPES`` over ``comm``, driven directly for ``steps`` steps of random per-rank gradients:
    ``hooks`` ``reverse`` (grad_ready in reverse registration order, as backward), ``shuffled`` (a per-step
    permutation, the same on every rank) or ``none`` (no grad_ready: everything in ``finish()``, the whole-model
    path); parameters in ``missing`` get no gradient. ``watch``: the non-finite guard is on; ``poison``
    ``(step, rank, index)`` puts a NaN there. Returns per step the applied gradients, the residual, the guard's
    verdict, and the collectives issued during the hooks (kind) and in ``finish()``."""
    from ds_ext.comm import observe
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    red = REDUCERS.build(name, options, [(f"p{i}", p) for i, p in enumerate(params)], comm=comm)
    if watch:
        red.watch_nonfinite()
    g = torch.Generator().manual_seed(seed + 17 * comm.rank)
    order_gen = torch.Generator().manual_seed(seed)
    log = []

    def observer(c, op, kind, t, async_op, issue):
        if c is comm:
            log.append(kind)
        return issue()

    remove = observe(observer)
    out = []
    try:
        for t in range(steps):
            for i, p in enumerate(params):
                p.grad = None if i in missing else torch.randn(p.shape, generator=g) * (1 + i)
            if poison is not None and poison[:2] == (t, comm.rank):
                params[poison[2]].grad.view(-1)[3] = float("nan")
            order = list(reversed(range(len(params))))
            if hooks == "shuffled":
                order = torch.randperm(len(params), generator=order_gen).tolist()
            during = []
            for i in ([] if hooks == "none" else order):
                red.grad_ready(params[i])
                during.append(len(log))
            n0 = len(log)
            red.finish()
            flag = red.nonfinite_flag() if red.nonfinite_view == "reduced" else None
            bad = red.nonfinite_ranks()
            out.append({"applied": [None if p.grad is None else p.grad.clone() for p in params],
                        "error": None if red.error is None else red.error.clone(),
                        "flag": None if flag is None else bool(flag), "bad": bad,
                        "hooks_log": log[:n0], "during": during, "finish_log": log[n0:]})
            if (flag is not None and bool(flag)) or bad:
                red.reset_nonfinite()
            log.clear()
    finally:
        remove()
    return out


def launch_events(rank, world, spec, steps=3, gas=1):
    """``spec`` (a reducer dict) through DeepSpeed on the tiny model: the parameters after every step, and the
    sequence of events on this rank -- ``ready`` (each ``grad_ready``), ``finish`` (after it ran) and the meter
    kind of each collective as it is issued (``ds_ext.comm.observe``; None: control data) -- and ``groups``, the
    reducer's fusion groups launched during backward (1 when it has no pipeline)."""
    import ds_ext
    from ds_ext.comm import observe

    engine = make_engine("fp32", gas, world=world)
    att = ds_ext.attach(engine, {"reducer": spec})
    events, red = [], att.reducer
    ready, finish = red.grad_ready, red.finish

    def on_ready(p):
        events.append("ready")
        ready(p)

    def on_finish():  # the marker after finish(): a step's events are its hooks' and its finish()'s
        finish()
        events.append("finish")

    def observer(comm, op, kind, t, async_op, issue):
        events.append(kind)
        return issue()

    red.grad_ready, red.finish = on_ready, on_finish
    remove = observe(observer)
    record = []
    try:
        train_steps(engine, att, rank, steps, gas, 8, record)
    finally:
        remove()
    pipeline = getattr(red, "pipeline", None)
    groups = len(pipeline.groups) if pipeline is not None else 1  # PowerSGD's per-group pipeline, when on
    att.detach()
    return {"record": record, "events": events, "groups": groups}


def launch_runs(rank, world, specs, steps=3, gas=1):
    """``launch_events`` for each labelled spec, in one set of processes."""
    return {label: launch_events(rank, world, spec, steps, gas) for label, spec in specs.items()}
