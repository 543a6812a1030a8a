"""Rank functions of tests/dist/test_zero_copy.py: ``allreduce``'s gradients as views into its buckets (issue 19)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.dist import workers


def _shares_bucket(fusion, p) -> bool:
    """``p.grad`` lives in the storage of ``p``'s bucket, at its slot (host-side metadata only)."""
    b, i = fusion.where[p]
    g = p.grad
    return (g is not None and g.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr()
            and g.data_ptr() == b.slots[i].data_ptr())


def engine_runs(rank, world, configs, steps=4):
    """For each (precision, gas, zero stage): train with DeepSpeed's own reduction and with ``allreduce``
    (views on, views off: the copy path); parameters after ``steps`` optimizer steps. With views on, at
    every DeepSpeed optimizer step: whether every ``p.grad`` DeepSpeed's optimizer reads is a bucket view,
    and how many gradients the window copied into buckets / found already there."""
    import ds_ext
    from ds_ext.reducers.allreduce import AllreduceReducer

    out = {}
    for precision, gas, zero in configs:
        for label, reducer, views in (("deepspeed", "deepspeed", None), ("views", "allreduce", True),
                                      ("copy", "allreduce", False)):
            if zero and reducer != "allreduce" or zero and not views:  # ZeRO: what its optimizer reads
                continue  # (exactness under ZeRO: tests/dist/test_zero.py)
            engine = workers.make_engine(precision, gas, world=world, zero=zero)
            AllreduceReducer.force_bucket_view = True if views is None else views
            spec = {"name": reducer, "bucket_mb": 0.002} if reducer == "allreduce" else {"name": reducer}
            att = ds_ext.attach(engine, {"reducer": spec})
            AllreduceReducer.force_bucket_view = None
            seen, counts = [], []
            if reducer == "allreduce":
                fusion, params, outer = att.reducer.fusion, att.reducer.params, engine.optimizer

                def step(*a, _orig=outer.step, fusion=fusion, params=params, **k):
                    # what DeepSpeed's optimizer (torch's, its bf16 wrapper or ZeRO's) is handed
                    seen.append({"views": all(_shares_bucket(fusion, p) for p in params),
                                 "any_view": any(_shares_bucket(fusion, p) for p in params)})
                    return _orig(*a, **k)

                outer.step = step

                def finish(orig=att.reducer.finish, fusion=fusion):
                    orig()
                    counts.append((fusion.copied, fusion.in_place))

                att.reducer.finish = finish
            workers.train_steps(engine, att, rank, steps, gas, 8)
            out[(precision, gas, zero, label)] = {
                "params": workers.flat_params(engine), "seen": seen, "counts": counts, "n": len(att.reducer.params),
                "buckets": len(att.reducer.fusion.buckets) if reducer == "allreduce" else 0,
                "after_step_none": all(p.grad is None for p in engine.module.parameters()),
            }
            att.detach()
    return out


def own_loop(rank, world, steps=5, gas=2, set_to_none=False):
    """``allreduce`` driven without DeepSpeed, as the engine drives it (hooks at the boundary micro-batch,
    ``finish`` before the step), with a torch optimizer and ``zero_grad(set_to_none=set_to_none)`` (False
    keeps the gradients in place): views on and off, gradient storage and copy counts per step."""
    from ds_ext.comm import Communicator
    from ds_ext.reducers.allreduce import AllreduceOptions, AllreduceReducer

    out = {}
    for views in (True, False):
        model = workers.tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        AllreduceReducer.force_bucket_view = views
        red = AllreduceReducer(list(model.named_parameters()), AllreduceOptions(bucket_mb=0.002),
                               comm=Communicator())
        AllreduceReducer.force_bucket_view = None
        boundary = {"on": False}
        for p in red.params:
            p.register_post_accumulate_grad_hook(lambda p, red=red: red.grad_ready(p) if boundary["on"] else None)
        ptrs, counts, shared = [], [], []
        batches = workers.rank_batches(rank, steps * gas, 8, torch.float32)
        for i, (x, y) in enumerate(batches):
            boundary["on"] = (i + 1) % gas == 0
            (F.cross_entropy(model(x), y) / gas).backward()
            if boundary["on"]:
                red.finish()
                counts.append((red.fusion.copied, red.fusion.in_place))
                shared.append(all(_shares_bucket(red.fusion, p) for p in red.params))
                ptrs.append([p.grad.data_ptr() for p in red.params])
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)
        out[views] = {"params": workers.flat_params_of(model), "counts": counts, "shared": shared,
                      "ptrs_stable": all(pp == ptrs[0] for pp in ptrs), "n": len(red.params)}
    return out


def all_runs(rank, world, configs):
    """One spawn for tests/dist/test_zero_copy.py: ``engine_runs`` and ``own_loop`` with and without set_to_none."""
    return {"engine": engine_runs(rank, world, configs),
            "own": {none: own_loop(rank, world, set_to_none=none) for none in (False, True)}}


def grads_after_backward(rank, world, steps=3):
    """``allreduce`` with bucket views: at each step, whether every ``p.grad`` right after ``engine.backward``
    (before ``engine.step``, where hand-made clipping or norm logging would read it) equals the exact
    mean of the ranks' local gradients (computed beside on a twin module and a plain all_reduce)."""
    import ds_ext
    from ds_ext.comm import Communicator
    from ds_ext.reducers.allreduce import AllreduceReducer

    engine = workers.make_engine("fp32", 1, world=world)
    AllreduceReducer.force_bucket_view = True
    try:
        att = ds_ext.attach(engine, {"reducer": {"name": "allreduce", "bucket_mb": 0.002}})
    finally:
        AllreduceReducer.force_bucket_view = None
    params = att.reducer.params
    plain = Communicator(device="cpu")
    exact = []
    twin = workers.tiny_model()
    for x, y in workers.rank_batches(rank, steps, 8, torch.float32):
        twin.load_state_dict(engine.module.state_dict())  # the same parameters, outside DeepSpeed's hooks
        local = torch.autograd.grad(F.cross_entropy(twin(x), y), [p for p in twin.parameters() if p.requires_grad])
        want = [plain.all_reduce(g.clone()).div_(world) for g in local]
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        exact.append(all(torch.equal(p.grad, w) for p, w in zip(params, want)))
        engine.step()
    att.detach()
    return exact
