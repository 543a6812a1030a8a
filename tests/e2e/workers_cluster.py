"""Rank-side function for the cost-model tests (see tests/harness.py)."""
from __future__ import annotations

import torch


def payloads(rank, world, model="digits_cnn", methods=(), opts=None, steps=2):
    """Run each method's real reducer / synchronizer for ``steps`` steps on random gradients of
    ``model``'s shapes (as the cluster benchmark drives them, collectives timed and recorded) and
    return, per method: the meter's bytes per step, its bytes by kind, the recorded collectives
    ``(op, payload bytes, group size)`` of all steps in order, and the reducer's stats."""
    from benchmarks.cluster import CollectiveTimer, build_method, drive_step
    from ds_ext.costmodel.model import MethodOptions
    from ds_ext.meter import CommMeter
    from ds_ext.registry import MODELS, load_builtin

    load_builtin()
    torch.manual_seed(0)
    net = MODELS.build(model, {})
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(rank)
    opts = MethodOptions(**(opts or {}))
    timer = CollectiveTimer()
    timer.install()
    out = {}
    try:
        for m in methods:
            meter = CommMeter()
            reducer, sync = build_method(m, named, opts, meter)
            per_step = []
            timer.reset()
            for _ in range(steps):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                timer.active = True
                per_step.append(drive_step(reducer, sync, params, meter))
                timer.active = False
            out[m] = {"bytes": per_step, "by_kind": dict(meter.by_kind),
                      "colls": [list(r[:3]) for r in timer.records],
                      "stats": {k: float(v) for k, v in reducer.stats().items() if isinstance(v, (int, float))}}
    finally:
        timer.uninstall()
    return out
