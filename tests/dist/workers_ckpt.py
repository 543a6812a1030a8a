"""Own-loop checkpoints while attached (tests/dist/test_checkpoint_doors.py): functions run inside spawned ranks.
Rank 0 damages files between barriers; every rank then calls ``engine.load_checkpoint`` and reports what it
raised, what it warned and where training ends."""
from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path

from ds_ext.comm import Communicator

from .workers import flat_params, make_engine
from .workers_api import POWERSGD, _steps

STEPS = 6
SAVES = (2, 4)  # default tags global_step2, global_step4; latest names global_step4


def flip(path: Path, n: int = 16) -> None:
    """``n`` bytes inverted in the middle of the file (inside a tensor's data for these files)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(case: str, d: Path, tag: str = "global_step4") -> str:
    """Damage checkpoint ``tag`` of directory ``d`` (which ``latest`` names) the way ``case`` says; the file
    the refusal must name."""
    t = d / tag
    if case == "rank_file_flip":
        flip(t / "ds_ext_rank1.pt")
        return str(t / "ds_ext_rank1.pt")
    if case == "model_flip":
        flip(t / "mp_rank_00_model_states.pt")
        return str(t / "mp_rank_00_model_states.pt")
    if case == "rank0_over_rank1":
        shutil.copy(t / "ds_ext_rank0.pt", t / "ds_ext_rank1.pt")
        return str(t / "ds_ext_rank1.pt")
    if case == "swapped":
        os.replace(t / "ds_ext_rank0.pt", t / "tmp")
        os.replace(t / "ds_ext_rank1.pt", t / "ds_ext_rank0.pt")
        os.replace(t / "tmp", t / "ds_ext_rank1.pt")
        return str(t / "ds_ext_rank0.pt")
    if case == "rank_files_deleted":
        for r in range(2):
            (t / f"ds_ext_rank{r}.pt").unlink()
        return str(t / "ds_ext_rank0.pt")
    if case == "manifest_and_rank_files_deleted":
        for r in range(2):
            (t / f"ds_ext_rank{r}.pt").unlink()
        (t / "meta.json").unlink()
        return str(t)
    if case == "latest_deleted":
        (d / "latest").unlink()
        return str(d / "latest")
    raise ValueError(case)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _fresh(world):
    import ds_ext

    engine = make_engine("fp32", 1, world=world)
    return engine, ds_ext.attach(engine, {"reducer": dict(POWERSGD)})


def _drop(engine, att) -> None:
    att.detach()
    engine.destroy()
    gc.collect()


def _load_and_finish(rank, world, where: str, tag=None) -> dict:
    """A new engine + attachment; ``engine.load_checkpoint(where, tag)``; then on to step ``STEPS``."""
    engine, att = _fresh(world)
    lines = _Lines()
    logging.getLogger("ds_ext").addHandler(lines)
    out = {"error": None, "type": None, "step": None, "params": None}
    try:
        try:
            engine.load_checkpoint(where, tag=tag)
        except Exception as e:  # noqa: BLE001 -- the test reads which
            out.update(error=str(e), type=type(e).__name__)
        else:
            out["step"] = int(engine.global_steps)
            _steps(engine, rank, out["step"], STEPS - out["step"])
            out["params"] = flat_params(engine)
    finally:
        logging.getLogger("ds_ext").removeHandler(lines)
        out["warnings"] = lines.lines
        _drop(engine, att)
    return out


def own_loop_damage(rank: int, world: int, ckpt: str, cases: list, explicit: bool = True) -> dict:
    """The reference: ``STEPS`` steps with ``engine.save_checkpoint(ckpt)`` after steps 2 and 4 (its final
    parameters: ``straight``). Then for each case a copy of ``ckpt`` damaged by rank 0, loaded with
    ``tag=None`` (``auto``) and, when ``explicit``, with ``tag="global_step4"`` (``tag``)."""
    engine, att = _fresh(world)
    done = 0
    for s in SAVES:
        _steps(engine, rank, done, s - done)
        done = s
        engine.save_checkpoint(ckpt)
    _steps(engine, rank, done, STEPS - done)
    res = {"straight": flat_params(engine)}
    _drop(engine, att)
    comm = Communicator()
    for case in cases:
        d = Path(ckpt).parent / f"case-{case}"
        named = None
        if rank == 0:
            shutil.copytree(ckpt, d)
            named = damage(case, d)
        named = comm.all_gather_object(named)[0]
        res[case] = {"named": named, "auto": _load_and_finish(rank, world, str(d))}
        if explicit and case != "latest_deleted":
            res[case]["tag"] = _load_and_finish(rank, world, str(d), tag="global_step4")
    return res


def own_loop_fixed_tag(rank: int, world: int, ckpt: str) -> dict:
    """``engine.save_checkpoint(ckpt, tag="last")`` at step 2 and again at step 4, where rank 1's state file
    cannot be written (the save fails on every rank); then a new engine loads ``last`` and trains on to
    ``STEPS``. The reference: the same steps without the failed save. Then a successful second save of
    ``last`` (step 4), loaded again."""
    from ds_ext.deepspeed import engine_checkpoint as ec

    engine, att = _fresh(world)
    _steps(engine, rank, 0, 2)
    engine.save_checkpoint(ckpt, tag="last")
    _steps(engine, rank, 2, 2)
    orig = ec.write_rank_file
    ec.write_rank_file = (lambda d, *a: f"{d}/ds_ext_rank1.pt: No space left on device (errno ENOSPC)"
                          if rank == 1 else orig(d, *a))
    out = {"save_error": None}
    try:
        engine.save_checkpoint(ckpt, tag="last")
    except Exception as e:  # noqa: BLE001 -- the test reads which
        out["save_error"] = f"{type(e).__name__}: {e}"
    finally:
        ec.write_rank_file = orig
    _steps(engine, rank, 4, STEPS - 4)
    out["straight"] = flat_params(engine)
    out["dir"] = sorted(os.listdir(ckpt))
    _drop(engine, att)
    out["after_failed"] = _load_and_finish(rank, world, ckpt, tag="last")
    engine, att = _fresh(world)
    _steps(engine, rank, 0, 4)
    engine.save_checkpoint(ckpt, tag="last")
    _drop(engine, att)
    out["after_second"] = _load_and_finish(rank, world, ckpt)
    out["dir_second"] = sorted(os.listdir(ckpt))
    return out


def own_loop_nothing_to_resume(rank: int, world: int, ckpt: str) -> dict:
    """``engine.load_checkpoint`` on a directory that does not exist (a first run: fresh, no error) and on one
    holding only a checkpoint DeepSpeed saved without ds_ext and no ``latest`` (refused naming the directory)."""
    from ds_ext.deepspeed.checkpoint import checkpoint_managed

    out = {"empty": _load_and_finish(rank, world, str(Path(ckpt) / "nothing"))}
    engine, att = _fresh(world)
    _steps(engine, rank, 0, 2)
    with checkpoint_managed(engine):
        engine.save_checkpoint(ckpt)
    _drop(engine, att)
    if rank == 0:
        (Path(ckpt) / "latest").unlink()
    Communicator().barrier()
    out["plain"] = _load_and_finish(rank, world, ckpt)
    return out
