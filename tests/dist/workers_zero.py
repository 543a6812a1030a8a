"""ZeRO stage 1/2 under every gradient reducer (tests/dist/test_zero.py): functions run inside spawned ranks."""
from __future__ import annotations

import torch

from .workers import flat_params, make_engine, train_steps

#: every gradient reducer, with options small enough for the tiny model (tests/workers.tiny_model)
REDUCERS = {
    "allreduce": {"name": "allreduce", "bucket_mb": 0.002},
    "powersgd": {"name": "powersgd", "matrix_approximation_rank": 2, "start_powerSGD_iter": 2},
    "acpsgd": {"name": "acpsgd", "rank": 2},
    "topk": {"name": "topk", "density": 0.1},
    "exdyna": {"name": "exdyna", "density": 0.1},
    "signsgd": {"name": "signsgd"},
}


def zero_vs_stage0(rank, world, reducers, stages=(1, 2), precisions=("fp32",), steps=10, gas=1, clip=0.0,
                   adam=False):
    """For each reducer x precision: the parameters after ``steps`` steps at stage 0 and at each ZeRO stage,
    the meter's bytes by kind, and the per-rank optimizer-state bytes."""
    import ds_ext

    out = {}
    for precision in precisions:
        for name in reducers:
            for stage in (0,) + tuple(stages):
                engine = make_engine(precision, gas, world=world, zero=stage, clip=clip, adam=adam)
                att = ds_ext.attach(engine, {"reducer": dict(REDUCERS.get(name, {"name": name}))})
                train_steps(engine, att, rank, steps, gas, 8)
                out[(precision, name, stage)] = {
                    "params": flat_params(engine), "by_kind": dict(att.meter.by_kind),
                    "opt_bytes": optimizer_state_bytes(engine)}
                _drop(engine, att)
    return out


def _drop(engine, att) -> None:
    """Free an engine now: left to the garbage collector, DeepSpeed's ZeRO optimizer was finalized in the
    middle of the next engine's imports, which Python 3.11's import lock reported as a KeyError."""
    import gc

    att.detach()
    engine.destroy()
    del engine, att
    gc.collect()


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state (momentum and moment buffers) this rank holds; ZeRO's fp32 master partition
    (the ``single_partition_of_fp32_groups`` it steps) is not included."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def zero_comms(rank, world, reducers, stage=1, steps=3, gas=1, precision="fp32"):
    """For each reducer: an engine at ``stage`` with DeepSpeed's comms logger on, ``steps`` steps, then
    every collective the logger saw (``{log_name: {msg_size: calls}}``) next to the meter's bytes by kind."""
    import deepspeed.comm as dc

    import ds_ext

    out = {}
    for name in reducers:
        engine = make_engine(precision, gas, world=world, zero=stage,
                             extra={"comms_logger": {"enabled": True, "prof_all": True, "verbose": False}})
        spec = dict(REDUCERS.get(name, {"name": name}))
        if name == "powersgd":
            spec["start_powerSGD_iter"] = 0
        att = ds_ext.attach(engine, {"reducer": spec})
        dc.comms_logger.comms_dict.clear()
        train_steps(engine, att, rank, steps, gas, 8)
        seen = {log: {int(size): int(v[0]) for size, v in sizes.items()}
                for log, sizes in dc.comms_logger.comms_dict.items()}
        grad_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        out[name] = {"logged": seen, "by_kind": dict(att.meter.by_kind), "grad_bytes": grad_bytes}
        _drop(engine, att)
    return out



def detach_and_refusals(rank, world):
    """ZeRO-1 engine: 2 steps with acpsgd attached, detach, 2 more steps with ZeRO's own reduction (its hooks
    restored); parameters after each phase. Then attach over a one-rank group: the error text."""
    import torch.distributed as dist

    import ds_ext

    engine = make_engine("fp32", 1, world=world, zero=1)
    att = ds_ext.attach(engine, {"reducer": dict(REDUCERS["acpsgd"])})
    train_steps(engine, att, rank, 2, 1, 8)
    hooks_while_attached = len(engine.optimizer._grad_acc_hooks)
    first = flat_params(engine)
    att.detach()
    hooks_after = len(engine.optimizer._grad_acc_hooks)
    train_steps(engine, None, rank + 10, 2, 1, 8)
    second = flat_params(engine)
    mine = [dist.new_group([r]) for r in range(world)][rank]
    try:
        ds_ext.attach(engine, {"reducer": {"name": "allreduce"}}, group=mine)
        err = None
    except ValueError as e:
        err = str(e)
    return {"first": first, "second": second, "hooks": (hooks_while_attached, hooks_after), "error": err}
