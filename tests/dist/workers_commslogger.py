"""DeepSpeed's comms logger vs ds_ext's communication meter, on real engines (tests/dist/test_commslogger.py).

Every collective of ds_ext goes through ``ds_ext.comm.Communicator``, which calls ``deepspeed.comm`` with
``log_name=f"ds_ext/{kind}"`` (``ds_ext/control`` for unmetered control data) and adds the payload to
the meter under ``kind``. With ``"comms_logger": {"enabled": true, "prof_all": true}`` in the engine's
config, ``deepspeed.initialize`` calls ``deepspeed.comm.configure`` and every ``deepspeed.comm``
collective lands in ``deepspeed.comm.comms_logger.comms_dict``:
``{log_name: {msg_size: [count, latencies, algbws, busbws]}}``.

How DeepSpeed 0.19.8 sizes a message (``deepspeed/comm/utils.py: get_msg_size_from_args``): the bytes of
the argument named ``tensor`` (``element_size() * nelement()``). For ``all_reduce`` and ``broadcast``
that is the tensor reduced / sent. For ``all_gather_into_tensor(output_tensor, tensor, ...)`` it is
``tensor``, i.e. the INPUT, this rank's contribution (not the world-size times larger output; the
world-size factor appears only in the bandwidth DeepSpeed derives from it, ``calc_bw_log``). Our meter
also counts the tensor this rank hands in, so msg_size x count compares with the meter as it is: no
conversion by the world size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCERS = {
    "allreduce": {"name": "allreduce"},
    "powersgd": {"name": "powersgd", "start_powerSGD_iter": 0},
    "acpsgd": {"name": "acpsgd"},
    "topk": {"name": "topk"},
    "exdyna": {"name": "exdyna"},
    "signsgd": {"name": "signsgd"},
    "deepspeed": {"name": "deepspeed"},
}


def _engine(world: int, micro: int = 8):
    import deepspeed

    from tests.dist.workers import tiny_model

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": 1, "steps_per_print": 10**12, "zero_optimization": {"stage": 0},
           "gradient_clipping": 0.0, "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def logged(comms_dict: dict) -> dict:
    """{log_name: [total bytes (msg_size x count), calls]} of a comms logger record."""
    out = {}
    for name, sizes in comms_dict.items():
        out[name] = [sum(int(size) * int(v[0]) for size, v in sizes.items()), sum(int(v[0]) for v in sizes.values())]
    return out


def compare(rank, world, reducers=None, steps=4, ops_mode="torch"):
    """For each reducer: a fresh engine with the comms logger on, the logger's record cleared after
    ``deepspeed.initialize`` and ``attach`` (start-up broadcasts), ``steps`` optimizer steps, then the
    logger's record next to the meter's. Returns {reducer: {"logged", "by_kind", "total", "steps",
    "enabled", "error"}}."""
    import os
    import traceback

    import deepspeed.comm as dc

    from ds_ext.deepspeed.attach import attach
    from tests.dist.workers import rank_batches

    os.environ["DS_EXT_OPS"] = ops_mode
    out = {}
    for name, spec in (reducers or REDUCERS).items():
        rec = {"logged": {}, "by_kind": {}, "total": 0, "steps": 0, "error": None, "enabled": None}
        try:
            engine = _engine(world)
            att = attach(engine, {"reducer": dict(spec)}, check_every=0)
            rec["enabled"] = bool(dc.comms_logger.enabled and dc.comms_logger.prof_all)
            dc.comms_logger.reset_data()
            dtype = next(engine.module.parameters()).dtype
            for x, y in rank_batches(rank, steps, 8, dtype):
                engine.backward(F.cross_entropy(engine(x).float(), y))
                engine.step()
            rec.update(logged=logged(dc.comms_logger.comms_dict), by_kind=dict(att.meter.by_kind),
                       total=att.meter.total_bytes, steps=att.meter.steps)
            att.detach()
        except Exception as e:  # reported per reducer; the others still run (every rank fails alike)
            rec["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        out[name] = rec
    return out
