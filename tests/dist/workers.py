"""Functions executed inside the spawned ranks (see tests/harness.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def make_engine(precision: str = "fp32", gas: int = 1, micro: int = 8, world: int = 2, lr: float = 0.05, zero: int = 0,
                clip: float = 0.0, adam: bool = False, extra: Optional[dict] = None, mpu=None, model=None):
    """The tiny model under DeepSpeed: SGD with momentum (``adam``: AdamW, lr 1e-3), DeepSpeed's gradient
    clipping at ``clip`` (0: off), ``extra`` merged into the config (e.g. the comms logger), ``mpu``
    (``ds_ext.deepspeed.zero.node_mpu()``: ZeRO partitioned within the node; DeepSpeed's batch counts its ranks)."""
    import deepspeed

    from ds_ext.deepspeed.zero import _scoped_mpu

    model = model if model is not None else tiny_model()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01) if adam
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    dp = world if mpu is None else mpu.get_data_parallel_world_size()
    cfg = {"train_batch_size": micro * gas * dp, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": gas, "steps_per_print": 10**12, "zero_optimization": {"stage": zero},
           "zero_allow_untested_optimizer": True, "gradient_clipping": clip,
           "bf16": {"enabled": precision == "bf16"}, **(extra or {})}
    with _scoped_mpu():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu)
    return engine


def rank_batches(rank: int, n: int, micro: int, dtype):
    """Different data on every rank (seeded by rank)."""
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(n):
        yield torch.randn(micro, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (micro,), generator=g)


def train_steps(engine, attachment, rank, steps, gas, micro, record=None):
    dtype = next(engine.module.parameters()).dtype
    for i, (x, y) in enumerate(rank_batches(rank, steps * gas, micro, dtype)):
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        if record is not None and (i + 1) % gas == 0:
            record.append(flat_params(engine))


def flat_params(engine) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()]).clone()


def compare_reducers(rank, world, configs, steps=10, bucket_mb=0.002):
    """For each (precision, gas): train with DeepSpeed's own allreduce and with ours; return params."""
    import ds_ext

    out = {}
    for precision, gas in configs:
        for reducer in ("deepspeed", "allreduce"):
            engine = make_engine(precision, gas, world=world)
            spec = {"name": reducer, "bucket_mb": bucket_mb} if reducer == "allreduce" else {"name": reducer}
            att = ds_ext.attach(engine, {"reducer": spec})
            train_steps(engine, att, rank, steps, gas, 8)
            out[(precision, gas, reducer)] = {"params": flat_params(engine), "bytes": att.meter.total_bytes,
                                              "steps": att.meter.steps,
                                              "buckets": len(getattr(att.reducer, "fusion", None).buckets)
                                              if reducer == "allreduce" else 0}
    return out


def per_step_params(rank, world, reducer, steps=6, check_every=0, precision="fp32", options=None):
    """Parameters after every step with rank-specific data; also whether the runtime check fired."""
    import ds_ext
    from ds_ext.deepspeed.step_hooks import DesyncError

    engine = make_engine(precision, 1, world=world)
    # reducer 'none' alone never communicates (the check refuses it): here it is the deliberate negative control
    att = ds_ext.attach(engine, {"reducer": {"name": reducer, **(options or {})}}, check_every=check_every,
                        check=reducer != "none")
    record = []
    err = None
    try:
        train_steps(engine, att, rank, steps, 1, 8, record)
    except DesyncError as e:
        err = str(e)
    return {"record": record, "desync": err}


def run_trainer(rank, world, argv):
    from ds_ext.trainer.cli import train_main as main

    return main(argv)


def flat_params_of(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


# non-square both ways, a conv kernel, square, 1-D, and degenerate shapes (one row, one column, 1 x 1)
LOWRANK_SHAPES = [(16, 8), (8, 16), (6,), (4, 3, 3, 3), (5, 5), (7,), (1, 12), (12, 1, 1, 1), (1, 1)]


def lowrank_invariants(rank, world, reducer, options, steps=6, seed_per_rank=False, dtype=torch.float32,
                       round_to=None, comm=None, shapes=None):
    """Drive a low-rank reducer directly with random per-rank gradients; record what it applies
    and the exact mean gradient computed by a plain all_reduce next to it. Gradients are held in
    ``dtype``; ``round_to`` first rounds the random gradients to that dtype (to compare runs).
    ``comm``: a communicator (``LoopbackWorld`` rank) instead of the process group; ``shapes``: the
    parameters' shapes (default ``LOWRANK_SHAPES``)."""
    from ds_ext.comm import Communicator
    from ds_ext.meter import CommMeter
    from ds_ext.registry import REDUCERS

    shapes = LOWRANK_SHAPES if shapes is None else shapes
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opts = dict(options)
    if seed_per_rank:
        opts["seed"] = rank
    meter = CommMeter()
    comm = (comm or Communicator(device="cpu")).with_meter(meter)
    plain = comm.with_meter(None)
    red = REDUCERS.build(reducer, opts, named, comm=comm)
    g = torch.Generator().manual_seed(500 + rank)
    rec = {"applied": [], "mean": [], "bytes": [], "P": [], "Q": []}
    for t in range(steps):
        raw = [torch.randn(s, generator=g) for s in shapes]
        if round_to is not None:
            raw = [r.to(round_to).float() for r in raw]
        for p, r in zip(params, raw):
            p.grad = r.to(dtype, copy=True)
        for p in reversed(params):
            red.grad_ready(p)
        red.finish()
        rec["bytes"].append(meter.end_step())
        rec["applied"].append([p.grad.clone() for p in params])
        mean = []
        for r in raw:
            mean.append(plain.all_reduce(r.clone()) / world)
        rec["mean"].append(mean)
        rec["P"].append({k: v.clone() for k, v in red.P.items()})
        rec["Q"].append({k: v.clone() for k, v in red.Q.items()})
    rec["E"] = {k: v.clone() for k, v in red.E.items()}
    rec["compressed"] = [m.compressed for m in red.metas]
    rec["r"] = [m.r for m in red.metas]
    return rec


def lowrank_dtypes(rank, world, runs, comm=None):
    """Several ``lowrank_invariants`` runs in one set of processes: {name: record}."""
    return {name: lowrank_invariants(rank, world, comm=comm, **kw) for name, kw in runs.items()}


def loopback(fn, world, **kw):
    """``fn(rank, world, comm=..., **kw)`` on every rank of a ``LoopbackWorld`` (threads, one process):
    the method arithmetic of a multi-rank run in milliseconds; returns the per-rank results."""
    from ds_ext.testing import LoopbackWorld

    return LoopbackWorld(world).run(lambda comm: fn(comm.rank, world, comm=comm, **kw))


def powersgd_launch_order(rank, world, steps=3, bucket_mb=0.001, gas=1):
    """PowerSGD through DeepSpeed (start_powerSGD_iter 1, small fusion groups, ``gas`` micro-batches per step),
    pipelined and serial: ``workers_overlap.launch_events`` of each (the parameters after every step and this
    rank's sequence of ``ready`` / collective kinds / ``finish`` events) and its number of fusion groups."""
    from tests.dist.workers_overlap import launch_events

    return {pipelined: launch_events(rank, world, {"name": "powersgd", "rank": 2, "start_powerSGD_iter": 1,
                                                   "bucket_mb": bucket_mb, "pipelined": pipelined}, steps, gas)
            for pipelined in (True, False)}


def zero3_refusal(rank, world, reducer):
    """attach() on a ZeRO-3 engine: the error text (or None if it was accepted)."""
    import ds_ext

    engine = make_engine("fp32", 1, world=world, zero=3)
    try:
        ds_ext.attach(engine, {"reducer": {"name": reducer}})
    except ValueError as e:
        return str(e)
    return None


def comm_dtype_run(rank, world, comm_dtype, steps=3):
    """A bf16 engine whose config sets ``communication_data_type``: bytes our allreduce sends per step
    and the parameters after training (DeepSpeed's own reduction with the same setting next to it)."""
    import deepspeed

    import ds_ext

    out = {}
    for reducer in ("allreduce", "deepspeed"):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        cfg = {"train_batch_size": 8 * world, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**12,
               "gradient_clipping": 0.0, "bf16": {"enabled": True}, "communication_data_type": comm_dtype}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        att = ds_ext.attach(engine, {"reducer": {"name": reducer}})
        train_steps(engine, att, rank, steps, 1, 8)
        out[reducer] = {"bytes": att.meter.total_bytes // steps, "params": flat_params(engine),
                        "wire": str(att.comm.wire_dtype)}
    return out


# ---- one owner of the per-rank state file (tests/e2e/test_checkpoint_owner.py) --------------------------------

def own_loop_save_and_swap(rank: int, world: int, trainer_dir: str, swap_dir: str) -> dict:
    """An own loop with PowerSGD: 2 steps, ``engine.save_checkpoint(trainer_dir, tag="mid")`` (where a trainer
    will look); then a save to ``swap_dir`` (tag "t"), rank 0's rank file copied over rank 1's, and what
    ``engine.load_checkpoint`` raises on each rank (type and text)."""
    import shutil
    from pathlib import Path

    import ds_ext
    from ds_ext.deepspeed.checkpoint import CheckpointError

    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, {"reducer": {"name": "powersgd", "rank": 2, "start_powerSGD_iter": 0}})
    train_steps(engine, att, rank, 2, 1, 8)
    engine.save_checkpoint(trainer_dir, tag="mid")
    engine.save_checkpoint(swap_dir, tag="t")
    att.comm.barrier()
    if rank == 0:
        shutil.copy(Path(swap_dir) / "t" / "ds_ext_rank0.pt", Path(swap_dir) / "t" / "ds_ext_rank1.pt")
    att.comm.barrier()
    out = {"error": None, "type": None, "is_checkpoint_error": False}
    try:
        engine.load_checkpoint(swap_dir, tag="t")
    except Exception as e:  # noqa: BLE001 -- the test reads which
        out.update(error=str(e), type=type(e).__name__, is_checkpoint_error=isinstance(e, CheckpointError))
    att.detach()
    engine.destroy()
    return out


def own_loop_loads_trainer_checkpoint(rank: int, world: int, sets: list, ckpt_dir: str) -> dict:
    """The quickstart recipe's engine and methods built as the trainer builds them, then an own loop's
    ``engine.load_checkpoint(ckpt_dir)`` (``latest``): the attachment's state and the parameters it holds."""
    from ds_ext.trainer.setup import initialize
    from ds_ext.meter import CommMeter
    from ds_ext.registry import DATASETS, MODELS, ORDERS, load_builtin
    from ds_ext.trainer.recipe import load_recipe
    from tests.e2e.workers_faults import QUICK

    load_builtin()
    recipe = load_recipe(QUICK, sets)
    bundle = DATASETS.build(recipe.data.name, recipe.data.options, root=recipe.data.root)
    model = MODELS.build(recipe.model.name, recipe.model.options, data=bundle)
    order = ORDERS.build(recipe.method.order.name, recipe.method.order.options, len(bundle.train), rank, world,
                         recipe.train.seed)
    engine, att, _ = initialize(recipe, model, recipe.train.steps_per_epoch, CommMeter(), order=order)
    path, _ = engine.load_checkpoint(ckpt_dir)
    out = {"path": path, "global_steps": engine.global_steps, "attachment": att.state_dict(),
           "module": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}
    att.detach()
    engine.destroy()
    return out
