"""``engine.save_checkpoint`` / ``engine.load_checkpoint`` while a ds_ext attachment is on the engine: the own
loop's door and the Hugging Face Trainer's (it calls both). The files and the verification rule are
``checkpoint.py``'s, shared with the trainer's store.

Saving (collective). Rank 0 makes a staging directory ``<dir>/.<tag>.staging-<nonce>`` and every rank learns
its name from rank 0 (one gather). DeepSpeed writes its files into ``<staging>/<tag>/``, every rank its
``ds_ext_rank<r>.pt``, every rank fingerprints a share and rank 0 writes ``meta.json`` (size and SHA-256 of
every file, ``saved_by``, ``step``, ``world_size``). Then rank 0 moves an existing ``<dir>/<tag>`` aside
(``.<tag>.replaced-<nonce>``), renames the staged one into place, fsyncs ``<dir>``, writes ``latest`` and
removes the old copy. A crash at any point leaves the previous checkpoint of that tag whole (or, between the
two renames, whole under its aside name, which loading finds). DeepSpeed's model file also records
``ds_ext_checkpoint`` in its client state, so a checkpoint whose ``meta.json`` and rank files were all
deleted is still known to have been saved with the methods.

Loading (collective). The candidates: the tag given (only that one), or with ``tag=None`` (automatic resume,
what ``latest`` names) that checkpoint and then the older complete ones of ``<dir>``, newest step first; a
missing or unusable ``latest`` means every complete checkpoint holding ds_ext state, newest first (a warning
says so), and a directory that holds checkpoints but none of those raises ``CheckpointError`` naming it. Each
candidate is checked by every rank (``checkpoint.verify`` on a share of the files, and this rank's rank file:
this rank's, this world size's, the manifest's step) and one gather gives every rank the same verdict. With
``tag=None`` a damaged candidate is skipped with a WARNING naming the file and, once one is intact, the
checkpoint used instead; with a tag, or with no intact candidate left, ``CheckpointError`` names the file.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import List, Optional, Tuple

from .checkpoint import (FORMAT, META, OWN_LOOP, OWN_LOOP_INTEGRITY, CheckpointError, CheckpointSaveError,
                         deferred_checkpoint_writes, fsync_dir, rank_file, read_meta, read_rank_file, reason,
                         shared_verdict, verify, write_atomic, write_meta, write_rank_file)

log = logging.getLogger(__name__)

MARK = "ds_ext_checkpoint"  # the key ds_ext adds to DeepSpeed's client state when it saves while attached


def checkpoint_state(att) -> dict:
    """This rank's file of ``save_checkpoint``: the attachment's state, the order's, rank, world, step."""
    order = att.order.state_dict() if att.order is not None and hasattr(att.order, "state_dict") else None
    return {"attachment": att.state_dict(), "order": order, "rank": att.comm.global_rank,
            "world_size": att.comm.world_size, "global_step": int(getattr(att.engine, "global_steps", 0))}


# ---- saving ------------------------------------------------------------------------------------------------

def _complete(path: Path) -> bool:
    return (path / META).is_file()


def _prepare(root: Path, tag: str) -> Tuple[Optional[str], Optional[str]]:
    """Rank 0: clear what an interrupted save of ``tag`` left, make a staging directory; (nonce, error)."""
    nonce = uuid.uuid4().hex[:12]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f".{tag}.staging-*"):
            shutil.rmtree(old, ignore_errors=True)
        for old in root.glob(f".{tag}.replaced-*"):
            if not _complete(root / tag) and _complete(old):
                if (root / tag).exists():
                    shutil.rmtree(root / tag)
                os.rename(old, root / tag)  # the new copy never arrived: the old one back in place
            else:
                shutil.rmtree(old, ignore_errors=True)
        (root / f".{tag}.staging-{nonce}").mkdir()
    except OSError as e:
        return None, reason(e, root / f".{tag}.staging-{nonce}")
    return nonce, None


def _commit(root: Path, staging: Path, tag: str, nonce: str, save_latest: bool) -> Optional[str]:
    """Rank 0, every file staged and ``meta.json`` written: the staged tag into place, then ``latest``."""
    final, aside = root / tag, root / f".{tag}.replaced-{nonce}"
    try:
        if final.exists():
            os.rename(final, aside)
        os.rename(staging / tag, final)
        recovery = staging / "zero_to_fp32.py"  # DeepSpeed copies it next to its tags under ZeRO
        if recovery.is_file():
            os.replace(recovery, root / recovery.name)
        fsync_dir(root)
        if save_latest:
            write_atomic(root / "latest", tag.encode())
    except OSError as e:
        return reason(e, final)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return None


def save_checkpoint(att, save_dir, tag=None, client_state=None, save_latest: bool = True,
                    exclude_frozen_parameters: bool = False):
    """``engine.save_checkpoint`` while attached (collective, every rank): staged and renamed into place (module
    docstring), so a tag saved again stays whole until its new copy is complete. A failed write on any rank
    (DeepSpeed's or ours, ``meta.json``, the rename or ``latest``) raises ``CheckpointSaveError`` on every rank
    and leaves the previous checkpoint and ``latest`` as they were. Returns what DeepSpeed's returns. A
    decoupled (asynchronous) DeepSpeed checkpoint engine is refused: it commits after returning."""
    engine, comm = att.engine, att.comm
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is not None and callable(getattr(ce, "is_decoupled", None)) and ce.is_decoupled():
        raise ValueError("ds_ext's engine.save_checkpoint needs DeepSpeed's synchronous checkpoint engine (a "
                         "decoupled one commits after the call returns, so ds_ext could not order its state "
                         "before 'latest'); turn the decoupled checkpoint engine off")
    att.check_pending()
    rank, world = comm.global_rank, comm.world_size
    step = int(getattr(engine, "global_steps", 0))
    tag = str(tag) if tag is not None else f"global_step{step}"
    root = Path(save_dir)
    if not tag or "/" in tag or "\\" in tag or tag.startswith("."):
        raise ValueError(f"engine.save_checkpoint: tag {tag!r} must be a plain name (no '/', not starting with '.')")
    nonce, err = comm.all_gather_object(_prepare(root, tag) if rank == 0 else (None, None))[0]  # rank 0's
    if err is not None:
        raise CheckpointSaveError(f"checkpoint {root / tag} not saved, 'latest' left as it was: {err}")
    staging = root / f".{tag}.staging-{nonce}"
    client = {**(client_state or {}), MARK: {"saved_by": OWN_LOOP, "world_size": world, "step": step}}
    with deferred_checkpoint_writes(engine) as failed:  # DeepSpeed's own barrier still runs everywhere
        out = att._orig_save(str(staging), tag=tag, client_state=client, save_latest=False,
                             exclude_frozen_parameters=exclude_frozen_parameters)
    err = reason(failed[0][1], failed[0][0]) if failed else None
    if err is None:
        err = write_rank_file(staging / tag, checkpoint_state(att), rank, world, step)
    err = shared_verdict(err, comm)
    if err is None:
        meta = {"format": FORMAT, "saved_by": OWN_LOOP, "attached": True, "tag": tag, "step": step,
                "world_size": world}
        err = write_meta(staging / tag, meta, OWN_LOOP_INTEGRITY, rank, world)
    if err is None and rank == 0:
        err = _commit(root, staging, tag, nonce, save_latest)
    if err is not None and rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    err = shared_verdict(err, comm)  # rank 0's verdict reaches every rank (and ends the save together)
    if err is not None:
        raise CheckpointSaveError(f"checkpoint {root / tag} not saved, 'latest' left as it was: {err}")
    return out


# ---- loading -----------------------------------------------------------------------------------------------

def _tag_path(root: Path, tag: str) -> Path:
    """``root/tag``, or the whole copy a save of the same tag set aside if it died between its two renames."""
    path = root / tag
    if not path.exists():
        for aside in sorted(root.glob(f".{tag}.replaced-*")):
            if _complete(aside):
                return aside
    return path


def _step(path: Path) -> int:
    try:
        s = read_meta(path).get("step")
    except CheckpointError:
        return -1
    return s if isinstance(s, int) else -1


def _with_state(root: Path) -> List[Path]:
    """The complete checkpoints of ``root`` (a ``meta.json``: saved by ds_ext), newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _complete(p)]
    return sorted(found, key=lambda p: (-_step(p), p.name))


def _holds_checkpoints(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and (any(p.glob("*model_states.pt")) or any(p.glob("ds_ext_rank*.pt"))
                                                 or _complete(p)) for p in root.iterdir())


def candidates(root: Path, tag, latest_name: str = "latest") -> Tuple[List[Path], bool, List[str]]:
    """``(paths to try in order, fall back allowed, notes)`` (module docstring). Raises ``CheckpointError``
    when the directory holds checkpoints but none that can be resumed automatically."""
    if tag is not None:
        return [_tag_path(root, str(tag))], False, []
    done, notes, first = _with_state(root), [], None
    f = root / latest_name
    try:
        name = f.read_bytes().decode("utf-8").strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            notes.append(f"{f} names {name[:80]!r}, which is not a tag of {root}")
        elif not _tag_path(root, name).is_dir():
            notes.append(f"{f} points at {name!r}, which is missing")
        else:
            first = _tag_path(root, name)
    except FileNotFoundError:
        if not done and not _holds_checkpoints(root):
            return [], True, []  # nothing saved yet: DeepSpeed's fresh start
        notes.append(f"{f} is missing")
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{f} cannot be read ({type(e).__name__})")
    if first is None:
        if not done:
            raise CheckpointError(f"{notes[0]}, and no checkpoint in {root} holds ds_ext state (a meta.json) to "
                                  "resume from automatically; name a tag (engine.load_checkpoint(dir, tag=...)) "
                                  "to load it as it is")
        notes[-1] += f"; using the newest checkpoint that holds ds_ext state ({done[0].name}) instead"
        return done, True, notes
    s = _step(first)
    return [first] + [p for p in done if p != first and _step(p) < s], True, notes


def _check(path: Path, rank: int, world: int, methods: bool) -> Tuple[Optional[str], Optional[dict], bool]:
    """This rank's verdict on ``path``: (problem, this rank's state, a plain DeepSpeed checkpoint)."""
    if not path.is_dir():
        return f"{path}: no such checkpoint", None, False
    if not _complete(path):  # no manifest: a checkpoint DeepSpeed saved without ds_ext, unless ds_ext files are there
        stray = sorted(path.glob("ds_ext_rank*.pt"))
        if stray:
            return (f"{path / META}: missing, next to {stray[0].name}: an incomplete ds_ext save or a deleted "
                    "manifest (damaged)"), None, False
        return None, None, True
    problem = verify(path, "hash", rank, world, own_file=methods)
    if problem is not None or not methods:
        return problem, None, False
    try:
        return None, read_rank_file(path, rank, world, read_meta(path)["step"]), False
    except CheckpointError as e:
        return str(e), None, False


def _choose(att, load_dir, tag, methods: bool) -> Tuple[Optional[Path], Optional[dict], bool]:
    """Collective: the checkpoint every rank loads (module docstring), this rank's state, plain or not."""
    engine, comm = att.engine, att.comm
    rank, world = comm.global_rank, comm.world_size
    root = Path(load_dir)
    universal = callable(getattr(engine, "load_universal_checkpoint", None)) and engine.load_universal_checkpoint()
    try:
        found = (candidates(root, tag, "latest_universal" if universal else "latest"), None)
    except CheckpointError as e:
        found = (([], False, []), str(e))
    (paths, auto, notes), problem = comm.all_gather_object(found if rank == 0 else None)[0]  # rank 0's
    if problem is not None:
        raise CheckpointError(problem)
    for n in notes:
        log.warning("engine.load_checkpoint: %s", n)
    damaged = []
    for p in paths:
        problem, state, plain = _check(p, rank, world, methods)
        problem = shared_verdict(problem, comm)
        if problem is None:
            if damaged:
                log.warning("engine.load_checkpoint: resuming from %s instead", p)
            return p, state, plain
        if not auto:
            raise CheckpointError(problem)
        damaged.append(problem)
        log.warning("engine.load_checkpoint: skipping damaged checkpoint %s: %s", p.name, problem)
    if len(damaged) == 1:
        raise CheckpointError(f"{damaged[0]} (no older intact checkpoint in {root} to fall back to)")
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(damaged))
    return None, None, False


def load_checkpoint(att, load_dir, tag=None, **kwargs):
    """``engine.load_checkpoint`` while attached (collective): the checkpoint chosen and verified by every rank
    (module docstring), DeepSpeed's files, then this rank's method state. A checkpoint DeepSpeed saved without
    ds_ext (no ``meta.json``, no rank files) leaves the methods fresh with a warning, unless its model file
    says ds_ext saved it (then its manifest and rank files were deleted: refused); so do
    ``load_module_only=True`` and ``load_optimizer_states=False`` (the methods' state is optimizer-like state),
    without a warning. Raises ``CheckpointError`` (the same line on every rank) naming the file. Returns what
    DeepSpeed's returns (``(None, None)`` for a directory with nothing saved yet)."""
    engine = att.engine
    methods = not kwargs.get("load_module_only") and kwargs.get("load_optimizer_states", True)
    path, state, plain = _choose(att, load_dir, tag, methods)
    if path is None:
        log.info("engine.load_checkpoint(%s): nothing saved there yet, starting fresh", load_dir)
        return None, None
    try:
        got, client = att._orig_load(str(path.parent), tag=path.name, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- verified files DeepSpeed still refuses (another config, ZeRO sizes)
        raise CheckpointError(f"{path}: DeepSpeed could not load its files ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200] or 'no message'})") from None
    if got is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its files")
    mark = client.pop(MARK, None) if isinstance(client, dict) else None
    if plain:
        if mark is not None:
            raise CheckpointError(f"{path} was saved with ds_ext attached (its model file says so), but its {META} "
                                  "and every ds_ext_rank<r>.pt are gone: refused rather than starting the "
                                  "methods fresh")
        if methods:
            log.warning("%s holds no ds_ext state (saved without the attachment): the methods start fresh", path)
        return got, client
    if not methods:
        log.info("load_checkpoint(%s): module only / no optimizer states, so the ds_ext methods start fresh", path)
        return got, client
    if int(engine.global_steps) != int(state["global_step"]):
        raise CheckpointError(f"{path}: DeepSpeed's files are at step {engine.global_steps}, {META} says "
                              f"{state['global_step']}")
    att.load_state_dict(state["attachment"])
    if att.order is not None and state.get("order") is not None and hasattr(att.order, "load_state_dict"):
        att.order.load_state_dict(state["order"])
    return got, client
