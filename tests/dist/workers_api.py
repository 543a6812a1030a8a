"""Own-loop API (tests/dist/test_api.py): functions run inside spawned ranks."""
from __future__ import annotations

import gc

import torch

from .workers import flat_params, make_engine, rank_batches

POWERSGD = {"name": "powersgd", "rank": 2, "start_powerSGD_iter": 0}


def _steps(engine, rank: int, first: int, n: int) -> None:
    """Optimizer steps ``first`` .. ``first + n - 1`` on this rank's fixed batches."""
    batches = list(rank_batches(rank, first + n, 8, torch.float32))[first:]
    for x, y in batches:
        engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()


def _drop(engine, att) -> None:
    att.detach()
    engine.destroy()
    gc.collect()


def config_routes(rank: int, world: int, steps: int = 3) -> dict:
    """The same PowerSGD run attached three ways: from the DeepSpeed config's ``ds_ext`` block with
    ``ds_ext.attach(engine)``, from a dict, from a typed options object. Then what a bad ``ds_ext`` block and a
    bad typed block say."""
    import ds_ext
    from ds_ext.reducers.lowrank import PowerSGDOptions

    out = {}
    routes = {"ds_config": (None, {"ds_ext": {"reducer": dict(POWERSGD)}}),
              "dict": ({"reducer": dict(POWERSGD)}, None),
              "typed": ({"reducer": PowerSGDOptions(rank=2, start_powerSGD_iter=0), "sync": "none"}, None)}
    for key, (method, extra) in routes.items():
        engine = make_engine("fp32", 1, world=world, extra=extra)
        att = ds_ext.attach(engine, method)
        _steps(engine, rank, 0, steps)
        out[key] = {"params": flat_params(engine), "reducer": type(att.reducer).__name__,
                    "rank": att.reducer.options.rank, "by_kind": dict(att.meter.by_kind)}
        _drop(engine, att)
    errors = {}
    bad = {"option": {"reducer": {"name": "powersgd", "rnk": 2}}, "name": {"reducer": {"name": "powersdg"}},
           "section": {"reducr": {"name": "powersgd"}}}
    for key, block in bad.items():
        engine = make_engine("fp32", 1, world=world, extra={"ds_ext": block})
        try:
            ds_ext.attach(engine)
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
        engine.destroy()
    from ds_ext.registry import NoOptions

    engine = make_engine("fp32", 1, world=world)
    for key, method in (("ambiguous", {"reducer": NoOptions()}), ("dict_option", {"reducer": {"name": "topk",
                                                                                             "densty": 0.1}})):
        try:
            ds_ext.attach(engine, method)
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    engine.destroy()
    out["errors"] = errors
    return out


def own_loop_resume(rank: int, world: int, ckpt: str, first: int = 3, then: int = 3, load: bool = True) -> dict:
    """An own loop with PowerSGD (error feedback, warm-started Q): ``first`` steps, ``engine.save_checkpoint``,
    ``then`` more steps (the reference); then a new engine + attachment, ``engine.load_checkpoint`` (unless
    ``load`` is False: the methods start fresh from DeepSpeed's files alone) and the same ``then`` steps."""
    import os

    import ds_ext

    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, {"reducer": dict(POWERSGD)})
    _steps(engine, rank, 0, first)
    engine.save_checkpoint(ckpt, tag="mid")
    files = sorted(os.listdir(os.path.join(ckpt, "mid")))
    latest = open(os.path.join(ckpt, "latest")).read()
    _steps(engine, rank, first, then)
    straight = flat_params(engine)
    _drop(engine, att)

    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, {"reducer": dict(POWERSGD)})
    if load:
        engine.load_checkpoint(ckpt)
    else:
        with_ds_only(engine, ckpt)
    _steps(engine, rank, first, then)
    resumed = flat_params(engine)
    _drop(engine, att)
    return {"straight": straight, "resumed": resumed, "files": files, "latest": latest}


def with_ds_only(engine, ckpt: str) -> None:
    """DeepSpeed's load alone (what an own loop did before: the methods' state is not restored)."""
    from ds_ext.deepspeed.checkpoint import checkpoint_managed

    with checkpoint_managed(engine):
        engine.load_checkpoint(ckpt, tag="mid")


def own_loop_refusals(rank: int, world: int, ckpt: str) -> dict:
    """``engine.save_checkpoint`` once (tag "t"), then what ``engine.load_checkpoint`` says on each rank when
    rank 1's file is missing, rank 0's is damaged, the files are from another step, none exist, and with
    ``load_optimizer_states=False`` on intact files (fresh, no error). Rank 0 edits the files between
    loads (barriers around it)."""
    import os
    import shutil

    import ds_ext

    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, {"reducer": dict(POWERSGD)})
    _steps(engine, rank, 0, 2)
    engine.save_checkpoint(ckpt, tag="t")
    d = os.path.join(ckpt, "t")
    keep = os.path.join(ckpt, "keep")
    if rank == 0:
        shutil.copytree(d, keep)

    def restore_files():
        att.comm.barrier()
        if rank == 0:
            for r in range(world):
                shutil.copy(os.path.join(keep, f"ds_ext_rank{r}.pt"), os.path.join(d, f"ds_ext_rank{r}.pt"))
        att.comm.barrier()

    def load(**kw):
        try:
            engine.load_checkpoint(ckpt, **kw)
            return None
        except ValueError as e:
            return str(e)

    def edit(fn):
        att.comm.barrier()
        if rank == 0:
            fn()
        att.comm.barrier()

    out = {}
    edit(lambda: os.remove(os.path.join(d, "ds_ext_rank1.pt")))
    out["missing"] = load()
    restore_files()
    edit(lambda: open(os.path.join(d, "ds_ext_rank0.pt"), "wb").write(b"not a torch file"))
    out["damaged"] = load()
    restore_files()

    def restep():
        for r in range(world):
            f = os.path.join(d, f"ds_ext_rank{r}.pt")
            st = torch.load(f, weights_only=False)
            st["global_step"] = 99
            torch.save(st, f)
    edit(restep)
    out["step"] = load()
    restore_files()
    out["no_optimizer"] = load(load_optimizer_states=False)
    edit(lambda: [os.remove(os.path.join(d, f"ds_ext_rank{r}.pt")) for r in range(world)])
    out["none"] = load()
    _drop(engine, att)
    return out
