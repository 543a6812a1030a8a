"""The per-rank method-state file of DeepSpeed checkpoints (``ds_ext_rank<r>.pt``), and
``engine.save_checkpoint`` / ``engine.load_checkpoint`` while a ds_ext attachment is on the engine.

Small file helpers (atomic writes with fsync, the operating system's reason for a failed write, the
free space), the verdict every rank shares, and DeepSpeed's own checkpoint writes with their failures
deferred (``deferred_checkpoint_writes``) live here too: the trainer's checkpoint store
(``ds_ext/trainer/checkpoint/store.py``) builds on them.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..comm import gather_objects

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, damaged)."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the previous checkpoint is intact (same verdict on every rank)."""


# ---- small file helpers ---------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


fsync_dir = fsync_path


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def torch_save_atomic(obj, path: Path, keep_tmp: bool = False) -> None:
    """``torch.save`` to a temporary name, fsync, rename. On failure the temporary file is removed
    (``keep_tmp``: left for the caller to probe the reason, then remove)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if not keep_tmp:
            tmp.unlink(missing_ok=True)
        raise


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"ds_ext_rank{rank}.pt"


def free_space(path: Path) -> str:
    """``"12.3 GiB free"`` on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"


def _probe(path: Path) -> Optional[OSError]:
    """The operating system's reason for a write that failed without one: torch's writer reports a
    full disk or a file-size limit as ``RuntimeError`` ("unexpected pos ..."), so append up to 4 MiB
    to the (already damaged, staged) file and return the ``OSError`` that this raises, if any."""
    try:
        with open(path, "ab", buffering=0) as f:
            for _ in range(64):
                f.write(b"\0" * 65536)
    except OSError as e:
        return e
    return None


def reason(e: BaseException, path: Path) -> str:
    """One line for a failed write: the file and the operating system's reason."""
    if not isinstance(e, OSError) or e.errno is None:
        e = _probe(Path(path)) or e
    if isinstance(e, OSError) and e.errno is not None:
        where = e.filename or path
        return f"{where}: {os.strerror(e.errno)} (errno {errno.errorcode.get(e.errno, e.errno)})"
    return f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def shared_verdict(err: Optional[str]) -> Optional[str]:
    """Every rank's error (or None) gathered; the first one (lowest rank) is everybody's verdict."""
    errs = gather_objects(err)
    return next((e for e in errs if e), None)


# ---- engine.save_checkpoint / load_checkpoint while attached -----------------------------------------

def save_checkpoint(att, save_dir, tag=None, client_state=None, save_latest: bool = True,
                    exclude_frozen_parameters: bool = False):
    """``engine.save_checkpoint`` while attached (collective, every rank): DeepSpeed's files, then every
    rank's method state (error feedback, factors, sync and meter state, the order's state when one is
    attached) in ``<save_dir>/<tag>/ds_ext_rank<r>.pt`` (temporary name, fsync, rename), then, once every
    rank's writes succeeded and rank 0 has fsynced the checkpoint's files, ``latest`` (so ``latest`` never
    names a checkpoint without our state). A failed write on any rank (DeepSpeed's or ours, or
    ``latest``) raises ``checkpoint.CheckpointSaveError`` on every rank and leaves ``latest`` as it was.
    Returns what DeepSpeed's returns. Inside ``ds_ext.trainer.checkpoint`` (the trainer), DeepSpeed's own call.
    A decoupled (asynchronous) DeepSpeed checkpoint engine is refused: it commits after returning."""
    if getattr(att.engine, "_ds_ext_checkpoint_managed", False):
        return att._orig_save(save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest,
                          exclude_frozen_parameters=exclude_frozen_parameters)
    ce = getattr(att.engine, "checkpoint_engine", None)
    if ce is not None and callable(getattr(ce, "is_decoupled", None)) and ce.is_decoupled():
        raise ValueError("ds_ext's engine.save_checkpoint needs DeepSpeed's synchronous checkpoint engine (a "
                         "decoupled one commits after the call returns, so ds_ext could not order its state "
                         "before 'latest'); turn the decoupled checkpoint engine off")
    att.check_pending()
    tag = str(tag) if tag is not None else f"global_step{att.engine.global_steps}"
    with deferred_checkpoint_writes(att.engine) as failed:  # DeepSpeed's own barrier still runs everywhere
        out = att._orig_save(save_dir, tag=tag, client_state=client_state or {}, save_latest=False,
                         exclude_frozen_parameters=exclude_frozen_parameters)
    err = None
    if failed:
        path, e = failed[0]
        err = f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    here = rank_file(Path(save_dir) / tag, att.comm.global_rank)
    if err is None:
        try:
            torch_save_atomic(checkpoint_state(att), here)
            fsync_dir(here.parent)
        except Exception as e:  # noqa: BLE001 -- any failure is reported on every rank, not raised on one
            err = f"{here}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    err = shared_verdict(err)
    if err is None and save_latest and att.comm.global_rank == 0:
        try:  # DeepSpeed's files first, then latest: a crash in between leaves latest as it was
            for f in sorted((Path(save_dir) / tag).rglob("*")):
                if f.is_file():
                    fsync_path(f)
            fsync_dir(Path(save_dir) / tag)
            write_atomic(Path(save_dir) / "latest", tag.encode())
        except Exception as e:  # noqa: BLE001
            err = f"{Path(save_dir) / 'latest'}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if save_latest:
        err = shared_verdict(err)  # rank 0's latest verdict reaches every rank (and ends the save together)
    if err is not None:
        raise CheckpointSaveError(f"checkpoint {Path(save_dir) / tag} not saved, 'latest' left as it was: "
                                       f"{err}")
    return out


def load_checkpoint(att, load_dir, tag=None, **kwargs):
    """``engine.load_checkpoint`` while attached (collective): DeepSpeed's files, then this rank's method
    state from ``ds_ext_rank<r>.pt`` (``save_checkpoint``), checked to be from the same step as DeepSpeed's
    files and the same number of ranks (per-rank error feedback cannot be split or merged). A checkpoint
    without any rank's ds_ext state (saved before the attachment existed) leaves the methods fresh, with a
    warning; so do ``load_module_only=True`` and ``load_optimizer_states=False`` (the methods' state is
    optimizer-like state), without one. A file missing on some ranks only, from another step or another
    world size, or unreadable, raises ``ValueError`` on every rank. Returns what DeepSpeed's returns."""
    if getattr(att.engine, "_ds_ext_checkpoint_managed", False):
        return att._orig_load(load_dir, tag=tag, **kwargs)
    path, client = att._orig_load(load_dir, tag=tag, **kwargs)
    if path is None:
        return path, client
    if kwargs.get("load_module_only") or not kwargs.get("load_optimizer_states", True):
        log.info("load_checkpoint(%s): module only / no optimizer states, so the ds_ext methods start fresh",
                 load_dir)
        return path, client
    if tag is None:
        universal = callable(getattr(att.engine, "load_universal_checkpoint", None)) and \
            att.engine.load_universal_checkpoint()
        tag = (Path(load_dir) / ("latest_universal" if universal else "latest")).read_text().strip()
    where = Path(load_dir) / str(tag)
    f = rank_file(where, att.comm.global_rank)
    state, problem = None, None
    if f.is_file():
        try:
            state = torch.load(f, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "attachment" not in state:
                raise ValueError(f"not a ds_ext rank file (found {type(state).__name__})")
            world, step = state.get("world_size"), state.get("global_step")
            if world != att.comm.world_size:
                problem = (f"{f} was saved by a run of {world} ranks, this one has {att.comm.world_size}: "
                           "per-rank method state (error feedback) cannot be split or merged; load with "
                           "load_optimizer_states=False to start the methods fresh")
            elif step is not None and int(step) != int(getattr(att.engine, "global_steps", step)):
                problem = (f"{f} is from step {step}, DeepSpeed's files in {where} from step "
                           f"{att.engine.global_steps} (a tag saved twice?): the methods' state does not "
                           "belong to these parameters")
        except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: named, on every rank
            problem = f"{f}: cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    rows = att.comm.exchange_control(att.comm.tensor([int(state is not None), int(problem is not None)],
                                                       dtype=torch.int64))
    have = [r for r, row in enumerate(rows) if row[0]]
    bad = [r for r, row in enumerate(rows) if row[1]]
    if problem is not None:
        raise ValueError(problem)
    if bad:
        raise ValueError(f"the ds_ext state of rank(s) {', '.join(map(str, bad))} in {where} cannot be used "
                         "(see that rank's error)")
    if not have:
        log.warning("%s holds no ds_ext state (saved without the attachment): the methods start fresh", where)
        return path, client
    if len(have) != len(rows):
        missing = [r for r in range(len(rows)) if r not in have]
        raise ValueError(f"{where} has no ds_ext state for rank(s) {', '.join(map(str, missing))} "
                         "(ds_ext_rank<r>.pt): an incomplete checkpoint")
    att.load_state_dict(state["attachment"])
    if att.order is not None and state.get("order") is not None and hasattr(att.order, "load_state_dict"):
        att.order.load_state_dict(state["order"])
    return path, client


def checkpoint_state(att) -> dict:
    """This rank's file of ``save_checkpoint``: the attachment's state, the order's, rank, world, step."""
    order = att.order.state_dict() if att.order is not None and hasattr(att.order, "state_dict") else None
    return {"attachment": att.state_dict(), "order": order, "rank": att.comm.global_rank,
            "world_size": att.comm.world_size, "global_step": int(getattr(att.engine, "global_steps", 0))}


@contextlib.contextmanager
def deferred_checkpoint_writes(engine):
    """Inside this context a file write of DeepSpeed's ``save_checkpoint`` that fails (disk full,
    read-only, I/O error) is recorded, as ``(path, exception)`` in the yielded list, instead of raised,
    and the rest of that rank's writes are skipped: ``save_checkpoint`` runs collectives after its
    writes (a barrier), and a rank that raised out of it would leave the others waiting there while it
    went on to the next collective. ``ds_ext.trainer.checkpoint.save`` turns the list into a verdict shared by
    every rank. Written against DeepSpeed 0.19's ``engine.checkpoint_engine.save(state_dict, path)``;
    an engine without it is left alone."""
    ce = getattr(engine, "checkpoint_engine", None)
    failed: list = []
    if ce is None or not callable(getattr(ce, "save", None)):
        with checkpoint_managed(engine):
            yield failed
        return
    had_own = "save" in vars(ce)
    orig = ce.save

    def save(state_dict, path, *args, **kwargs):
        if failed:
            return None
        try:
            return orig(state_dict, path, *args, **kwargs)
        except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as RuntimeError
            failed.append((path, e))
            return None

    ce.save = save
    try:
        with checkpoint_managed(engine):
            yield failed
    finally:
        if had_own:
            ce.save = orig
        else:
            del ce.save


@contextlib.contextmanager
def checkpoint_managed(engine):
    """Inside, ``engine.save_checkpoint`` / ``load_checkpoint`` are DeepSpeed's own even while attached:
    ``ds_ext.trainer.checkpoint`` (the trainer) writes and reads every rank's state itself, with more in it."""
    before = getattr(engine, "_ds_ext_checkpoint_managed", False)
    engine._ds_ext_checkpoint_managed = True
    try:
        yield
    finally:
        engine._ds_ext_checkpoint_managed = before
