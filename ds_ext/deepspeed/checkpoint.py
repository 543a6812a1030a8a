"""What a ds_ext checkpoint holds besides DeepSpeed's files, written, read and verified in one place for every
door (the trainer's store, an own loop's and the Hugging Face Trainer's ``engine.save_checkpoint`` /
``load_checkpoint`` while attached, ``engine_checkpoint.py``): the per-rank method-state file
``ds_ext_rank<r>.pt`` and the manifest ``meta.json``.

A checkpoint ``<dir>/<tag>/`` holds DeepSpeed's files, one rank file per rank and ``meta.json``:

* ``ds_ext_rank<r>.pt`` (``write_rank_file`` / ``read_rank_file``, the only writer and reader): a
  ``torch.save`` dict with the attachment's state (``attachment``: reducer, synchronizer, meter, step
  counts), the order's (``order``), and ``rank``, ``world_size``, ``global_step``; the trainer adds its
  own entries (RNG streams, epoch position). Written under a temporary name, fsynced, renamed. Read
  back only by the rank it names, for the same world size and step: another rank's file (copied or
  renamed), one from a run of another size or from another step is refused with ``CheckpointError``
  naming the file.
* ``meta.json`` (``write_meta``): written last by rank 0, after every rank's files are written and
  fingerprinted (size, and SHA-256 with ``integrity: hash``; each rank hashes a share) and DeepSpeed's
  files are fsynced. A directory without it is incomplete and never resumed from. It holds ``files``
  (the fingerprints), ``step``, ``tag``, ``integrity``, ``world_size``, ``format`` and who wrote it:
  the trainer adds the recipe's fields (``ds_ext/trainer/checkpoint/resume.py``); an own loop's save
  records ``saved_by: engine.save_checkpoint`` instead (it has no recipe), so the trainer can name why
  it does not resume from it.

On load every door applies the same rule (``verify``: ``read_meta``, ``manifest_problem``, the fingerprints
of a share of the files on every rank; the caller gathers one verdict): a ``meta.json`` without ``format``,
``files``, ``step``, ``world_size`` or without ``recipe`` / ``saved_by``, or whose ``files`` lack a rank's
state file, is damaged, never "unverified".
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ..comm import gather_objects

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT = 3  # meta.json layout: 1 = top-level names only, 2 = + "recipe" (dotted fields), 3 = + "files", "step"
INTEGRITY = ("hash", "size", "off")
OWN_LOOP = "engine.save_checkpoint"  # meta.json's "saved_by" for a checkpoint saved from an own loop
OWN_LOOP_INTEGRITY = "hash"
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint cannot be used (missing, incomplete, damaged, or a rank file that is not this rank's,
    this world size's or this step's). Also a ``ValueError``, which ``engine.load_checkpoint`` raised for
    these while attached, so an own loop that catches that keeps working."""


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


def shared_verdict(err: Optional[str], comm=None) -> Optional[str]:
    """Every rank's error (or None) gathered (over ``comm``, a ``Communicator``; default the world); the first
    one (lowest rank) is everybody's verdict."""
    errs = comm.all_gather_object(err) if comm is not None else gather_objects(err)
    return next((e for e in errs if e), None)


# ---- the per-rank state file ------------------------------------------------------------------------

def write_rank_file(ckpt: Path, state: dict, rank: int, world: int, step: int) -> Optional[str]:
    """Write this rank's ``ds_ext_rank<rank>.pt`` into checkpoint directory ``ckpt``: ``state`` with
    ``rank``, ``world_size`` and ``global_step`` (temporary name, fsync, rename, directory fsync).
    Returns None, or one line naming the file and the operating system's reason; never raises, so the
    caller can share the verdict with every rank (a rank that raised alone would leave the others
    waiting in the next collective)."""
    here = rank_file(Path(ckpt), rank)
    tmp = here.with_name(f".{here.name}.tmp{os.getpid()}")
    err = None
    try:
        torch_save_atomic({**state, "rank": rank, "world_size": world, "global_step": step}, here, keep_tmp=True)
        fsync_dir(here.parent)
    except Exception as e:  # noqa: BLE001 -- ENOSPC / EROFS / EIO / EFBIG, torch's writer errors, pickling
        err = reason(e, tmp)
    tmp.unlink(missing_ok=True)
    return err


def read_rank_file(ckpt: Path, rank: int, world: int, step: int) -> Optional[dict]:
    """This rank's state from ``ckpt/ds_ext_rank<rank>.pt`` (None when there is no such file), checked to
    be a ds_ext rank file written by rank ``rank`` of a run of ``world`` ranks at ``step`` (DeepSpeed's
    step, after DeepSpeed loaded its files). Raises ``CheckpointError`` naming the file otherwise."""
    f = rank_file(Path(ckpt), rank)
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file
        raise CheckpointError(f"{f}: cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(state, dict) or "attachment" not in state:
        raise CheckpointError(f"{f}: not a ds_ext rank file (found {type(state).__name__})")
    if "rank" in state and state["rank"] != rank:
        raise CheckpointError(f"{f} records rank {state['rank']}, this is rank {rank}: another rank's file (copied "
                              "or renamed); its method state belongs to that rank")
    if "world_size" in state and state["world_size"] != world:
        raise CheckpointError(f"{f} was saved by a run of {state['world_size']} ranks, this one has {world}: per-rank "
                              "method state (error feedback) cannot be split or merged (an own loop can load with "
                              "load_optimizer_states=False to start the methods fresh)")
    got = state.get("global_step")
    if got is not None and int(got) != int(step):
        raise CheckpointError(f"{f} is from step {got}, DeepSpeed's files in {f.parent} from step {step} (a tag "
                              "saved twice, or a file from another checkpoint): the methods' state does not belong "
                              "to these parameters")
    return state


# ---- meta.json: fingerprints and the completion marker ------------------------------------------------

def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: Path, integrity: str) -> dict:
    out = {"size": path.stat().st_size}
    if integrity == "hash":
        out["sha256"] = digest(path)
    return out


def checkpoint_files(ckpt: Path) -> List[str]:
    """Every regular file of a checkpoint directory (relative names, sorted), except ``meta.json``."""
    out = []
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != META and not p.name.startswith("."):
            out.append(p.relative_to(ckpt).as_posix())
    return out


def share(names: List[str], rank: int, world: int) -> List[str]:
    """This rank's share of a list of files (to hash or verify)."""
    return [n for i, n in enumerate(names) if i % world == rank]


def verify_files(path: Path, names: List[str], files: dict, integrity: str) -> Optional[str]:
    """None when the files ``names`` of checkpoint ``path`` match their fingerprints ``files`` (``meta.json``'s),
    else one line naming the first that does not."""
    for n in names:
        want, f = files[n], path / n
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{f}: missing"
        except OSError as e:
            return f"{f}: cannot be read ({os.strerror(e.errno or 0)})"
        if size != want.get("size"):
            return f"{f}: {size} bytes, the checkpoint recorded {want.get('size')} (truncated or replaced)"
        if integrity == "hash" and "sha256" in want:
            try:
                got = digest(f)
            except OSError as e:
                return f"{f}: cannot be read ({os.strerror(e.errno or 0)})"
            if got != want["sha256"]:
                return f"{f}: SHA-256 differs from the one recorded at save (damaged)"
    return None


def write_meta(ckpt: Path, meta: dict, integrity: str, rank: int, world: int) -> Optional[str]:
    """Collective, once every rank's files of checkpoint ``ckpt`` are written: fingerprint them (each rank a
    share, rank 0 gathers), then rank 0 fsyncs DeepSpeed's files (DeepSpeed does not), writes ``meta.json``
    (``meta`` with ``integrity`` and ``files``; atomic) and fsyncs the directory. Returns None or one line
    naming the file and the reason: a fingerprint failure on every rank alike, a failed write of rank 0
    on rank 0 only (the caller shares it)."""
    ckpt = Path(ckpt)
    names = gather_objects(checkpoint_files(ckpt) if rank == 0 else None)[0]
    prints, err = {}, None
    for n in share(names, rank, world):
        try:
            prints[n] = fingerprint(ckpt / n, integrity)
        except OSError as e:
            err = reason(e, ckpt / n)
            break
    got = gather_objects((prints, err))
    err = next((e for _, e in got if e), None)
    if err is not None or rank != 0:
        return err
    try:
        for n in names:
            if not Path(n).name.startswith("ds_ext_rank"):  # the rank files were fsynced when written
                fsync_path(ckpt / n)
        body = {**meta, "integrity": integrity, "files": {k: v for p, _ in got for k, v in p.items()}}
        write_atomic(ckpt / META, json.dumps(body, indent=1, sort_keys=True).encode())
        fsync_dir(ckpt)
    except OSError as e:
        return reason(e, ckpt / META)
    return None


def read_meta(path: Path) -> dict:
    """``path/meta.json`` as a dict; ``CheckpointError`` naming it when it cannot be read or is not an object."""
    f = Path(path) / META
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: not a JSON object (found {type(meta).__name__}): damaged or not a ds_ext file")
    return meta


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def manifest_problem(path: Path, meta: dict, integrity: str = "hash") -> Optional[str]:
    """The one rule for every door (trainer, own loop, Hugging Face Trainer): None when ``meta`` (``path``'s
    ``meta.json``) is a whole manifest, else one line naming it and what is missing (damaged). Format 3 (every
    save since fingerprints) needs ``format``, ``step``, ``world_size``, a non-empty ``files`` entry that lists
    every rank's ``ds_ext_rank<r>.pt``, and ``recipe`` (the trainer's) or ``saved_by`` (an own loop's / the
    Trainer's ``engine.save_checkpoint``). A format before 3 recorded no fingerprints: refused unless
    ``integrity`` is ``off``."""
    f = Path(path) / META
    fmt = meta.get("format")
    if not _int(fmt):
        return f"{f}: no 'format' entry (damaged, or not written by ds_ext)"
    if fmt > FORMAT:
        return f"{f}: format {fmt} is newer than this ds_ext reads ({FORMAT}): written by a newer version"
    if fmt < 3:
        return None if integrity == "off" else (
            f"{f}: format {fmt} predates fingerprints, so its files cannot be verified (checkpoint.integrity=off "
            "resumes it unverified)")
    if meta.get("saved_by") != OWN_LOOP and not isinstance(meta.get("recipe"), dict):
        return f"{f}: no 'recipe' entry (damaged)"
    files = meta.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, dict) for v in files.values()):
        return f"{f}: its 'files' entry (every file's size and SHA-256) is missing or malformed (damaged)"
    for key in ("step", "world_size"):
        if not _int(meta.get(key)) or meta[key] < 0:
            return f"{f}: no valid '{key}' entry (damaged)"
    missing = [rank_file(Path("."), r).name for r in range(meta["world_size"])
               if rank_file(Path("."), r).name not in files]
    if missing:
        return f"{f}: lists no {', '.join(missing[:3])} (damaged: every rank's ds_ext state belongs to a checkpoint)"
    return None


def verify(path: Path, integrity: str = "hash", rank: int = 0, world: int = 1, own_file: bool = True
           ) -> Optional[str]:
    """This rank's share of a checkpoint's verification (every door calls this; the caller gathers every rank's
    verdict): ``None`` when intact, else one line naming the damaged file. Reads ``meta.json`` and applies
    ``manifest_problem``; checks that this rank's own rank file exists (``own_file``); checks size (and
    SHA-256 where recorded and ``integrity`` is ``hash``) of this rank's share of the files ``meta.json`` lists."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return str(e)
    problem = manifest_problem(path, meta, integrity)
    if problem:
        return problem
    if own_file and not rank_file(path, rank).is_file():
        return f"{rank_file(path, rank)}: missing (no state for rank {rank})"
    files = meta.get("files")
    if integrity == "off" or not files:
        return None
    return verify_files(path, share(sorted(files), rank, world), files, integrity)


# ---- DeepSpeed's own save and load, and its writes' failures -------------------------------------------

def deepspeed_own(engine, name: str) -> Callable:
    """DeepSpeed's own ``engine.save_checkpoint`` or ``engine.load_checkpoint`` (``name``), also while a ds_ext
    attachment has put its own on the engine (it keeps DeepSpeed's): for a caller that writes and reads
    every rank's state itself (the trainer's store)."""
    att = getattr(engine, "_ds_ext_attachment", None)
    if att is not None:
        return {"save_checkpoint": att._orig_save, "load_checkpoint": att._orig_load}[name]
    return getattr(engine, name)


@contextlib.contextmanager
def deferred_checkpoint_writes(engine):
    """Inside this context a file write of DeepSpeed's ``save_checkpoint`` that fails (disk full,
    read-only, I/O error) is recorded, as ``(path, exception)`` in the yielded list, instead of raised,
    and the rest of that rank's writes are skipped: ``save_checkpoint`` runs collectives after its
    writes (a barrier), and a rank that raised out of it would leave the others waiting there while it
    went on to the next collective. The caller turns the list into a verdict shared by every rank.
    Written against DeepSpeed 0.19's ``engine.checkpoint_engine.save(state_dict, path)``; an engine
    without it is left alone."""
    ce = getattr(engine, "checkpoint_engine", None)
    failed: list = []
    if ce is None or not callable(getattr(ce, "save", None)):
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
        yield failed
    finally:
        if had_own:
            ce.save = orig
        else:
            del ce.save


@contextlib.contextmanager
def checkpoint_managed(engine):
    """Inside, ``engine.save_checkpoint`` / ``load_checkpoint`` are DeepSpeed's own even while attached (the
    attachment's are taken off the engine for the duration): DeepSpeed's files only, the methods' state
    neither saved nor restored."""
    att = getattr(engine, "_ds_ext_attachment", None)
    if att is None or engine.__dict__.get("save_checkpoint") != att.save_checkpoint:
        yield
        return
    engine.save_checkpoint, engine.load_checkpoint = att._orig_save, att._orig_load
    try:
        yield
    finally:
        if getattr(engine, "_ds_ext_attachment", None) is att:
            engine.save_checkpoint, engine.load_checkpoint = att.save_checkpoint, att.load_checkpoint
