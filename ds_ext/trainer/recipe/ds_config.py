"""An existing DeepSpeed config named by the recipe key ``deepspeed_config``, merged into the recipe
(``ds_config_problems``), with the equivalent recipe lines for the blocks ds_ext owns itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from ...registry import OPTIMIZERS
from ...spec import _short


# ---- an existing DeepSpeed config (recipe key deepspeed_config) ------------------------------------------------

#: a DeepSpeed config's batch keys and the recipe keys that own them
_DS_BATCH_KEYS = {"train_batch_size": "train.global_batch_size",
                  "train_micro_batch_size_per_gpu": "train.micro_batch_size"}
_DS_OPTIMIZER_NAMES = {"adam": "adam", "adamw": "adamw", "sgd": "sgd"}


def _ds_config_path(ref: str, source: str) -> Path:
    """``deepspeed_config`` as written: absolute, relative to the working directory, or else relative to the
    recipe file's directory."""
    p = Path(ref).expanduser()
    if p.is_absolute() or p.exists():
        return p
    beside = Path(source).parent / p
    return beside if beside.exists() else p


def _optimizer_advice(block: Any) -> str:
    """The recipe lines equivalent to a DeepSpeed optimizer block, where they exist."""
    if not isinstance(block, Mapping):
        return "optimizer: {name: adamw, lr: ...}"
    name = _DS_OPTIMIZER_NAMES.get(str(block.get("type", "")).lower())
    params = block.get("params") if isinstance(block.get("params"), Mapping) else {}
    if name == "adam" and params.get("adam_w_mode", True) is not False:
        name = "adamw"  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
    params = {k: v for k, v in params.items() if k != "adam_w_mode"}
    if name is None:
        return (f"optimizer: {{name: one of {', '.join(OPTIMIZERS.names())}, lr: ...}} (DeepSpeed type "
                f"{block.get('type')!r} has no ds_ext equivalent)")
    fields = OPTIMIZERS.get(name).options.model_fields
    kept = {k: v for k, v in params.items() if k in fields}
    dropped = sorted(k for k in params if k not in fields)
    text = "optimizer: {" + ", ".join([f"name: {name}"] + [f"{k}: {v}" for k, v in kept.items()]) + "}"
    return text + (f" (no ds_ext equivalent for {', '.join(dropped)})" if dropped else "")


def _scheduler_advice(block: Any) -> str:
    """The recipe's schedule (and peak lr) equivalent to a DeepSpeed scheduler block, where one exists."""
    kinds = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}
    kind = kinds.get(str(block.get("type", "")).lower()) if isinstance(block, Mapping) else None
    if kind is None:
        return "schedule: {name: constant|cosine|step|linear, warmup_steps: ..., min_lr: ...}"
    params = block.get("params") if isinstance(block.get("params"), Mapping) else {}
    parts = [f"name: {kind}"]
    if "warmup_num_steps" in params:
        parts.append(f"warmup_steps: {params['warmup_num_steps']}")
    if "warmup_min_lr" in params:
        parts.append(f"min_lr: {params['warmup_min_lr']}")
    text = "schedule: {" + ", ".join(parts) + "}"
    if "warmup_max_lr" in params:
        text += f" and optimizer.lr: {params['warmup_max_lr']}"
    if kind != "constant":
        text += " (the decay then runs to the end of train.epochs)"
    if kind != "cosine" and params.get("warmup_type", "log") == "log":
        text += "; ds_ext's warm-up is linear, DeepSpeed's default is log-shaped"
    return text


def _overridden(key: str, applied: Mapping[str, str]) -> bool:
    """Whether ``--set`` set ``key`` or a block above it (a ``--set`` value wins over the file)."""
    return any(key == k or key.startswith(k + ".") for k in applied)


def _merge_ds(into: dict, extra: Mapping, where: str, path: str, problems: list,
              applied: Mapping[str, str] = {}) -> None:
    """``extra`` (the file's keys) merged into ``into`` (the recipe's deepspeed section); a key set to
    different values in both is a problem naming both, unless ``--set`` set it (then the recipe's value wins)."""
    for k, v in extra.items():
        key = f"{path}.{k}"
        if k not in into:
            into[k] = v
        elif _overridden(key, applied):
            continue
        elif isinstance(into[k], Mapping) and isinstance(v, Mapping):
            into[k] = dict(into[k])
            _merge_ds(into[k], v, where, key, problems, applied)
        elif into[k] != v:
            problems.append((key, f"{_short(into[k])} in the recipe, {_short(v)} in {where}: set it in one place"))


def _has_auto(value) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if v == "auto":
            return True
        if isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _method_blocks(v):
    """A method section with bare names spelled out (``{reducer: x}`` is ``{reducer: {name: x}}``)."""
    return {b: ({"name": x} if isinstance(x, str) else x) for b, x in v.items()} if isinstance(v, Mapping) else v


def ds_config_problems(raw: dict, source: str, applied: Optional[Mapping[str, str]] = None) -> List[Tuple[str, str]]:
    """Merge the DeepSpeed config named by ``raw["deepspeed_config"]`` into ``raw`` (in place) and return every
    conflict, each naming the key and why: its ``ds_ext`` block becomes the ``method`` section (not both);
    its batch keys must equal the recipe's (or be ``"auto"``: the recipe drives ds_ext's data loaders and
    DeepSpeed's batch arithmetic alike); ``optimizer`` and ``scheduler`` blocks are refused with the
    equivalent recipe lines (ds_ext's LR schedule, QSR and the checkpoint fingerprint read the recipe's
    optimizer and schedule sections); other ``"auto"`` values (Hugging Face placeholders) are refused;
    every other key joins the ``deepspeed`` section, where setting it differently in both is a conflict.
    A value given with ``--set`` (``applied``) wins over the file's instead of conflicting."""
    applied = applied or {}
    ref = raw.get("deepspeed_config")
    if ref is None:
        return []
    if not isinstance(ref, str) or not ref.strip():
        return [("deepspeed_config", f"must be the path of a DeepSpeed JSON config (got {_short(ref)})")]
    path = _ds_config_path(ref, source)
    try:
        text = path.read_bytes().decode("utf-8")  # JSON is UTF-8 (RFC 8259), whatever the locale says
    except UnicodeDecodeError as e:
        return [("deepspeed_config", f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a JSON file "
                                     f"must be UTF-8")]
    except OSError as e:
        return [("deepspeed_config", f"{path}: cannot be read ({e.strerror or e})")]
    import json

    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        return [("deepspeed_config", f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})")]
    except (RecursionError, ValueError) as e:  # nested beyond the parser's depth; an out-of-range number
        return [("deepspeed_config", f"{path}: not usable JSON ({type(e).__name__})")]
    if not isinstance(cfg, dict):
        return [("deepspeed_config", f"{path}: a DeepSpeed config is a JSON object (got {type(cfg).__name__})")]
    where = str(path)
    problems: List[Tuple[str, str]] = []
    train = raw.get("train") if isinstance(raw.get("train"), Mapping) else {}
    rest = {}
    for k, v in cfg.items():
        if k == "ds_ext":
            if "method" in raw and any(a == "method" or a.startswith("method.") for a in applied):
                continue  # --set chose (part of) the method: the recipe's, as given, wins
            if "method" in raw and _method_blocks(raw["method"]) != _method_blocks(v):
                problems.append(("method", f"{where} has a ds_ext block and the recipe a method section: both "
                                           "choose the method; keep one"))
            else:  # the same schema as a recipe's method section; a bare name is {name: ...} (method_section)
                raw["method"] = _method_blocks(v)
        elif k in _DS_BATCH_KEYS:
            own = _DS_BATCH_KEYS[k]
            mine = train.get(own.split(".")[1])
            if v != "auto" and mine is not None and v != mine and not _overridden(own, applied):
                problems.append((own, f"{mine} in the recipe, {k} {_short(v)} in {where}: the recipe's batch settings "
                                      f"drive ds_ext's data loaders and DeepSpeed's; make them agree, or set "
                                      f"\"auto\" in the file"))
        elif k == "gradient_accumulation_steps":
            if v != "auto":
                problems.append(("deepspeed_config", f"{where}: gradient_accumulation_steps follows from "
                                                     "train.global_batch_size / (world size x train.micro_batch_size); "
                                                     "set it to \"auto\" or remove it"))
        elif k == "optimizer":
            problems.append(("deepspeed_config", f"{where}: optimizer: ds_ext builds the optimizer from the recipe "
                                                 f"(its LR schedule, QSR and the checkpoint check read it); remove the "
                                                 f"block from the file and put in the recipe: {_optimizer_advice(v)}"))
        elif k == "scheduler":
            problems.append(("deepspeed_config", f"{where}: scheduler: ds_ext's LR schedule is the recipe's schedule "
                                                 f"section (QSR reads it ahead of time); remove the block from the file "
                                                 f"and put in the recipe: {_scheduler_advice(v)}"))
        elif _has_auto(v):
            problems.append((f"deepspeed.{k}", f"\"auto\" in {where} is a Hugging Face Trainer placeholder; the "
                                               "ds_ext trainer needs a value"))
        else:
            rest[k] = v
    ds = raw.get("deepspeed")
    merged = dict(ds) if isinstance(ds, Mapping) else {}
    if ds is not None and not isinstance(ds, Mapping):
        return problems  # the schema reports the recipe's own deepspeed section
    try:
        _merge_ds(merged, rest, where, "deepspeed", problems, applied)
    except RecursionError:
        return problems + [("deepspeed_config", f"{where}: nested too deeply to merge with the deepspeed section")]
    raw["deepspeed"] = merged
    return problems
