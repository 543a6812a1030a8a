"""Atomic checkpoints: DeepSpeed's own checkpoint plus per-rank method and trainer state.

Layout of ``<dir>``::

    latest                  name of the newest complete checkpoint (replaced atomically)
    step_0000120/           one complete checkpoint (DeepSpeed files + ds_ext_rank<r>.pt + meta.json)
    .staging-step_0000160/  a save in progress (never pointed at; removed by the next save)
    .deleting-step_0000040/ an old checkpoint being pruned (removed by the next save)
    .replaced-step_0000120/ the previous copy of a tag that is being saved again (see below)

``save`` (collective) goes through these phases, each a fault-injection point of ``ds_ext.faults``
(``ckpt_<phase>``); a process killed at any of them leaves ``latest`` naming a complete checkpoint:

1. ``start``: rank 0 removes leftovers of interrupted saves (``.staging-*``, ``.deleting-*``, a
   ``.replaced-<tag>`` whose tag is complete again) and creates ``.staging-<tag>/``; barrier.
2. ``deepspeed``: every rank writes DeepSpeed's files (``engine.save_checkpoint``, no ``latest``).
3. ``rankfile``: every rank writes ``ds_ext_rank<r>.pt`` (temporary name, fsync, rename); barrier.
4. ``meta``: rank 0 fsyncs DeepSpeed's files (DeepSpeed does not), writes ``meta.json`` (the
   completion marker: a directory without it is never loaded) and fsyncs the directory.
5. ``rename`` (and ``replace``): rank 0 renames ``.staging-<tag>/<tag>`` to ``<tag>`` (one atomic ``rename``). If
   ``<tag>`` already exists (a run resumed from an older checkpoint reaches the same step again), it
   is first renamed to ``.replaced-<tag>``; ``latest`` falls back to that copy while ``<tag>`` is
   missing, so even a ``latest`` that names this tag never points at nothing.
6. ``latest``: rank 0 replaces ``latest`` (temporary file, fsync, ``os.replace``, directory fsync).
7. ``prune``: rank 0 removes complete checkpoints beyond ``keep`` (never the new one): each is
   first renamed to ``.deleting-<tag>`` (atomic), then deleted, so a half-deleted checkpoint never
   looks complete. Barrier (``end``).

The directory must be on a file system shared by all nodes (DeepSpeed's assumption as well).
Deviation from the previous version of this module: re-saving an existing tag used to delete the old
copy before renaming the new one in (a crash in between left ``latest`` naming a missing
directory), and pruning deleted in place (a crash left a partial directory that still had
``meta.json``); both found by ``tests/test_faults.py``.

Resuming checks the checkpoint's ``meta.json`` against this run (``check_meta``): see
``resume_fields`` for what must match and what may change.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from . import faults

META = "meta.json"
FORMAT = 2  # meta.json layout: 1 = top-level names only, 2 = + "recipe" (dotted fields, see resume_fields)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, damaged)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint was made by a run this one cannot continue (same verdict on every rank)."""


def _barrier():
    from .comm import barrier

    barrier()


def _fsync_path(path: Path) -> None:
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


_fsync_dir = _fsync_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"ds_ext_rank{rank}.pt"


def _complete(path: Path) -> bool:
    return (path / META).is_file()


def _recover(root: Path) -> None:
    """Rank 0, before a save: clear what interrupted saves and prunes left behind."""
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
         client_state: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. See the module docstring."""
    root = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    step = int(getattr(engine, "global_steps", 0))
    faults.progress(step, "checkpoint save")
    staging = root / f".staging-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _recover(root)
        staging.mkdir()
    _barrier()
    faults.point("ckpt_start", step)
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state or {}, save_latest=False)
    faults.point("ckpt_deepspeed", step)
    _torch_save_atomic(rank_state, rank_file(staging / tag, rank))
    faults.point("ckpt_rankfile", step)
    _barrier()
    final = root / tag
    if rank == 0:
        for f in (staging / tag).iterdir():
            if f.is_file() and not f.name.startswith("ds_ext_rank"):
                _fsync_path(f)  # DeepSpeed's files: written with torch.save, never fsynced
        _write_atomic(staging / tag / META, json.dumps({**meta, "tag": tag}, indent=1, sort_keys=True).encode())
        _fsync_dir(staging / tag)
        faults.point("ckpt_meta", step)
        aside = root / f".replaced-{tag}"
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(final, aside)
            faults.point("ckpt_replace", step)
        os.rename(staging / tag, final)
        _fsync_dir(root)
        faults.point("ckpt_rename", step)
        _write_atomic(root / "latest", tag.encode())
        faults.point("ckpt_latest", step)
        shutil.rmtree(staging, ignore_errors=True)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        _prune(root, keep, protect=tag, step=step)
    _barrier()
    faults.point("ckpt_end", step)
    return final


def _prune(root: Path, keep: int, protect: str, step: int = 0) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _complete(p))
    for p in done[:-keep] if keep > 0 else done:  # names are step_<zero-padded>, so this is step order
        if p.name == protect:
            continue
        doomed = root / f".deleting-{p.name}"
        os.rename(p, doomed)  # gone from view in one step
        faults.point("ckpt_prune", step)
        shutil.rmtree(doomed, ignore_errors=True)


def latest(ckpt_dir: str) -> Optional[Path]:
    """The newest complete checkpoint in ``ckpt_dir``, or None when there is no ``latest`` file."""
    root = Path(ckpt_dir)
    f = root / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    path = root / tag
    if _complete(path):
        return path
    aside = root / f".replaced-{tag}"
    if _complete(aside):  # a save of the same tag died between its two renames
        return aside
    raise CheckpointError(f"{f} points at {tag!r}, which is missing or incomplete (no {META})")


def resolve(resume, ckpt_dir: str) -> Optional[Path]:
    """Map the recipe's ``checkpoint.resume`` to a checkpoint path (or None to start fresh)."""
    if resume in (False, None, "false", "no"):
        return None
    if resume in (True, "auto", "latest", "true"):
        return latest(ckpt_dir)
    path = Path(str(resume))
    if (path / "latest").is_file():
        return latest(str(path))
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint.resume: {path} is not a complete ds_ext checkpoint (no {META}) "
                              f"and holds no 'latest' file")
    return path


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / META}: cannot be read ({e})") from None


# ---- what a resumed run must share with the checkpoint --------------------------------------------

# Options of data readers that name files or tune speed: moving the data or changing the cache does
# not change the examples (validation-only options do not touch the training state either).
FREE_DATA_OPTIONS = frozenset({"file", "cache", "cache_dir", "chunk_rows", "train_file", "val_file", "os_cache",
                               "batches_ahead", "threads", "write_max_resolution", "write_jpeg_quality",
                               "write_compress_probability", "max_val", "val_split", "val_resolution",
                               "val_crop_ratio"})
# DeepSpeed keys that only log, print or profile.
FREE_DEEPSPEED_KEYS = frozenset({"steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler",
                                 "comms_logger", "tensorboard", "wandb", "csv_monitor", "memory_breakdown",
                                 "timers", "monitor_config"})
# train.* keys that define the optimisation (the others may change).
FIXED_TRAIN_KEYS = ("global_batch_size", "seed", "steps_per_epoch", "label_smoothing")
ORDERS_FIXING_MICRO = ("dgrab", "cdgrab")  # their state is indexed by micro-batches

MAY_CHANGE = ("name", "description", "data.root", "data.num_workers", "data.eval_micro_batch_size",
              "data options " + "/".join(sorted(FREE_DATA_OPTIONS)), "train.epochs", "train.stop_at_step",
              "train.eval_every_epochs", "train.collective_timeout_s", "train.check_consistency_every",
              "train.micro_batch_size (except with order dgrab/cdgrab)", "log.*", "checkpoint.*",
              "deepspeed." + "/".join(sorted(FREE_DEEPSPEED_KEYS)))


def _named(prefix: str, block, free=frozenset()) -> Dict[str, Any]:
    out = {f"{prefix}.name": block.name}
    opts = block.options.model_dump(mode="json") if block.checked is not None else block.params
    out.update({f"{prefix}.{k}": v for k, v in opts.items() if k not in free})
    return out


def resume_fields(recipe, world_size: int) -> Dict[str, Any]:
    """The recipe fields a resumed run must share with its checkpoint, as ``{dotted key: JSON value}``.

    Must match: the world size (each rank's data shard, order state and method state are per rank;
    no method here is resharded, so a different world size is refused rather than silently
    re-split), the model and its options, the data set and every option that selects or transforms
    training examples, the optimizer and its options, the whole ``schedule`` section,
    ``train.global_batch_size``, ``train.seed``, ``train.steps_per_epoch``,
    ``train.label_smoothing``, ``train.micro_batch_size`` with the orders ``dgrab``/``cdgrab`` (their
    state counts micro-batches), every ``method`` block with all its options (defaults filled in, so
    writing a default explicitly is no change), the precision and every ``deepspeed`` key except
    logging and profiling ones.

    May change (``MAY_CHANGE``): ``name``, ``description``, ``data.root``, ``data.num_workers``,
    ``data.eval_micro_batch_size``, data options that name files, tune speed or only touch
    validation (``FREE_DATA_OPTIONS``), ``train.epochs`` (note: with ``schedule.epochs_for_schedule``
    unset the LR decay then stretches to the new length), ``train.stop_at_step``,
    ``train.eval_every_epochs``, ``train.collective_timeout_s``, ``train.check_consistency_every``,
    ``train.micro_batch_size`` with the other orders (the accumulation adapts; the data position is
    counted in optimizer steps, so it is unchanged), ``log.*``, ``checkpoint.*`` and DeepSpeed's
    logging/profiling keys (``FREE_DEEPSPEED_KEYS``). Keys added to ``train`` later are free unless
    listed in ``FIXED_TRAIN_KEYS``.
    """
    f: Dict[str, Any] = {"world_size": world_size}
    f.update(_named("model", recipe.model))
    f.update(_named("data", recipe.data, FREE_DATA_OPTIONS))
    f.update(_named("optimizer", recipe.optimizer))
    f.update({f"schedule.{k}": v for k, v in recipe.schedule.model_dump(mode="json").items()})
    t = recipe.train.model_dump(mode="json")
    f.update({f"train.{k}": t[k] for k in FIXED_TRAIN_KEYS if k in t})
    if recipe.method.order.name in ORDERS_FIXING_MICRO:
        f["train.micro_batch_size"] = t["micro_batch_size"]
    for part in ("reducer", "sync", "order"):
        f.update(_named(f"method.{part}", getattr(recipe.method, part)))
    f["precision"] = recipe.precision()
    ds = json.loads(json.dumps(recipe.deepspeed, default=str))
    f.update({f"deepspeed.{k}": v for k, v in ds.items() if k not in FREE_DEEPSPEED_KEYS})
    return f


def run_meta(recipe, world_size: int) -> dict:
    """``meta.json`` content for a run: the format-1 summary plus ``recipe`` (``resume_fields``)."""
    return {"format": FORMAT, "world_size": world_size, "model": recipe.model.name, **recipe.method_names(),
            "global_batch_size": recipe.train.global_batch_size, "precision": recipe.precision(),
            "recipe_file": recipe.source, "recipe": resume_fields(recipe, world_size)}


_IGNORED_TOP = ("format", "recipe", "recipe_file", "tag")


def check_meta(path: Path, expected: dict) -> None:
    """Refuse a checkpoint made by a run this one cannot continue, naming every difference.

    ``expected`` is this run's ``run_meta`` (or any dict of top-level meta keys). When both sides
    have ``recipe`` (format 2), its fields are compared (world size first, then by key; a key present
    on one side only is a difference; when a block's ``name`` differs, that block's options are not
    listed one by one). Otherwise (a format-1 checkpoint, written before the recipe fields were
    recorded, or a plain dict) the top-level keys of ``expected`` are compared."""
    meta = read_meta(path)
    diffs = []
    mine, theirs = expected.get("recipe"), meta.get("recipe")
    if isinstance(mine, dict) and isinstance(theirs, dict):
        missing = object()
        renamed = [k[: -len(".name")] for k in set(mine) | set(theirs)
                   if k.endswith(".name") and theirs.get(k, missing) != mine.get(k, missing)]
        for k in sorted(set(mine) | set(theirs), key=lambda k: (k != "world_size", k)):
            if any(k.startswith(block + ".") and k != block + ".name" for block in renamed):
                continue
            a, b = theirs.get(k, missing), mine.get(k, missing)
            if a != b:
                a = "(absent)" if a is missing else repr(a)
                b = "(absent)" if b is missing else repr(b)
                diffs.append(f"{k}: checkpoint has {a}, this run has {b}")
    else:
        for k, v in expected.items():
            if k not in _IGNORED_TOP and meta.get(k) != v:
                diffs.append(f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}")
    if diffs:
        made_by = f" (made by {meta['recipe_file']})" if meta.get("recipe_file") else ""
        raise CheckpointMismatch(
            f"cannot resume from {path}{made_by}: " + "; ".join(diffs)
            + ". Fields that may change on resume: " + ", ".join(MAY_CHANGE)
            + " (set checkpoint.resume=false or another checkpoint.dir to start afresh)")


def load(engine, path: Path, rank: int) -> dict:
    """Load DeepSpeed state (module, optimizer, LR schedule) and return this rank's ds_ext state."""
    f = rank_file(path, rank)
    if not f.is_file():
        raise CheckpointError(f"{path} has no state for rank {rank} ({f.name})")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{f}: cannot be loaded ({type(e).__name__}: {e})") from None
