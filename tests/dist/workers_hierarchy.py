"""Hierarchical (node-aware) reducers and averaging: runs on ``LoopbackWorld`` ranks, the flat reference
they must equal, and the real-process worker (tests/harness.py) of tests/dist/test_hierarchy.py."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

# non-square both ways, a conv kernel, square, 1-D, degenerate shapes (tests/dist/workers.py: LOWRANK_SHAPES)
SHAPES = [(16, 8), (8, 16), (6,), (4, 3, 3, 3), (5, 5), (7,), (1, 12), (12, 1, 1, 1), (1, 1)]


def named_zeros(shapes, prefix: str = "p", dtype=torch.float32) -> list:
    return [(f"{prefix}{i}", torch.nn.Parameter(torch.zeros(s, dtype=dtype))) for i, s in enumerate(shapes)]


def rank_grads(world: int, steps: int, shapes=SHAPES, seed: int = 7000,
               dtype=torch.float32) -> List[List[List[torch.Tensor]]]:
    """``grads[t][rank][i]``: different random gradients on every rank and step, in ``dtype``."""
    out = []
    for t in range(steps):
        g = [torch.Generator().manual_seed(seed + 100 * t + r) for r in range(world)]
        out.append([[torch.randn(s, generator=g[r]).to(dtype) for s in shapes] for r in range(world)])
    return out


def node_means(per_rank: Sequence[Sequence[torch.Tensor]], local_size: int) -> List[List[torch.Tensor]]:
    """``means[node][i]``: the node mean with the arithmetic of the node all_reduce_mean (fp32, ranks added in
    rank order, then divided by the node size: ``ds_ext/comm.py`` LoopbackComm; for 2 ranks gloo's a + b)."""
    out = []
    for k in range(len(per_rank) // local_size):
        rows = per_rank[k * local_size:(k + 1) * local_size]
        means = []
        for i in range(len(rows[0])):
            acc = rows[0][i].float().clone()
            for row in rows[1:]:
                acc.add_(row[i].float())
            means.append(acc.div_(local_size))
        out.append(means)
    return out


def reference(name: str, options: dict, shapes, node_grads, local_size: int, dtype=torch.float32) -> dict:
    """The flat method over the nodes: a ``LoopbackWorld`` of n_nodes ranks whose inputs are the node means
    (``node_grads[t][node][i]``, fp32, rounded to the parameters' ``dtype``), the parameters split into the
    hierarchical shards, each shard run as its own method instance, as its owner would (``grad_ready`` in
    reverse order, then ``finish``). Returns
    ``{"applied": [node][t] {i: grad}, "state": [node][shard], "bytes": [node][shard] by_kind}``."""
    from ds_ext.testing import LoopbackWorld
    from ds_ext.topology import shard_params
    from ds_ext.meter import CommMeter
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    n_nodes = len(node_grads[0])
    shards = shard_params(shapes, local_size)

    def body(comm):
        k = comm.rank
        named = named_zeros(shapes, dtype=dtype)
        meters = [CommMeter() for _ in shards]
        reds = [REDUCERS.build(name, options, [named[i] for i in s], comm=comm.with_meter(m)) if s else None
                for s, m in zip(shards, meters)]
        applied = []
        for means in node_grads:
            got: Dict[int, torch.Tensor] = {}
            for s, red in zip(shards, reds):
                if red is None:
                    continue
                for i in s:
                    named[i][1].grad = means[k][i].to(dtype, copy=True)
                for i in reversed(s):
                    red.grad_ready(named[i][1])
                red.finish()
                for i in s:
                    got[i] = named[i][1].grad.clone()
            applied.append(got)
        return {"applied": applied, "state": [r.state_dict() if r is not None else None for r in reds],
                "bytes": [dict(m.by_kind) for m in meters]}

    res = LoopbackWorld(n_nodes).run(body)
    return {key: [r[key] for r in res] for key in ("applied", "state", "bytes")}


def hier_loopback(name: str, options: dict, shapes, grads, local_size: int, flat_too: bool = False,
                  dtype=torch.float32) -> list:
    """``HierarchicalReducer`` around ``name`` on a ``LoopbackWorld`` of ``len(grads[0])`` ranks, fed
    ``grads[t][rank]``; per rank: applied gradients per step, inner state, meter kinds, local rank. With
    ``flat_too`` the flat method runs next to it on the same gradients (its own parameters and meter)."""
    from ds_ext.testing import LoopbackWorld
    from ds_ext.hierarchy import build_hierarchical
    from ds_ext.topology import Topology
    from ds_ext.meter import CommMeter
    from ds_ext.registry import REDUCERS

    world = len(grads[0])

    def body(comm):
        r = comm.rank
        meter = CommMeter()
        named = named_zeros(shapes, dtype=dtype)
        red = build_hierarchical(name, options, named, comm.with_meter(meter), Topology.explicit(r, world, local_size))
        runs = [(named, red, "applied")]
        fmeter = CommMeter()
        if flat_too:
            fnamed = named_zeros(shapes, dtype=dtype)
            runs.append((fnamed, REDUCERS.build(name, options, fnamed, comm=comm.with_meter(fmeter)), "flat"))
        rec = {"applied": [], "flat": [], "local_rank": red.topology.local_rank, "shard": list(red.shard)}
        for step in grads:
            for sets, reducer, key in runs:
                for (_, p), g in zip(sets, step[r]):
                    p.grad = g.clone()
                for _, p in reversed(sets):  # as the engine's post-accumulate hooks call it
                    reducer.grad_ready(p)
                reducer.finish()
                rec[key].append([p.grad.clone() for _, p in sets])
            meter.end_step()
        rec["state"] = red.inner.state_dict() if red.inner is not None else None
        rec["by_kind"] = dict(meter.by_kind)
        rec["flat_by_kind"] = dict(fmeter.by_kind) if flat_too else None
        rec["stats"] = red.stats()
        return rec

    return LoopbackWorld(world).run(body)


# ------------------------------------------------------------------------------------- real processes
def _launcher_env(rank: int, world: int, local_size: int) -> None:
    """The launcher's per-node variables for nodes of ``local_size`` slots (the harness sets LOCAL_SIZE=world)."""
    os.environ.update(LOCAL_SIZE=str(local_size), LOCAL_RANK=str(rank % local_size),
                      CROSS_RANK=str(rank // local_size), CROSS_SIZE=str(world // local_size))


def engine_run(rank: int, world: int, runs: dict, steps: int = 3, local_size: int = 2, zero: int = 0) -> dict:
    """4 gloo ranks as 2 nodes x 2: a DeepSpeed engine per run with ``ds_ext.attach(engine, {"reducer":
    {name, **options, "hierarchical": True}})`` (topology from the launcher's variables). Records every
    rank's local gradients before the step (an unmetered all_gather), the gradients the reducer hands the
    optimizer, the parameters and the meter."""
    import ds_ext
    from ds_ext.hierarchy import hierarchical_collectives
    from tests.dist.workers import flat_params, make_engine, rank_batches

    os.environ["DS_EXT_OPS"] = "torch"  # no kernel build inside a test (results are the same either way)
    _launcher_env(rank, world, local_size)
    out = {}
    for key, (reducer, options) in runs.items():
        engine = make_engine("fp32", 1, world=world, zero=zero)
        att = ds_ext.attach(engine, {"reducer": {"name": reducer, **options, "hierarchical": True}})
        red, named = att.reducer, [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        rec = {"local": [], "applied": [], "params": []}
        finish = red.finish

        def recorded_finish():
            finish()
            rec["applied"].append(torch.cat([p.grad.detach().reshape(-1) for _, p in named]).clone())

        red.finish = recorded_finish
        plain = att.comm.with_meter(None)
        for x, y in rank_batches(rank, steps, 8, torch.float32):
            engine.backward(F.cross_entropy(engine(x).float(), y))
            local = torch.cat([p.grad.detach().reshape(-1) for _, p in named])
            rec["local"].append(plain.all_gather(local))  # [world, N], for the reference (not metered)
            engine.step()
            rec["params"].append(flat_params(engine))
        shapes = [tuple(p.shape) for _, p in named]
        rec.update(by_kind=dict(att.meter.by_kind), shapes=shapes, local_rank=red.topology.local_rank,
                   topology=red.topology,
                   predicted=[(c.op, c.nbytes, c.group, type(c).__name__) for c in hierarchical_collectives(
                       red.inner_cls, shapes, world, local_size, red.options, local_rank=red.topology.local_rank)])
        out[key] = rec
        att.detach()
    return out


def zero_node_run(rank: int, world: int, steps: int = 3, local_size: int = 2, stages=(1,)) -> dict:
    """4 gloo ranks as 2 nodes x 2: hierarchical acpsgd (rank 2) at ZeRO 0, then at each ZeRO stage of
    ``stages`` with the optimizer state partitioned within the node (``ds_ext.deepspeed.zero.node_mpu``). Per stage:
    the parameters after every step, this rank's optimizer-state bytes, the meter's kinds, the ranks of ZeRO's group, DeepSpeed's
    save flags while attached; at stage 1 also what ``engine.step`` says after ``detach``."""
    import torch.distributed as dist

    import ds_ext
    from ds_ext.deepspeed.zero import node_mpu
    from tests.dist.workers import flat_params, make_engine, train_steps
    from tests.dist.workers_zero import _drop, optimizer_state_bytes

    os.environ["DS_EXT_OPS"] = "torch"
    _launcher_env(rank, world, local_size)
    out = {}
    for stage in (0,) + tuple(stages):
        engine = make_engine("fp32", 1, world=world, zero=stage, mpu=node_mpu() if stage else None)
        att = ds_ext.attach(engine, {"reducer": {"name": "acpsgd", "rank": 2, "hierarchical": True}})
        rec: list = []
        train_steps(engine, att, rank, steps, 1, 8, record=rec)
        opt = engine.optimizer
        out[stage] = {"params": rec, "opt_bytes": optimizer_state_bytes(engine), "by_kind": dict(att.meter.by_kind),
                      "group": list(dist.get_process_group_ranks(opt.dp_process_group)) if stage else None,
                      "saves": (engine.save_non_zero_checkpoint, engine.save_zero_checkpoint)}
        if stage == 1:
            att.detach()
            out[stage]["saves_after"] = (engine.save_non_zero_checkpoint, engine.save_zero_checkpoint)
            try:
                engine.step()
                out[stage]["after_detach"] = None
            except RuntimeError as e:
                out[stage]["after_detach"] = str(e)
            att = ds_ext.attach(engine, {"reducer": {"name": "acpsgd", "rank": 2, "hierarchical": True}})
            train_steps(engine, att, rank + 10, 1, 1, 8)  # attached again: DeepSpeed's own step underneath
            out[stage]["reattached"] = flat_params(engine)
        _drop(engine, att)
    return out


def run_trainer_as_nodes(rank: int, world: int, argv: list, local_size: int = 2) -> int:
    """The trainer (``ds_ext.trainer.cli.train_main``) on ranks laid out as nodes of ``local_size`` (launcher variables)."""
    from ds_ext.trainer.cli import train_main as main

    _launcher_env(rank, world, local_size)
    return main(argv)


def local_sgd_run(rank: int, world: int, steps: int = 4, h: int = 2, bad_rank: int = 1, bad_step: int = 1,
                  local_size: int = 2) -> dict:
    """Hierarchical Local SGD through ``ds_ext.attach`` (reducer none, sync local with ``hierarchical``),
    4 ranks as 2 nodes x 2; rank ``bad_rank``'s input is NaN on optimizer step ``bad_step`` (a local step).
    Records the parameters after every step, the skip events and the meter."""
    import ds_ext
    from tests.dist.workers import flat_params, make_engine, rank_batches

    _launcher_env(rank, world, local_size)
    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, {"reducer": "none", "sync": {"name": "local", "h": h, "hierarchical": True}},
                        total_steps=steps)
    rec = []
    for i, (x, y) in enumerate(rank_batches(rank, steps, 8, torch.float32)):
        if rank == bad_rank and i + 1 == bad_step:
            x = x * float("nan")
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()
        rec.append(flat_params(engine))
    out = {"params": rec, "events": list(att.nonfinite_events), "by_kind": dict(att.meter.by_kind)}
    att.detach()
    return out


def control_relay_run(rank: int, world: int, reducer: str, options: dict, steps: int = 3, bad_rank: int = 3,
                      bad_step: int = 2, one_param: bool = False, local_size: int = 2) -> dict:
    """Hierarchical ``reducer`` through ``ds_ext.attach`` with the stop vote on (as the trainer), 4 ranks as
    2 nodes x 2; rank ``bad_rank``'s input is NaN on step ``bad_step``; ``one_param``: a one-parameter model
    (local rank 1 then has no shard and no wrapped method: the flags reach it through the node gather).
    Records the parameters, the skip events and the ``tolist`` calls (host reads) of every step."""
    import ds_ext
    from tests.dist.workers import flat_params, make_engine, rank_batches

    os.environ["DS_EXT_OPS"] = "torch"
    _launcher_env(rank, world, local_size)
    model = None
    if one_param:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10, bias=False))
    engine = make_engine("fp32", 1, world=world, model=model)
    att = ds_ext.attach(engine, {"reducer": {"name": reducer, **options, "hierarchical": True}})
    att.vote_stop(lambda: False)
    reads, orig = [], torch.Tensor.tolist

    def counted(self):
        reads[-1] += 1
        return orig(self)

    rec = []
    try:
        torch.Tensor.tolist = counted
        for i, (x, y) in enumerate(rank_batches(rank, steps, 8, torch.float32)):
            if rank == bad_rank and i + 1 == bad_step:
                x = x * float("nan")
            reads.append(0)
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine.step()
            rec.append(flat_params(engine))
    finally:
        torch.Tensor.tolist = orig
    out = {"params": rec, "events": list(att.nonfinite_events), "reads": reads,
           "no_shard": att.reducer.inner is None}
    att.detach()
    return out
