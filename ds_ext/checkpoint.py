"""Atomic checkpoints: DeepSpeed's own checkpoint plus per-rank method and trainer state.

Layout of ``<dir>``::

    latest                 name of the newest complete checkpoint (replaced atomically)
    step_000120/           one complete checkpoint (DeepSpeed files + ds_ext_rank<r>.pt + meta.json)
    .staging-step_000160/  a save in progress (never pointed at; removed by the next save)

A save writes everything under ``.staging-<tag>/<tag>``, waits for every rank, then rank 0 writes
``meta.json`` (the completion marker), renames the directory into place and only then replaces
``latest`` (write to a temporary file, fsync, ``os.replace``). A crash at any point leaves the
previous checkpoint and ``latest`` untouched. The directory must be on a file system shared by all
nodes (DeepSpeed's default assumption).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

META = "meta.json"


class CheckpointError(RuntimeError):
    pass


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def save(engine, ckpt_dir: str, tag: str, rank_state: dict, meta: dict, keep: int = 2,
         client_state: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    staging = root / f".staging-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(".staging-*"):  # leftovers of an interrupted save
            shutil.rmtree(old, ignore_errors=True)
        staging.mkdir()
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state or {}, save_latest=False)
    _torch_save_atomic(rank_state, rank_file(staging / tag, rank))
    _barrier()
    final = root / tag
    if rank == 0:
        _write_atomic(staging / tag / META, json.dumps(meta, indent=1, sort_keys=True).encode())
        _fsync_dir(staging / tag)
        if final.exists():  # re-saving the same tag: move the old one out of the way first
            shutil.rmtree(final)
        os.rename(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(root)
        _write_atomic(root / "latest", tag.encode())
        _prune(root, keep, protect=tag)
    _barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and (p / META).is_file())  # step_<zero-padded>
    for p in done[:-keep]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def latest(ckpt_dir: str) -> Optional[Path]:
    """The newest complete checkpoint in ``ckpt_dir``, or None."""
    root = Path(ckpt_dir)
    f = root / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    path = root / tag
    if not (path / META).is_file():
        raise CheckpointError(f"{f} points at {tag!r}, which is missing or incomplete (no {META})")
    return path


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
    return json.loads((path / META).read_text())


def check_meta(path: Path, expected: dict) -> None:
    """Refuse a checkpoint made with a different world size, methods or model."""
    meta = read_meta(path)
    diffs = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if meta.get(k) != v]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(diffs))


def load(engine, path: Path, rank: int) -> dict:
    """Load DeepSpeed state (module, optimizer, LR schedule) and return this rank's ds_ext state."""
    f = rank_file(path, rank)
    if not f.is_file():
        raise CheckpointError(f"{path} has no state for rank {rank} ({f.name})")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    return torch.load(f, map_location="cpu", weights_only=False)
