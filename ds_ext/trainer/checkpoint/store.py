"""Checkpoints that stay good: DeepSpeed's own checkpoint plus per-rank method and trainer state,
written atomically, fingerprinted, verified on load, and chosen by every rank together. What a ``meta.json``
must hold and how a checkpoint is verified is one rule for every door (``ds_ext/deepspeed/checkpoint.py``:
``manifest_problem``, ``verify``); this module chooses among the trainer's checkpoints and stages its saves.

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/checkpoint-store.md``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .. import faults
from ...comm import world
from ...deepspeed.checkpoint import (INTEGRITY, META, CheckpointError, CheckpointSaveError,
                                     deepspeed_own, deferred_checkpoint_writes, free_space, fsync_dir,
                                     rank_file, read_meta, read_rank_file, reason, shared_verdict, verify,
                                     write_atomic, write_meta, write_rank_file)

from ..exit_codes import ExitCode

log = logging.getLogger(__name__)

EXIT_SAVE = ExitCode.SAVE  # a checkpoint could not be written (the previous one is intact)
_TAG = re.compile(r"step_(\d+)")


def _rank_world() -> Tuple[int, int]:
    c = world()
    return c.global_rank, c.world_size


def step_of(name: str) -> Optional[int]:
    """The step number of a checkpoint tag ``step_<digits>`` (None for any other name)."""
    m = _TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def _complete(path: Path) -> bool:
    return (path / META).is_file()


# ---- saving -------------------------------------------------------------------------------------

def _recover(root: Path) -> None:
    """Rank 0, before a save (under the directory lock): clear what interrupted saves and prunes left."""
    for old in list(root.glob(".staging-*")) + list(root.glob(".deleting-*")):
        shutil.rmtree(old, ignore_errors=True)
    for old in root.glob(".replaced-*"):
        tag = old.name[len(".replaced-"):]
        if _complete(root / tag):
            shutil.rmtree(old, ignore_errors=True)
        elif _complete(old):
            if (root / tag).exists():
                shutil.rmtree(root / tag, ignore_errors=True)
            os.rename(old, root / tag)  # the new copy never arrived: put the old one back
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".latest.tmp*"):
        tmp.unlink(missing_ok=True)


def save(engine, ckpt_dir: str, tag: str, rank_state: dict, meta: dict, keep: int = 2,
         client_state: Optional[dict] = None, integrity: str = "hash", job: str = "") -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path; raises ``CheckpointSaveError``
    (on every rank alike) when a write failed anywhere. See the module docstring."""
    if integrity not in INTEGRITY:
        raise ValueError(f"integrity must be one of {INTEGRITY}, got {integrity!r}")
    root = Path(ckpt_dir)
    rank, world = _rank_world()
    step = int(getattr(engine, "global_steps", 0))
    faults.progress(step, "checkpoint save")
    staging = root / (f".staging-{tag}-{job}" if job else f".staging-{tag}")
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _recover(root)
            staging.mkdir()
        except OSError as e:
            err = reason(e, staging)
    err = shared_verdict(err)
    if err is None:
        faults.point("ckpt_start", step)
        save_files = deepspeed_own(engine, "save_checkpoint")  # the rank files are written here, with more in them
        with deferred_checkpoint_writes(engine) as failed:  # DeepSpeed's own collectives still run
            save_files(str(staging), tag=tag, client_state=client_state or {}, save_latest=False)
        if failed:
            err = reason(failed[0][1], failed[0][0])
        else:
            faults.point("ckpt_deepspeed", step)
            err = write_rank_file(staging / tag, rank_state, rank, world, step)
            if err is None:
                faults.point("ckpt_rankfile", step)
        err = shared_verdict(err)
    final = root / tag
    if err is None:  # fingerprints (each rank a share), then rank 0 writes meta.json
        err = write_meta(staging / tag, {**meta, "tag": tag, "step": step}, integrity, rank, world)
    if err is None and rank == 0:
        faults.point("ckpt_meta", step)
        aside = root / f".replaced-{tag}"
        try:
            if final.exists():
                if aside.exists():
                    shutil.rmtree(aside)
                os.rename(final, aside)
                faults.point("ckpt_replace", step)
            os.rename(staging / tag, final)
            fsync_dir(root)
            faults.point("ckpt_rename", step)
            write_atomic(root / "latest", tag.encode())
        except OSError as e:
            err = reason(e, root / "latest")
    if err is None and rank == 0:
        faults.point("ckpt_latest", step)
        shutil.rmtree(staging, ignore_errors=True)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        try:
            _prune(root, keep, protect=tag, step=step)
        except OSError as e:  # the new checkpoint is complete and named by latest: not a failed save
            log.warning("pruning old checkpoints in %s failed: %s", root, reason(e, root))
    if err is not None and rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    err = shared_verdict(err)  # rank 0's commit verdict reaches everybody (and ends the save together)
    if err is not None:
        kept = latest_tag_text(root)
        raise CheckpointSaveError(
            f"checkpoint save failed at step {step}: {err}; {free_space(root)} on that file system; "
            + (f"the previous checkpoint {root / kept} is intact" if kept else "no earlier checkpoint exists"))
    faults.point("ckpt_end", step)
    return final


def latest_tag_text(root: Path) -> Optional[str]:
    """What ``latest`` names, if it is readable (for messages only)."""
    try:
        return (root / "latest").read_text("utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _prune(root: Path, keep: int, protect: str, step: int = 0) -> None:
    done = [(s, p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (s := step_of(p.name)) is not None and _complete(p)]
    older = sorted((s, p) for s, p in done if s < step or p.name == protect)  # newer ones: another timeline
    for _, p in older[:-keep] if keep > 0 else older:
        if p.name == protect:
            continue
        doomed = root / f".deleting-{p.name}"
        os.rename(p, doomed)  # gone from view in one step
        faults.point("ckpt_prune", step)
        shutil.rmtree(doomed, ignore_errors=True)


# ---- finding and verifying --------------------------------------------------------------------------

def latest(ckpt_dir: str) -> Optional[Path]:
    """The checkpoint ``latest`` names (strict), or None when there is no ``latest`` file. Raises
    ``CheckpointError`` for a ``latest`` that is unreadable, not a plain tag name, or names a missing
    or incomplete checkpoint."""
    root = Path(ckpt_dir)
    f = root / "latest"
    if not f.is_file():
        return None
    try:
        tag = f.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{f}: not UTF-8 text (damaged)") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot be read ({os.strerror(e.errno or 0)})") from None
    if not tag:
        raise CheckpointError(f"{f} is empty")
    if "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
        raise CheckpointError(f"{f} names {tag[:80]!r}, which is not a checkpoint of {root} (a path, not a tag)")
    path = root / tag
    if _complete(path):
        return path
    aside = root / f".replaced-{tag}"
    if _complete(aside):  # a save of the same tag died between its two renames
        return aside
    raise CheckpointError(f"{f} points at {tag!r}, which is missing or incomplete (no {META})")


def complete_checkpoints(ckpt_dir: str) -> List[Path]:
    """Every complete ``step_*`` checkpoint of a directory (and a ``.replaced-`` copy whose tag is
    missing), newest step first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        name = p.name[len(".replaced-"):] if p.name.startswith(".replaced-") else p.name
        s = step_of(name)
        if s is None or not p.is_dir() or not _complete(p):
            continue
        if p.name.startswith(".replaced-") and _complete(root / name):
            continue
        found[name] = (s, p)
    return [p for _, p in sorted(found.values(), key=lambda sp: -sp[0])]


def candidates(resume, ckpt_dir: str) -> Tuple[List[Path], bool, List[str]]:
    """``(paths to try in order, fall back allowed, notes)`` for the recipe's ``checkpoint.resume``.

    ``auto``: what ``latest`` names, then the older complete checkpoints; with an unusable ``latest``,
    every complete checkpoint, newest first (a note says why). Explicit path: that one only. Raises
    ``CheckpointError`` when nothing can be resumed from although the directory says there was a run."""
    if resume in (False, None, "false", "no"):
        return [], False, []
    if resume in (True, "auto", "latest", "true"):
        root = Path(ckpt_dir)
        done = complete_checkpoints(ckpt_dir)
        notes = []
        try:
            first = latest(ckpt_dir)
        except CheckpointError as e:
            first = None
            if not done:
                raise CheckpointError(f"{e}, and {root} holds no complete checkpoint to fall back to") from None
            notes.append(f"{e}; using the newest complete checkpoint instead")
        else:
            if first is None and done:
                notes.append(f"{root / 'latest'} is missing; using the newest complete checkpoint instead")
        if first is None:
            return done, True, notes
        s = step_of(first.name[len(".replaced-"):] if first.name.startswith(".replaced-") else first.name)
        rest = [p for p in done if p != first and (s is None or (step_of(p.name.replace(".replaced-", "")) or 0) < s)]
        return [first] + rest, True, notes
    path = Path(str(resume))
    if (path / "latest").is_file():
        p = latest(str(path))
        return [p], False, []
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete ds_ext checkpoint (no {META}) and holds no 'latest' file")
    return [path], False, []


def choose(resume, ckpt_dir: str, integrity: str = "hash", warn: Callable[[str], None] = log.warning
           ) -> Optional[Path]:
    """Collective: the checkpoint every rank resumes from (or None: start afresh). Raises
    ``CheckpointError`` (same text on every rank) when the chosen or every candidate is unusable.
    ``warn`` gets one line per fallback (the trainer prints them on rank 0)."""
    rank, world = _rank_world()
    try:
        paths, fallback, notes = candidates(resume, ckpt_dir)
        problem = None
    except CheckpointError as e:
        paths, fallback, notes, problem = [], False, [], str(e)
    problem = shared_verdict(problem)
    if problem:
        raise CheckpointError(problem)
    for n in notes:
        warn(n)
    damaged = []
    for p in paths:
        err = shared_verdict(verify(p, integrity, rank, world))
        if err is None:
            if damaged:
                warn(f"resuming from {p} instead")
            return p
        if not fallback:
            raise CheckpointError(err)
        damaged.append(err)
        warn(f"skipping damaged checkpoint {p.name}: {err}")
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(damaged))
    return None


def resolve(resume, ckpt_dir: str) -> Optional[Path]:
    """Single-process form of ``choose`` without verification: the first candidate (tests, tools)."""
    paths, _, _ = candidates(resume, ckpt_dir)
    return paths[0] if paths else None


def load(engine, path: Path, rank: int, world: int = 1, step: Optional[int] = None) -> dict:
    """Load DeepSpeed state (module, optimizer, LR schedule) and return this rank's ds_ext state, read by
    ``read_rank_file`` (this rank's, this world size's, DeepSpeed's step), with DeepSpeed's step checked
    against the checkpoint's (``step``: ``meta.json``'s; None for checkpoints older than format 3).
    Raises ``CheckpointError`` naming the file; the trainer gathers every rank's verdict before anyone
    says "resumed"."""
    f = rank_file(path, rank)
    if not f.is_file():
        raise CheckpointError(f"{path} has no state for rank {rank} ({f.name})")
    load_files = deepspeed_own(engine, "load_checkpoint")  # the rank file is read here (below)
    try:
        load_path, _ = load_files(str(path.parent), tag=path.name)
    except Exception as e:  # a truncated or foreign DeepSpeed file: torch's zip reader, DeepSpeed's asserts
        text = " ".join(str(e).split())[:200] or "no message"
        raise CheckpointError(f"{path}: DeepSpeed could not load its files ({type(e).__name__}: {text})") from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its files")
    ds_step = int(getattr(engine, "global_steps", -1))
    if step is not None and ds_step != step:
        raise CheckpointError(f"{path}: DeepSpeed's files are at step {ds_step}, meta.json says {step}")
    state = read_rank_file(path, rank, world, ds_step)
    if state is None:
        raise CheckpointError(f"{path} has no state for rank {rank} ({f.name})")
    return state
