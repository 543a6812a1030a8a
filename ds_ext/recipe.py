"""Typed recipe schema: YAML file + ``--set a.b=value`` overrides + a per-host paths file.

A recipe has the sections ``model``, ``data``, ``optimizer``, ``schedule``, ``train``, ``method``
(``reducer`` / ``sync`` / ``order`` blocks), ``deepspeed`` (passed through to DeepSpeed), ``log`` and
``checkpoint``; the README documents every key. Machine-specific paths (``data_root``, ``log_root``)
live in a per-host file ``.config_<hostname>.yml`` (as the QSR seed's ``--config-pth``), so one recipe
runs on any cluster.

Every problem is reported before training as ``RecipeError`` naming the file, the dotted key and
what is allowed; ``python -m ds_ext.train --recipe R --check`` prints them and exits 2.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .registry import (DATASETS, MODELS, OPTIMIZERS, ORDERS, REDUCERS, SYNCS, Options, Registry,
                       UnknownName, load_builtin)


class RecipeError(ValueError):
    """A recipe problem: ``problems`` is a list of (dotted key, message)."""

    def __init__(self, source: str, problems: Sequence[Tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{source}: {key}: {msg}" if key else f"{source}: {msg}" for key, msg in self.problems]
        super().__init__("\n".join(lines))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NamedBlock(BaseModel):
    """``{name: <registry name>, <option>: <value>, ...}``; options are validated by the registry
    entry's own ``Options`` model after the schema pass (see ``_validate_named``)."""

    model_config = ConfigDict(extra="allow")
    name: str
    _options: Optional[Options] = PrivateAttr(default=None)

    @property
    def params(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def options(self) -> Options:
        assert self._options is not None, "recipe not validated"
        return self._options


class ModelSection(NamedBlock):
    pass


class DataSection(NamedBlock):
    root: Optional[str] = Field(None, description="data directory; default: data_root of the per-host file")
    num_workers: int = Field(0, ge=0)
    eval_micro_batch_size: Optional[int] = Field(None, ge=1)


class OptimizerSection(NamedBlock):
    pass


class ScheduleSection(Section):
    """Learning-rate schedule as in the QSR seed (``xscheduler.py``): linear warm-up from ``min_lr``
    to the optimizer's peak ``lr``, then cosine / step / linear decay (or constant)."""

    name: Literal["constant", "cosine", "step", "linear"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_steps: Optional[int] = Field(None, ge=0, description="overrides warmup_epochs")
    min_lr: float = Field(0.0, ge=0)
    decay_points: List[float] = Field(default_factory=list, description="epochs (step schedule)")
    gamma: float = Field(0.1, gt=0)
    epochs_for_schedule: Optional[float] = Field(None, gt=0, description="schedule length; default train.epochs")

    @field_validator("decay_points")
    @classmethod
    def _sorted(cls, v):
        if list(v) != sorted(v):
            raise ValueError("decay_points must be increasing")
        return v


class TrainSection(Section):
    epochs: int = Field(..., ge=1)
    global_batch_size: int = Field(..., ge=1)
    micro_batch_size: int = Field(..., ge=1)
    seed: int = 0
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap on optimizer steps per epoch")
    stop_at_step: Optional[int] = Field(None, ge=1, description=(
        "end this invocation (after a checkpoint) once this global step is reached; the schedule still "
        "spans train.epochs (time-limited cluster jobs)"))
    eval_every_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    collective_timeout_s: float = Field(600.0, gt=0)
    check_consistency_every: int = Field(0, ge=0, description="steps between cross-rank parameter checks (0: off)")


class MethodSection(Section):
    reducer: NamedBlock = Field(default_factory=lambda: NamedBlock(name="allreduce"))
    sync: NamedBlock = Field(default_factory=lambda: NamedBlock(name="none"))
    order: NamedBlock = Field(default_factory=lambda: NamedBlock(name="rr"))


# DeepSpeed keys that the recipe owns elsewhere.
_OWNED_DS_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (world size x train.micro_batch_size)",
    "optimizer": "the optimizer section",
    "scheduler": "the schedule section",
}


class WandbSection(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "ds_ext"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = Field(default_factory=list)


class LogSection(Section):
    dir: Optional[str] = Field(None, description="run directory; relative paths are under the host log_root")
    every_steps: int = Field(10, ge=1)
    progress: bool = True
    wandb: WandbSection = Field(default_factory=WandbSection)


class CheckpointSection(Section):
    dir: Optional[str] = Field(None, description="default: <log.dir>/checkpoints")
    every_steps: int = Field(0, ge=0)
    every_epochs: int = Field(0, ge=0)
    keep: int = Field(2, ge=1, description="number of most recent checkpoints kept")
    resume: Union[bool, str] = Field(False, description="false | true/'auto' (latest in dir, if any) | a path")


class Recipe(Section):
    name: Optional[str] = None
    description: Optional[str] = None
    model: ModelSection
    data: DataSection
    optimizer: OptimizerSection
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection
    method: MethodSection = Field(default_factory=MethodSection)
    deepspeed: Dict[str, Any] = Field(default_factory=dict)
    log: LogSection = Field(default_factory=LogSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)

    _source: str = PrivateAttr(default="<recipe>")
    _host_file: Optional[str] = PrivateAttr(default=None)

    @field_validator("deepspeed")
    @classmethod
    def _no_owned_keys(cls, v):
        for key, owner in _OWNED_DS_KEYS.items():
            if key in v:
                raise ValueError(f"deepspeed.{key} is set by {owner}; remove it from the deepspeed section")
        return v

    # ---- derived values -------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self._source

    def zero_stage(self) -> int:
        return int((self.deepspeed.get("zero_optimization") or {}).get("stage", 0))

    def precision(self) -> str:
        for key in ("bf16", "fp16"):
            if (self.deepspeed.get(key) or {}).get("enabled", False):
                return key
        return "fp32"

    def batch_plan(self, world_size: int) -> Tuple[int, int]:
        """(micro batch per rank, gradient accumulation steps) for this world size; the QSR seed's
        ``--physical-batch-size`` rule: global = world x micro x accumulation."""
        t = self.train
        if world_size < 1 or t.global_batch_size % (world_size * t.micro_batch_size):
            raise RecipeError(self._source, [(
                "train.global_batch_size",
                f"{t.global_batch_size} is not divisible by world size x micro batch = "
                f"{world_size} x {t.micro_batch_size} = {world_size * t.micro_batch_size}; "
                f"allowed: multiples of {world_size * t.micro_batch_size}")])
        return t.micro_batch_size, t.global_batch_size // (world_size * t.micro_batch_size)

    def method_names(self) -> Dict[str, str]:
        return {k: getattr(self.method, k).name for k in ("reducer", "sync", "order")}


class HostConfig(Section):
    """Per-host paths (``.config_<hostname>.yml``)."""

    data_root: Optional[str] = None
    log_root: str = "runs"


# ---- errors from pydantic, with the allowed values spelled out ---------------------------------

def _field_model(cls: Type[BaseModel], loc: Sequence) -> Optional[Type[BaseModel]]:
    """The model class that owns the last element of ``loc`` (for listing allowed keys)."""
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def _convert(err: ValidationError, root: Type[BaseModel], prefix: Tuple = ()) -> List[Tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in prefix + loc)
        if e["type"] == "extra_forbidden":
            owner = _field_model(root, loc[:-1])
            allowed = sorted(owner.model_fields) if owner else []
            if owner is not None and issubclass(owner, NamedBlock):
                allowed = ["name"]  # options are checked per registry entry
            msg = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("value_error",):
                msg += f" (got {e['input']!r})"
        out.append((key, msg))
    return out


_NAMED = {
    ("model",): MODELS,
    ("data",): DATASETS,
    ("optimizer",): OPTIMIZERS,
    ("method", "reducer"): REDUCERS,
    ("method", "sync"): SYNCS,
    ("method", "order"): ORDERS,
}


def _validate_named(recipe: Recipe) -> List[Tuple[str, str]]:
    problems = []
    for path, registry in _NAMED.items():
        block = recipe
        for p in path:
            block = getattr(block, p)
        key = ".".join(path)
        try:
            entry = registry.get(block.name)
        except UnknownName as e:
            problems.append((f"{key}.name", str(e)))
            continue
        params = block.params
        try:
            block._options = entry.options(**params)
        except ValidationError as e:
            for k, msg in _convert(e, entry.options, prefix=path):
                if msg.startswith("unknown key"):
                    allowed = sorted(entry.options.model_fields)
                    msg = (f"unknown option for {registry.kind} {block.name!r}; allowed: {', '.join(allowed) or '(none)'}"
                           f" (to switch {key} on the command line, replace the whole block: "
                           f"--set '{key}={{name: {block.name}}}')")
                problems.append((k, msg))
    return problems


def check_combination(recipe: Recipe) -> List[Tuple[str, str]]:
    """Refuse method combinations that cannot work together (before launch)."""
    problems = []
    names = recipe.method_names()
    stage = recipe.zero_stage()
    for kind, registry in (("reducer", REDUCERS), ("sync", SYNCS), ("order", ORDERS)):
        name = names[kind]
        if name not in registry:
            continue
        factory = registry.get(name).factory
        check = getattr(factory, "check_recipe", None)
        if check is not None:
            problems += [(f"method.{kind}", msg) for msg in check(recipe)]
    if names["reducer"] != "deepspeed" and stage != 0:
        from .reducers.base import zero_stage_problem

        problems.append(("deepspeed.zero_optimization.stage", zero_stage_problem(names["reducer"], stage)))
    return problems


# ---- loading ------------------------------------------------------------------------------------

def parse_overrides(overrides: Sequence[str]) -> List[Tuple[List[str], Any, str]]:
    out = []
    for item in overrides or ():
        if "=" not in item:
            raise RecipeError("--set", [(item, "expected key=value, e.g. --set train.epochs=3")])
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise RecipeError("--set", [(key, "empty key component")])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise RecipeError("--set", [(key, f"value {raw!r} is not valid YAML: {e}")]) from None
        out.append((parts, value, item))
    return out


def apply_overrides(raw: dict, overrides: Sequence[str]) -> Dict[str, str]:
    """Apply ``a.b=value`` overrides to the raw dict in place; returns {dotted key: original text}."""
    applied = {}
    for parts, value, text in parse_overrides(overrides):
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError("--set", [(".".join(parts), f"{'.'.join(parts[:i + 1])} is not a section")])
            node = nxt
        node[parts[-1]] = value
        applied[".".join(parts)] = text
    return applied


def find_host_config(explicit: Optional[str] = None) -> Optional[Path]:
    """--host-config > $DS_EXT_HOST_CONFIG > ./.config_<hostname>.yml > <repo>/.config_<hostname>.yml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DS_EXT_HOST_CONFIG")
    if env:
        return Path(env)
    name = f".config_{socket.gethostname()}.yml"
    for d in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (d / name).is_file():
            return d / name
    return None


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RecipeError(str(path), [("", f"{what} file not found")])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [("", f"not valid YAML: {e}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [("", f"top level must be a mapping, got {type(data).__name__}")])
    return data


def load_host_config(path: Optional[Path]) -> HostConfig:
    if path is None:
        return HostConfig()
    raw = _read_yaml(path, "per-host config")
    try:
        return HostConfig(**raw)
    except ValidationError as e:
        raise RecipeError(str(path), _convert(e, HostConfig)) from None


def recipe_from_dict(raw: dict, source: str = "<dict>", host: Optional[HostConfig] = None,
                     applied: Optional[Dict[str, str]] = None, host_file: Optional[str] = None) -> Recipe:
    load_builtin()
    applied = applied or {}
    try:
        recipe = Recipe(**raw)
    except ValidationError as e:
        raise RecipeError(source, _mark_overrides(_convert(e, Recipe), applied)) from None
    recipe._source = source
    recipe._host_file = host_file
    problems = _validate_named(recipe)
    if not problems:
        problems = check_combination(recipe)
    if problems:
        raise RecipeError(source, _mark_overrides(problems, applied))
    _resolve_paths(recipe, host or HostConfig(), source)
    return recipe


def _mark_overrides(problems, applied):
    out = []
    for key, msg in problems:
        for okey, text in applied.items():
            if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
                msg += f" [from --set {text}]"
                break
        out.append((key, msg))
    return out


def _resolve_paths(recipe: Recipe, host: HostConfig, source: str) -> None:
    stem = recipe.name or (Path(source).stem if source and not source.startswith("<") else "run")
    if recipe.data.root is None and host.data_root is not None:
        recipe.data.root = host.data_root
    log_dir = Path(recipe.log.dir or stem)
    if not log_dir.is_absolute():
        log_dir = Path(host.log_root) / log_dir
    log_dir = log_dir.absolute()
    recipe.log.dir = str(log_dir)
    ck = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else log_dir / "checkpoints"
    if not ck.is_absolute():
        ck = Path(host.log_root) / ck
    recipe.checkpoint.dir = str(ck.absolute())


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = (), host_config: Optional[str] = None) -> Recipe:
    """Read a recipe YAML, apply ``--set`` overrides and the per-host file, validate everything."""
    path = Path(path)
    raw = _read_yaml(path, "recipe")
    applied = apply_overrides(raw, overrides)
    host_path = find_host_config(host_config)
    host = load_host_config(host_path)
    return recipe_from_dict(raw, str(path), host, applied, str(host_path) if host_path else None)
