"""What a resumed run must share with its checkpoint: ``resume_fields`` (what must match and what may
change), ``run_meta`` (the ``meta.json`` content of a run) and ``check_meta`` (refuse a checkpoint made by
a run this one cannot continue, naming every difference).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ...deepspeed.checkpoint import FORMAT, OWN_LOOP, CheckpointError, read_meta


class CheckpointMismatch(CheckpointError):
    """The checkpoint was made by a run this one cannot continue (same verdict on every rank)."""


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
              "train.nonfinite", "train.max_consecutive_skips",
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
    recorded, or a plain dict) the top-level keys of ``expected`` are compared. A checkpoint saved by
    ``engine.save_checkpoint`` in an own loop (``saved_by``) records no recipe: it is refused in one line
    that says so."""
    meta = read_meta(path)
    if meta.get("saved_by") == OWN_LOOP and not isinstance(meta.get("recipe"), dict):
        raise CheckpointMismatch(
            f"cannot resume from {path}: it was saved by engine.save_checkpoint in an own training loop, which "
            "records neither the recipe this run must match (model, data, method, optimizer) nor the trainer's "
            "data position and random state; load it with engine.load_checkpoint in an own loop, or set "
            "checkpoint.resume=false or another checkpoint.dir to start afresh")
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

