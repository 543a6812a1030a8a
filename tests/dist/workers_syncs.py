"""Host synchronisations per optimizer step in ds_ext's frames (issue 27), on real DeepSpeed engines: the
scenarios of tests/dist/test_syncs.py and the functions its spawned ranks run. The counter:
``tests/dist/sync_counter.py``.

A scenario is a fresh engine (the tiny model, SGD with momentum, fp32) attached with ``ds_ext.attach``,
``nonfinite="skip"`` and the stop vote on (``attachment.vote_stop(lambda: False)``, what the trainer does),
``WARMUP`` optimizer steps, then ``STEPS`` steps inside a ``SyncCounter``. The method lists come from the
registries (``tests/roster.py``); ``SMALL`` keeps the options a method needs for the tiny model.
"""
from __future__ import annotations

import os
import traceback
from collections import Counter

import torch
import torch.nn.functional as F

from tests.roster import all_orders, all_reducers, all_syncs, exchanging_reducers

from .sync_counter import SyncCounter

WARMUP, STEPS = 2, 3
BUDGET = 1  # host synchronisations per optimizer step in ds_ext's frames
UNION = "topk exchange=union"
#: named exceptions to the budget: the union of the ranks' top-k index sets has a data-dependent size
#: (``torch.unique``: its size is read back) on top of the step's control exchange
BUDGETS = {UNION: 2}
CONTROL = "control: allreduce, check_every=1"

#: options small enough for the tiny model (tests/dist/workers.tiny_model), where a method's defaults are not
SMALL = {
    "allreduce": {"bucket_mb": 0.002},
    "powersgd": {"matrix_approximation_rank": 2, "start_powerSGD_iter": 0},
    "acpsgd": {"rank": 2},
    "topk": {"density": 0.1},
    "exdyna": {"density": 0.1},
    "half": {"bucket_mb": 0.002},
    "local": {"h": 2},
    "dssync": {"groups": 1},  # groups must divide the world: real subgroups in the 4-rank run
}


def budget(name: str) -> int:
    return BUDGETS.get(name, BUDGET)


def _reducer(name: str, **over) -> dict:
    return {"name": name, **SMALL.get(name, {}), **over}


def _sync(name: str, **over) -> dict:
    return {"name": name, **SMALL.get(name, {}), **over}


def _observes(order: str) -> bool:
    from ds_ext.registry import ORDERS

    return ORDERS.get(order).factory.observes_gradients


def covers(spec: dict) -> dict:
    """The registered names a scenario runs: {"reducer", "sync", "order"}."""
    m = spec["method"]
    return {"reducer": m["reducer"]["name"], "sync": m.get("sync", {"name": "none"})["name"],
            "order": spec.get("order", "rr")}


def scenarios_two_ranks() -> dict:
    """name -> spec of every scenario on 2 ranks (spec: ``method`` for ``attach``; optional ``order`` (an
    order's name), ``gas``, ``micro`` (default 1 and 8), ``zero``, ``check_every``). Every registered reducer,
    sync and order runs in at least one (``tests/unit/test_roster.py`` checks it)."""
    out = {}
    # the gradient-driven orders, each with the reducer it pairs with (cdgrab's own; allreduce otherwise)
    for o in (o for o in all_orders() if _observes(o)):
        red = o if o in all_reducers() else "allreduce"
        out[f"order {o} + {red}"] = {"method": {"reducer": _reducer(red)}, "order": o, "gas": 2, "micro": 1}
    # the synchronizers, with reducer none (local steps in between)
    for s in all_syncs():
        if s != "none":
            out[f"sync {s}"] = {"method": {"reducer": _reducer("none"), "sync": _sync(s)}}
    out["sync local QSR"] = {"method": {"reducer": _reducer("none"),
                                        "sync": {"name": "local", "period": "qsr", "alpha": 0.05, "h_base": 2}}}
    out["sync local avg_m + clip"] = {"method": {"reducer": _reducer("none"),
                                                 "sync": _sync("local", avg_m=True, clip_grad_norm=1.0)}}
    # every reducer not run above; the orders that do not watch gradients ride along (attach wires in none)
    passive = [o for o in all_orders() if not _observes(o)]
    # (cdgrab runs with its order; none with the synchronizers: alone it never communicates, which attach refuses)
    done = {c["reducer"] for c in map(covers, out.values()) if c["reducer"] == c["order"] or c["sync"] != "none"}
    for i, r in enumerate(r for r in all_reducers() if r not in done):
        out[r] = {"method": {"reducer": _reducer(r)}, "order": passive[i % len(passive)]}
    out["allreduce 4 buckets"] = {"method": {"reducer": _reducer("allreduce", bucket_mb=0.01)}}
    out["topk exchange=allgather"] = {"method": {"reducer": _reducer("topk", exchange="allgather")}}
    out[UNION] = {"method": {"reducer": _reducer("topk", exchange="union")}}
    for stage, r in ((1, "powersgd"), (1, "deepspeed"), (2, "topk"), (2, "exdyna")):
        out[f"ZeRO-{stage} {r}"] = {"method": {"reducer": _reducer(r)}, "zero": stage}
    # the negative control: the consistency check digests every parameter on the host each step
    # (ds_ext.deepspeed.step_hooks.parameter_fingerprint: .cpu() and .numpy() per parameter), so it must be caught
    out[CONTROL] = {"method": {"reducer": _reducer("allreduce")}, "check_every": 1}
    return out


def scenarios_four_ranks() -> dict:
    """4 ranks: DS-Sync with real subgroups, and hierarchical mode as 2 nodes x 2 (``nodes``: the launcher's
    node variables for nodes of 2 ranks) for every reducer it wraps, Local SGD and ZeRO-1 within the node."""
    out = {"dssync groups=2": {"method": {"reducer": _reducer("none"), "sync": _sync("dssync", groups=2)}}}
    for r in exchanging_reducers():  # = ds_ext.hierarchy.wrappable_reducers()
        out[f"hierarchical {r}"] = {"method": {"reducer": _reducer(r, hierarchical=True)}, "nodes": 2}
    out["hierarchical local"] = {"method": {"reducer": _reducer("none"), "sync": _sync("local", hierarchical=True)},
                                 "nodes": 2}
    out["hierarchical ZeRO-1 acpsgd (node_mpu)"] = {"method": {"reducer": _reducer("acpsgd", hierarchical=True)},
                                                    "nodes": 2, "zero": 1}
    return out


def _record() -> dict:
    return {"syncs": Counter(), "foreign": Counter(), "steps": 0, "skipped": 0, "error": None}


def _build(rank, world, spec):
    """The engine and its attachment for one scenario."""
    import ds_ext
    from ds_ext.deepspeed.zero import node_mpu
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine

    gas, micro, zero = spec.get("gas", 1), spec.get("micro", 8), spec.get("zero", 0)
    mpu = node_mpu() if spec.get("nodes") and zero else None
    engine = make_engine("fp32", gas, micro, world=world, zero=zero, mpu=mpu)
    order = None
    if spec.get("order"):
        # a long epoch: every measured microbatch is mid-epoch (no sort at an epoch boundary)
        spe = 100
        order = ORDERS.build(spec["order"], {}, spe * gas * micro * world, rank, world, 0)
        order.plan(micro, gas, spe)
    att = ds_ext.attach(engine, spec["method"], order=order, check_every=spec.get("check_every", 0),
                        nonfinite="skip", total_steps=100)
    if spec.get("vote", True):
        att.vote_stop(lambda: False)  # as the trainer: a signal asked no rank to stop
    return engine, att


def measure(rank, world, scenarios, warmup=WARMUP, steps=STEPS, ops_mode="torch"):
    """For each scenario: a fresh engine, ``warmup`` optimizer steps, then
    ``steps`` steps inside a ``SyncCounter``. Returns {name: {"syncs", "foreign", "steps", "skipped",
    "error"}} (``steps``: optimizer steps counted; ``skipped``: non-finite skips over the run, 0 expected).

    ``ops_mode`` sets ``DS_EXT_OPS`` (``torch``: the torch code of ``ds_ext.ops``, whose syncs are visible
    in Python; the compiled kernels' internals are not). A scenario that fails is reported with its error."""
    from ds_ext.registry import load_builtin
    from tests.dist.workers import rank_batches
    from tests.dist.workers_hierarchy import _launcher_env
    from tests.dist.workers_zero import _drop

    os.environ["DS_EXT_OPS"] = ops_mode
    load_builtin()
    out = {}
    for name, spec in scenarios.items():
        if spec.get("nodes"):
            _launcher_env(rank, world, spec["nodes"])
        rec, counter = _record(), None
        try:
            engine, att = _build(rank, world, spec)
            gas = spec.get("gas", 1)
            batches = rank_batches(rank, (warmup + steps) * gas, spec.get("micro", 8), torch.float32)
            for i, (x, y) in enumerate(batches):
                if i == warmup * gas:
                    counter, done = SyncCounter().__enter__(), att.steps
                engine.backward(F.cross_entropy(engine(x).float(), y))
                engine.step()
            counter.__exit__(None, None, None)
            counter, active = None, counter
            rec.update(syncs=active.syncs, foreign=active.foreign, steps=att.steps - done, skipped=att.skipped_steps)
            _drop(engine, att)
        except Exception as e:  # reported per scenario, the others still run (every rank fails alike)
            rec["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
            if counter is not None:
                counter.__exit__(None, None, None)
        out[name] = rec
    return out


# ------------------------------------------------------------------------------------------ the trainer
TRAINER = "trainer: quickstart (allreduce)"


def trainer_argv(run_dir: str, warmup: int = WARMUP, steps: int = STEPS) -> list:
    """The quickstart recipe, one short epoch: ``warmup`` + ``steps`` counted + 1 more step (the last step of
    an epoch logs the loss: a read on logging steps only, outside the counted steps)."""
    from .sync_counter import ROOT

    sets = [f"train.steps_per_epoch={warmup + steps + 1}", "train.epochs=1", f"log.dir={run_dir}",
            "log.every_steps=1000", "log.wandb.mode=disabled", "log.progress=false", "checkpoint.every_epochs=0",
            "train.check_consistency_every=0", "train.eval_every_epochs=0"]
    return ["--recipe", str(ROOT / "recipes" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]


def trainer_run(rank, world, argv, warmup=WARMUP, steps=STEPS) -> dict:
    """The trainer (``ds_ext.trainer.cli.train_main``) with a ``SyncCounter`` around optimizer steps
    ``warmup + 1`` .. ``warmup + steps`` of its loop (entered after ``on_step`` of step ``warmup``, left after
    ``on_step`` of the last counted step: the loop's data loading, forward, backward, ``engine.step`` and
    ``on_step`` in between). Runs in fresh ranks (``harness.run``): the trainer ends its process group."""
    from ds_ext.trainer import loop
    from ds_ext.trainer.cli import train_main

    os.environ["DS_EXT_OPS"] = "torch"
    rec, state = _record(), {}
    on_step = loop.Trainer.on_step

    def counted_on_step(self, *a, **k):
        stop = on_step(self, *a, **k)
        gstep = self.engine.global_steps
        if gstep == warmup:
            state["counter"], state["done"] = SyncCounter().__enter__(), self.att.steps
        elif gstep == warmup + steps and "counter" in state:
            state["counter"].__exit__(None, None, None)
            c = state.pop("counter")
            rec.update(syncs=c.syncs, foreign=c.foreign, steps=self.att.steps - state["done"],
                       skipped=self.att.skipped_steps)
        return stop

    loop.Trainer.on_step = counted_on_step
    try:
        rc = train_main(argv)
    finally:
        loop.Trainer.on_step = on_step
        if "counter" in state:
            state.pop("counter").__exit__(None, None, None)
    if rc != 0:
        rec["error"] = f"the trainer exited with {rc}"
    return {TRAINER: rec}
