"""Functions executed inside the spawned ranks for tests/dist/test_gpu.py: every method on CUDA tensors.

``run_case``: all ranks share the one GPU (``cuda:0``; NCCL refuses two ranks on one device, so the process
group is gloo, which takes CUDA tensors): the methods' arithmetic, device placement and the communication
layer run exactly as on a GPU cluster; only the wire is gloo's. Every case in fp32, and in bf16 where the
method's arithmetic or DeepSpeed's optimizer path changes with the precision (``BF16``).

``run_one_rank``: every reducer, synchronizer and order of the registries (``ONE_RANK_CASES``, from
tests/roster.py) inside a real engine in a process group of ONE rank with ``DS_EXT_FORCE_COLLECTIVES=1``
(``ds_ext.comm.Communicator.force_collectives``): with the nccl backend every ds_ext collective enters
NCCL (its dtype and device checks, async handles, streams), which two ranks on one GPU cannot do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (label, method, order name or None, world size)
CASES = [
    ("allreduce", {"reducer": {"name": "allreduce", "bucket_mb": 0.002}}, None, 2),
    ("powersgd", {"reducer": {"name": "powersgd", "matrix_approximation_rank": 2, "start_powerSGD_iter": 1}}, None, 2),
    ("acpsgd", {"reducer": {"name": "acpsgd", "rank": 2, "fusion_threshold_mb": 0.002}}, None, 2),
    ("topk", {"reducer": {"name": "topk", "density": 0.2}}, None, 3),  # 3 ranks: overlapping indices
    ("topk_union", {"reducer": {"name": "topk", "density": 0.1, "exchange": "union"}}, None, 3),
    ("topk_fp16", {"reducer": {"name": "topk", "density": 0.1, "value_dtype": "fp16"}}, None, 3),
    ("exdyna", {"reducer": {"name": "exdyna", "density": 0.05}}, None, 3),
    ("signsgd", {"reducer": "signsgd"}, None, 2),
    ("half", {"reducer": "half"}, None, 2),
    ("deepspeed", {"reducer": "deepspeed"}, None, 2),
    ("dgrab", {"reducer": {"name": "allreduce"}}, "dgrab", 2),
    ("cdgrab", {"reducer": "cdgrab"}, "cdgrab", 2),
    ("cdgrab_sketch", {"reducer": "cdgrab"}, ("cdgrab", {"project_dim": 16}), 3),
    ("local", {"reducer": "none", "sync": {"name": "local", "h": 2}}, None, 2),
    ("dssync", {"reducer": "none", "sync": {"name": "dssync", "groups": 2, "h": 1}}, None, 4),
    ("acpsgd_zero1", {"reducer": {"name": "acpsgd", "rank": 2, "fusion_threshold_mb": 0.002}}, None, 2),
    ("topk_zero2", {"reducer": {"name": "topk", "density": 0.2}}, None, 2),
    ("powersgd_hier", {"reducer": {"name": "powersgd", "matrix_approximation_rank": 2, "start_powerSGD_iter": 1,
                                   "hierarchical": True}}, None, 4),  # 2 "nodes" x 2
    ("local_hier", {"reducer": "none", "sync": {"name": "local", "h": 2, "hierarchical": True}}, None, 4),
]
#: the ZeRO stage of a case (0 when absent)
ZERO = {"acpsgd_zero1": 1, "topk_zero2": 2}
#: the cases also run in bf16: every reducer once and both ZeRO stages (the orders, the hierarchical and the
#: variant cases repeat fp32 arithmetic already covered, and cost a pool call each; the synchronizers refuse a
#: DeepSpeed bf16 engine, whose fp32 master weights would overwrite their averages: ds_ext/deepspeed/attach.py)
BF16 = ("allreduce", "powersgd", "acpsgd", "topk", "exdyna", "signsgd", "half", "deepspeed", "acpsgd_zero1",
        "topk_zero2")
#: (label, case, precision) for tests/dist/test_gpu.py
PRECISION_CASES = [(f"{c[0]}-{p}", c, p) for p in ("fp32", "bf16") for c in CASES if p == "fp32" or c[0] in BF16]


def run_case(rank, world, label, method, order_spec, steps=6, gas=2, precision="fp32"):
    """Train ``steps`` optimizer steps on CUDA in ``precision`` with rank-specific data and the consistency
    check on every step it applies to; returns parameters after each step, the comm device and errors."""
    import warnings

    import ds_ext
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine

    # any CUDA op without a deterministic implementation on our path (atomics) warns: collected below
    torch.use_deterministic_algorithms(True, warn_only=True)
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always")

    engine = make_engine(precision, gas, micro=1 if order_spec else 4, world=world, zero=ZERO.get(label, 0))
    if label.endswith("_hier"):  # the launcher's variables for nodes of 2 (after the engine took cuda:0)
        import os

        os.environ.update(LOCAL_SIZE="2", LOCAL_RANK=str(rank % 2), CROSS_RANK=str(rank // 2),
                          CROSS_SIZE=str(world // 2))
    dev = next(engine.module.parameters()).device
    dtype = next(engine.module.parameters()).dtype
    order = None
    if order_spec:  # one epoch of 8 microbatches per rank (PairBalance needs whole epochs)
        steps = 8 // gas
        name, opts = order_spec if isinstance(order_spec, tuple) else (order_spec, {})
        order = ORDERS.build(name, opts, 16 * world, rank, world, 0)
        order.plan(1, gas, 8 // gas)
    att = ds_ext.attach(engine, method, check_every=1, order=order, total_steps=steps)
    g = torch.Generator().manual_seed(1000 + rank)
    record, err = [], None
    micro = 1 if order_spec else 4
    try:
        for _ in range(steps * gas):
            x = torch.randn(micro, 1, 8, 8, generator=g).to(dev, dtype)
            y = torch.randint(0, 10, (micro,), generator=g).to(dev)
            loss = F.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            if att.steps > len(record):
                record.append(torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()]).cpu())
    except Exception as e:  # noqa: BLE001 -- reported to the test
        err = f"{type(e).__name__}: {e}"
    caught.__exit__(None, None, None)
    nondet = sorted({str(w.message)[:200] for w in seen if "deterministic" in str(w.message)})
    return {"record": record, "device": str(att.comm.device), "param_device": str(dev), "error": err,
            "nondeterministic": nondet, "dtype": str(dtype)}


# ------------------------------------------------------------ one rank, every collective through the backend
#: small-scale options per method for the tiny model (a method without an entry runs with its defaults)
_ONE_RANK_OPTS = {
    "reducer": {"allreduce": {"bucket_mb": 0.002}, "powersgd": {"matrix_approximation_rank": 2, "start_powerSGD_iter": 1},
                "acpsgd": {"rank": 2, "fusion_threshold_mb": 0.002}, "topk": {"density": 0.1},
                "exdyna": {"density": 0.05}},
    "sync": {"local": {"h": 2}, "dssync": {"groups": 1, "h": 1}},
}


def _one_rank_cases() -> list:
    """(label, method, order, precision, zero stage): every reducer, synchronizer and order of the registries once
    in fp32, the variants whose collectives differ (topk's union exchange, fp16 values), bf16 on the wire and
    ZeRO 1 / 2 (DeepSpeed's partitioned gradients feeding our reducers)."""
    from tests import roster

    opts = _ONE_RANK_OPTS
    cases = []
    for name in roster.all_reducers():
        if name == "none":  # not a method on its own (attach refuses it without a synchronizer): the syncs below
            continue
        order = "cdgrab" if name == "cdgrab" else None  # CD-GraB's reducer and order go together
        cases.append((f"reducer-{name}", {"reducer": {"name": name, **opts["reducer"].get(name, {})}}, order, "fp32", 0))
    for name in roster.all_syncs():
        if name != "none":
            cases.append((f"sync-{name}", {"reducer": "none", "sync": {"name": name, **opts["sync"].get(name, {})}},
                          None, "fp32", 0))
    for name in roster.all_orders():
        if name != "cdgrab":
            cases.append((f"order-{name}", {"reducer": {"name": "allreduce"}}, name, "fp32", 0))
    topk = {"name": "topk", "density": 0.1}
    cases += [
        ("topk-union", {"reducer": {**topk, "exchange": "union"}}, None, "fp32", 0),
        ("topk-fp16-values", {"reducer": {**topk, "value_dtype": "fp16"}}, None, "fp32", 0),
        ("allreduce-bf16", {"reducer": {"name": "allreduce", "bucket_mb": 0.002}}, None, "bf16", 0),
        ("topk-bf16", {"reducer": topk}, None, "bf16", 0),
        ("powersgd-bf16", {"reducer": {"name": "powersgd", **opts["reducer"]["powersgd"]}}, None, "bf16", 0),
        ("acpsgd-zero1", {"reducer": {"name": "acpsgd", **opts["reducer"]["acpsgd"]}}, None, "fp32", 1),
        ("topk-zero2-bf16", {"reducer": topk}, None, "bf16", 2),
    ]
    return cases


ONE_RANK_CASES = _one_rank_cases()


def run_one_rank(rank, world, label, method, order_name, precision, zero, gas=2, steps=4):
    """``steps`` optimizer steps of one case in a 1-rank process group, the consistency check every step and the
    trainer's stop vote on; every collective a ds_ext communicator issues is recorded (``ds_ext.comm.observe``)
    as (op, meter kind or "control", dtype, device) with its count. Errors are returned, not raised."""
    from collections import Counter

    import torch.distributed as dist

    import ds_ext
    from ds_ext.comm import observe
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine

    seen = Counter()

    def observer(comm, op, kind, tensor, async_op, issue):
        seen[(op, kind or "control", str(tensor.dtype).replace("torch.", ""), tensor.device.type,
              bool(comm.force_collectives))] += 1
        return issue()

    remove = observe(observer)
    micro = 1 if order_name else 4
    out = {"label": label, "world": world, "backend": dist.get_backend(), "error": None, "finite": False, "steps": 0}
    try:
        engine = make_engine(precision, gas, micro=micro, world=world, zero=zero)
        dev = next(engine.module.parameters()).device
        dtype = next(engine.module.parameters()).dtype
        order = None
        if order_name:  # whole epochs of 8 microbatches (PairBalance sorts at the epoch's end)
            steps = 8 // gas
            order = ORDERS.build(order_name, {}, 16 * world, rank, world, 0)
            order.plan(micro, gas, steps)
        att = ds_ext.attach(engine, method, check_every=1, order=order, total_steps=steps)
        att.vote_stop(lambda: False)  # the trainer's stop vote rides on the step's collectives
        out["forced"] = bool(att.comm.force_collectives)
        g = torch.Generator().manual_seed(1000 + rank)
        for _ in range(steps * gas):
            x = torch.randn(micro, 1, 8, 8, generator=g).to(dev, dtype)
            y = torch.randint(0, 10, (micro,), generator=g).to(dev)
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine.step()
        out["steps"] = att.steps
        out["finite"] = all(bool(torch.isfinite(p.detach()).all()) for p in engine.module.parameters())
        att.detach()
    except Exception as e:  # noqa: BLE001 -- reported to the test
        import traceback

        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
    finally:
        remove()
    out["collectives"] = dict(seen)
    return out
