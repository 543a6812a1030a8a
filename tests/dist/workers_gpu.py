"""Functions executed inside the spawned ranks for tests/dist/test_gpu.py: every method on CUDA tensors.

All ranks share the one GPU (``cuda:0``; NCCL refuses two ranks on one device, so the process group
is gloo, which takes CUDA tensors): the methods' arithmetic, device placement and the communication
layer run exactly as on a GPU cluster; only the wire is gloo's.
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


def run_case(rank, world, label, method, order_spec, steps=6, gas=2):
    """Train ``steps`` optimizer steps on CUDA with rank-specific data and the consistency check on
    every step it applies to; returns parameters after each step, the comm device and errors."""
    import warnings

    import ds_ext
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine

    # any CUDA op without a deterministic implementation on our path (atomics) warns: collected below
    torch.use_deterministic_algorithms(True, warn_only=True)
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always")

    engine = make_engine("fp32", gas, micro=1 if order_spec else 4, world=world, zero=ZERO.get(label, 0))
    if label.endswith("_hier"):  # the launcher's variables for nodes of 2 (after the engine took cuda:0)
        import os

        os.environ.update(LOCAL_SIZE="2", LOCAL_RANK=str(rank % 2), CROSS_RANK=str(rank // 2),
                          CROSS_SIZE=str(world // 2))
    dev = next(engine.module.parameters()).device
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
            x = torch.randn(micro, 1, 8, 8, generator=g).to(dev)
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
            "nondeterministic": nondet}
