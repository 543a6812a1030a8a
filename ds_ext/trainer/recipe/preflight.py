"""Checks before the process group starts: the world size, the environment, the paths the run writes
or resumes from and the data files (``preflight``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from ...registry import DATASETS, MODELS
from ...spec import RecipeError
from .schema import Recipe


class DataPathError(RecipeError):
    """A file or directory the run needs is missing (found before the process group starts). The
    trainer prints it as ``data error:`` and exits 3, as it does for a data error found later."""


# ---- checks before the process group starts ------------------------------------------------------

def world_size_from(explicit: Optional[int], environ: Mapping[str, str]) -> Optional[int]:
    """The world size known before start-up: ``--world-size`` if given, else ``$WORLD_SIZE`` (which the
    DeepSpeed launcher sets for every process it starts), else None (unknown)."""
    if explicit is not None:
        if explicit < 1:
            raise RecipeError("--world-size", [("", f"must be a positive integer (got {explicit})")])
        return explicit
    raw = environ.get("WORLD_SIZE")
    if raw is None or raw.strip() == "":
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise RecipeError("environment", [("WORLD_SIZE", f"must be a positive integer (got {raw!r})")])
    return n


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def path_problems(recipe: Recipe) -> List[Tuple[str, str]]:
    """Paths the run writes or resumes from: ``log.dir`` (and ``checkpoint.dir`` when checkpoints are
    written or resumed) must be creatable directories; an explicit ``checkpoint.resume`` path must exist.
    Whether a checkpoint there is complete and matches the run is decided when it is loaded."""
    ck = recipe.checkpoint
    keys = [("log.dir", recipe.log.dir)]
    if ck.every_steps or ck.every_epochs or recipe.train.stop_at_step or ck.resume not in (False, "false", "no"):
        keys.append(("checkpoint.dir", ck.dir))
    problems = []
    for key, value in keys:
        path = Path(value)
        anc = _first_existing(path)
        origin = recipe._origin.get(key)
        note = f" [{key} is under {origin}]" if origin else ""
        if not anc.is_dir():
            problems.append((key, f"{path} cannot be a directory: {anc} exists and is not a directory{note}"))
        elif not os.access(anc, os.W_OK | os.X_OK):
            problems.append((key, f"{path} cannot be created: {anc} is not writable{note}"))
    r = ck.resume
    if isinstance(r, str) and r not in ("false", "no", "auto", "latest", "true") and not Path(r).exists():
        problems.append(("checkpoint.resume", f"{r}: no such checkpoint (allowed: false, auto = the newest "
                                              f"checkpoint in checkpoint.dir if any, or an existing path)"))
    clash = records_problem(recipe)
    if clash:
        problems.append(("log.dir", clash))
    return problems


RECORD_FILES = ("summary.json", "history.jsonl")  # what rank 0 writes into log.dir (ds_ext/trainer/records.py)


def _resumes(ck) -> bool:
    """Whether the run continues a checkpoint: an explicit ``checkpoint.resume`` path, or ``auto`` with a
    complete checkpoint in ``checkpoint.dir`` (``auto`` over a directory of damaged ones is refused when the
    checkpoint is chosen, exit 5)."""
    r = ck.resume
    if r in (False, None, "false", "no"):
        return False
    if r in (True, "true", "auto", "latest"):
        from ..checkpoint import complete_checkpoints

        return bool(complete_checkpoints(ck.dir))
    return True


def _earlier_run(run_dir: Path, found: List[str]) -> str:
    """A few words on the run whose records ``run_dir`` holds, from its ``summary.json`` (a finished run) or
    the last line of its ``history.jsonl``."""
    import json

    try:
        s = json.loads((run_dir / RECORD_FILES[0]).read_text())
        return (f"a finished run of {Path(str(s.get('recipe', '?'))).name} (reducer={s.get('reducer', '?')} "
                f"sync={s.get('sync', '?')}, {s.get('steps', '?')} steps)")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(run_dir / RECORD_FILES[1], "rb") as f:
            last = f.read()[-65536:].splitlines()[-1]
        return f"a run that logged up to step {json.loads(last)['step']}"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return f"an earlier run ({', '.join(found)})"


def free_run_dir(run_dir: Path) -> Path:
    """``<run_dir>-2``, ``-3``, ...: the first that does not exist (the suggestion of ``records_problem``)."""
    n = 2
    while Path(f"{run_dir}-{n}").exists():
        n += 1
    return Path(f"{run_dir}-{n}")


def records_problem(recipe: Recipe) -> Optional[str]:
    """Why this run may not start in ``log.dir``, or None: the directory holds another run's records
    (``summary.json``, or a non-empty ``history.jsonl``) and this run starts afresh, so it would replace them
    (Composer's ``save_overwrite=False`` rule). A run that resumes a checkpoint continues those records and is
    let through, and ``log.overwrite: true`` lets a fresh run replace them."""
    if recipe.log.overwrite:
        return None
    run_dir = Path(recipe.log.dir)
    found = []
    for name in RECORD_FILES:
        try:
            if (run_dir / name).stat().st_size > 0:
                found.append(name)
        except OSError:
            continue
    if not found or _resumes(recipe.checkpoint):
        return None
    ck = recipe.checkpoint
    how, resume = f"no complete checkpoint in {ck.dir}", ""
    if ck.resume in (False, "false", "no"):
        from ..checkpoint import complete_checkpoints

        how = "checkpoint.resume=false"
        if complete_checkpoints(ck.dir):
            resume = ", continue that run with --set checkpoint.resume=auto"
    return (f"{run_dir} holds the records ({', '.join(found)}) of {_earlier_run(run_dir, found)}; this run starts "
            f"afresh ({how}) and would replace them. Give it its own directory (--set log.dir={free_run_dir(run_dir)}, "
            f"or another name: in the recipe){resume}, or replace them on purpose with --set log.overwrite=true")


def data_problems(recipe: Recipe) -> List[Tuple[str, str]]:
    """Missing input files of a file-backed data set, found before the process group starts: the files its
    reader declares as ``files(options)`` (``needs_files`` in ds_ext/data/files.py). Only a trigger: when one
    is missing, the data set is built, and the reader's own FileNotFoundError (path, layout, how to get the
    data) is what the user sees; when the reader finds its files after all, nothing is refused. Data sets
    whose reader declares no files check their own files when they are built."""
    d = recipe.data
    if d._options is None or d.name not in DATASETS:
        return []
    files = getattr(DATASETS.get(d.name).factory, "files", None)
    if files is None:
        return []
    missing = []
    for key, rel in files(d.options):
        path = Path(rel).expanduser()
        if not path.is_absolute():
            if d.root is None:
                missing.append(key)
                continue
            path = Path(d.root).expanduser() / path
        if not path.is_file():
            missing.append(key)
    if not missing:
        return []
    try:
        DATASETS.build(d.name, d.options, root=d.root)
    except (FileNotFoundError, ImportError, ValueError, OSError) as e:
        origin = recipe._origin.get("data.root")
        note = f"\n  (data.root = {d.root} comes from {origin})" if origin and missing[0] == "data.root" else ""
        return [(missing[0], f"{e}{note}")]
    return []  # the reader found its files after all


# ---- the model's size ------------------------------------------------------------------------------

def parameter_count(recipe: Recipe) -> Optional[int]:
    """The parameters of the recipe's model, counted on torch's meta device (shapes only, no memory); None
    when the model takes its sizes from the data set (built without one it refuses) or cannot be built
    there."""
    import torch

    m = recipe.model
    if m._options is None or m.name not in MODELS:
        return None
    try:
        with torch.device("meta"):
            model = MODELS.build(m.name, m.options, data=None)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 -- sizes from the data set, or an op with no meta kernel: not counted
        return None


def host_memory() -> Optional[int]:
    """Bytes this process can hold at most: the host's physical memory, or the address-space limit
    (``ulimit -v``) when that is lower; None when neither is known."""
    import resource

    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits) if limits else None


def model_line(recipe: Recipe, count: Optional[int]) -> str:
    """``model digits_cnn (width=16, hidden=64, ...): 1,234 parameters (4.8 KiB as fp32)``, for ``--check``
    and for the messages about a model too large to build."""
    from ...meter import human_bytes

    m = recipe.model
    given = m.options.model_dump() if m._options is not None else {}
    opts = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
    head = f"model {m.name} ({opts})" if opts else f"model {m.name}"
    if count is None:
        return f"{head}: size known once the data set is loaded"
    return f"{head}: {count:,} parameters ({human_bytes(4 * count)} as fp32)"


def model_problems(recipe: Recipe, count: Optional[int] = None, memory: Optional[int] = None) -> List[Tuple[str, str]]:
    """A model whose fp32 weights alone exceed this host's memory (``host_memory``): it cannot be built
    (``model.width=200000`` asked for 2.9 TB and ended in an allocator traceback on every rank)."""
    from ...meter import human_bytes

    count = parameter_count(recipe) if count is None else count
    memory = host_memory() if memory is None else memory
    if count is None or memory is None or 4 * count <= memory:
        return []
    return [("model", f"{model_line(recipe, count)}: the weights alone exceed this host's {human_bytes(memory)} "
                      f"of memory; make the model smaller")]


def environment_problems(environ: Mapping[str, str]) -> List[Tuple[str, str]]:
    """Environment variables the run reads later, checked up front: ``DS_EXT_OPS`` (the kernel mode,
    otherwise a ValueError at the first training step)."""
    from ... import ops

    problem = ops.mode_problem(environ.get(ops.ENV))
    return [(ops.ENV, problem)] if problem else []


def preflight(recipe: Recipe, world_size: Optional[int], environ: Optional[Mapping[str, str]] = None) -> None:
    """What the trainer checks before ``init_distributed``: the environment (``environment_problems``,
    ``environ`` default ``os.environ``; a ``RecipeError`` from the source "environment"), the world-size
    rules (when the world size is known), the paths it writes and resumes from, a model too large for this
    host's memory (``model_problems``; ``RecipeError``), then the
    data files (``DataPathError``). Every rank runs it on its own files, so a rank with a bad per-host file
    stops before any process group exists."""
    problems = environment_problems(os.environ if environ is None else environ)
    if problems:
        raise RecipeError("environment", problems)
    problems = recipe.world_problems(world_size) if world_size is not None else []
    problems += path_problems(recipe) + model_problems(recipe)
    if problems:
        raise RecipeError(recipe.source, problems)
    problems = data_problems(recipe)
    if problems:
        raise DataPathError(recipe.source, problems)
