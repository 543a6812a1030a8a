"""Typed recipe schema: YAML file + ``--set a.b=value`` overrides + a per-host paths file.

A recipe has the sections ``model``, ``data``, ``optimizer``, ``schedule``, ``train``, ``method``
(``reducer`` / ``sync`` / ``order`` blocks), ``deepspeed`` (passed through to DeepSpeed), ``log`` and
``checkpoint``; the README documents every key. Machine-specific paths (``data_root``, ``log_root``)
live in a per-host file ``.config_<hostname>.yml`` (as the QSR seed's ``--config-pth``), so one recipe
runs on any cluster.

Every problem is reported before training as ``RecipeError`` naming the file, the dotted key and
what is allowed; ``python -m ds_ext.train --recipe R --check`` prints them and exits 2. Loading checks
what needs no world size and no file system; ``Recipe.check_world`` adds the world-size rules (batch
split, and what the methods' own ``check(view)`` finds once the world size is known: dssync groups,
exdyna blocks) and ``preflight`` the environment (``DS_EXT_OPS``), the paths and data files, both run by
the trainer before ``init_distributed`` (the world size from ``--world-size`` or the launcher's ``$WORLD_SIZE``).
Every YAML text read (recipe, ``--set`` value, per-host file) is measured before use: one that expands to
more than ``YAML_MAX_VALUES`` values through aliases (a "billion laughs") is refused unexpanded.
Deliberate limits: in the ``deepspeed`` section only the keys ds_ext reads are type-checked (DeepSpeed
validates the rest when the engine is built); the data-file check knows the built-in readers' first files
only and lets the reader itself produce the message.
"""
from __future__ import annotations

import math
import os
import reprlib
import socket
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator)

from ..registry import (
    DATASETS, MODELS, OPTIMIZERS, ORDERS, REDUCERS, SYNCS, Options, Registry, UnknownName, load_builtin,
    precision_of, zero_stage_of)


class RecipeError(ValueError):
    """A recipe problem: ``problems`` is a list of (dotted key, message)."""

    def __init__(self, source: str, problems: Sequence[Tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{source}: {key}: {msg}" if key else f"{source}: {msg}" for key, msg in self.problems]
        super().__init__("\n".join(lines))


class DataPathError(RecipeError):
    """A file or directory the run needs is missing (found before the process group starts). The
    trainer prints it as ``data error:`` and exits 3, as it does for a data error found later."""


def _numeric_annotation(ann) -> bool:
    """True for ``int``, ``float`` and their ``Optional`` forms (not for unions that admit ``bool``)."""
    args = typing.get_args(ann) if typing.get_origin(ann) in (Union, types.UnionType) else (ann,)
    args = [a for a in args if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


_BOOL_FOR_NUMBER = "expected a number, got a boolean"


class Section(BaseModel):
    """A recipe section: unknown keys are refused; so is ``true``/``false`` for a numeric key (pydantic's
    lax mode would read it as 1/0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(v, bool) and field is not None and _numeric_annotation(field.annotation):
            raise ValueError(f"{_BOOL_FOR_NUMBER} ({v!r})")
        return v


class NamedBlock(BaseModel):
    """``{name: <registry name>, <option>: <value>, ...}``; options are validated by the registry
    entry's own ``Options`` model after the schema pass (see ``_validate_named``)."""

    model_config = ConfigDict(extra="allow")
    name: str
    _options: Optional[Options] = PrivateAttr(default=None)

    _no_bool_for_number = field_validator("*", mode="before")(Section._no_bool_for_number.__func__)

    @property
    def params(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def options(self) -> Options:
        assert self._options is not None, "recipe not validated"
        return self._options

    @property
    def checked(self) -> Optional[Options]:
        """The validated options, or None when they did not validate (or the recipe was not checked)."""
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


# Bounds checked when the recipe is read (``--check`` refuses them). The trainer derives 64-bit seeds from
# train.seed (loader seeds about seed x 4.1e9; a larger seed overflowed in torch.manual_seed), and
# init_distributed turns the timeout into a datetime.timedelta (1e300 s was an OverflowError there); a
# collective that waits longer than 7 days is a hang, not a slow peer.
SEED_MAX = 2**31 - 1
COLLECTIVE_TIMEOUT_MAX_S = 7 * 24 * 3600  # 604800 s, 7 days


class TrainSection(Section):
    epochs: int = Field(..., ge=1)
    global_batch_size: int = Field(..., ge=1)
    micro_batch_size: int = Field(..., ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX, description=(
        "seeds model initialisation, the example order and the data loaders; 0 <= seed <= 2**31 - 1 (the "
        "loader seeds derived from it must stay within 64 bits)"))
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap on optimizer steps per epoch")
    stop_at_step: Optional[int] = Field(None, ge=1, description=(
        "end this invocation (after a checkpoint) once this global step is reached; the schedule still "
        "spans train.epochs (time-limited cluster jobs)"))
    eval_every_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    collective_timeout_s: float = Field(600.0, gt=0, le=COLLECTIVE_TIMEOUT_MAX_S, allow_inf_nan=False, description=(
        "seconds a collective may wait for the other ranks before it fails; at most 604800 (7 days)"))
    check_consistency_every: int = Field(0, ge=0, description="steps between cross-rank parameter checks (0: off)")
    nonfinite: Literal["skip", "raise", "off"] = Field(
        "skip", description="a NaN/inf in any rank's gradient: 'skip' the update on every rank (zeroed before any "
                            "reducer or error-feedback buffer sees it; logged), 'raise' stop, 'off' no check "
                            "(see ds_ext.deepspeed.attach.attach)")
    max_consecutive_skips: int = Field(20, ge=0, description=(
        "stop the run (exit 8) after this many optimizer steps in a row were skipped for non-finite gradients "
        "(train.nonfinite: skip); 0 = no limit"))


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
    integrity: Literal["hash", "size", "off"] = Field("hash", description=(
        "what a save records and a load verifies: 'hash' the SHA-256 and size of every file, 'size' the sizes "
        "only, 'off' nothing verified (YAML reads a bare off as false, which means 'off' here too)"))
    on_signal: Literal["save", "exit"] = Field("save", description=(
        "on SIGTERM, SIGUSR1 or SIGINT: 'save' finish the step, save a checkpoint and exit 75; 'exit' exit at once "
        "with 143, 138 or 130"))

    @field_validator("integrity", mode="before")
    @classmethod
    def _off_is_false_in_yaml(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads an unquoted off (no, false) as false


class Recipe(Section):
    name: Optional[str] = None
    description: Optional[str] = None
    model: ModelSection
    data: DataSection
    optimizer: OptimizerSection
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection
    method: MethodSection = Field(default_factory=MethodSection)
    deepspeed_config: Optional[str] = Field(None, description=(
        "an existing DeepSpeed JSON config merged into the deepspeed section (its ds_ext block becomes the "
        "method section); conflicting keys are named (see ds_config_problems)"))
    deepspeed: Dict[str, Any] = Field(default_factory=dict)
    log: LogSection = Field(default_factory=LogSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)

    _source: str = PrivateAttr(default="<recipe>")
    _host_file: Optional[str] = PrivateAttr(default=None)
    # where a path setting came from when the recipe left it out (the per-host file), for error messages
    _origin: Dict[str, str] = PrivateAttr(default_factory=dict)

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
        return zero_stage_of(self.deepspeed)

    def precision(self) -> str:
        return precision_of(self.deepspeed)

    def _batch_problem(self, world_size: int) -> Optional[Tuple[str, str]]:
        t = self.train
        if world_size < 1:
            return ("train.global_batch_size", f"world size must be a positive integer (got {world_size})")
        if t.global_batch_size % (world_size * t.micro_batch_size):
            return ("train.global_batch_size",
                    f"{t.global_batch_size} is not divisible by world size x micro batch = "
                    f"{world_size} x {t.micro_batch_size} = {world_size * t.micro_batch_size}; "
                    f"allowed: multiples of {world_size * t.micro_batch_size}")
        return None

    def batch_plan(self, world_size: int) -> Tuple[int, int]:
        """(micro batch per rank, gradient accumulation steps) for this world size; the QSR seed's
        ``--physical-batch-size`` rule: global = world x micro x accumulation."""
        problem = self._batch_problem(world_size)
        if problem:
            raise RecipeError(self._source, [problem])
        t = self.train
        return t.micro_batch_size, t.global_batch_size // (world_size * t.micro_batch_size)

    def method_view(self, world_size: Optional[int] = None):
        """The ``MethodView`` the methods' ``check`` classmethods read (names, validated options, the
        deepspeed section, the world size if known)."""
        from ..registry import MethodView

        kinds = ("reducer", "sync", "order")
        return MethodView(names=self.method_names(), options={k: getattr(self.method, k)._options for k in kinds},
                          deepspeed=self.deepspeed, world=world_size)

    def world_problems(self, world_size: int) -> List[Tuple[str, str]]:
        """Every problem that depends on the world size: the batch arithmetic and the problems the methods'
        ``check`` finds only once the world size is known. Meant to run before the process group starts."""
        problem = self._batch_problem(world_size)
        problems = [problem] if problem else []
        if world_size < 1:
            return problems
        without = method_problems(self, None)
        return problems + [p for p in method_problems(self, world_size) if p not in without]

    def check_world(self, world_size: int) -> Tuple[int, int]:
        """``batch_plan`` after all world-size rules passed; raises ``RecipeError`` listing every problem."""
        problems = self.world_problems(world_size)
        if problems:
            raise RecipeError(self._source, problems)
        return self.batch_plan(world_size)

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


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of an offending value, depth- and length-limited (a fuzzed value can be huge or nested
    thousands deep, where plain ``repr`` raises RecursionError)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
                msg += f" (got {_short(e['input'])})"
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
    return _validate_blocks(recipe, _NAMED)


def _validate_blocks(root: BaseModel, named: Mapping[Tuple[str, ...], Registry], prefix: Tuple[str, ...] = (),
                     set_hint: bool = True) -> List[Tuple[str, str]]:
    """Each named block's options against its registry entry's ``Options`` (keys reported under ``prefix``;
    ``set_hint``: the message shows how to replace the block with ``--set``, which only a recipe has)."""
    problems = []
    for path, registry in named.items():
        block = root
        for p in path:
            block = getattr(block, p)
        path = prefix + path
        key = ".".join(path)
        try:
            entry = registry.get(block.name)
        except UnknownName as e:
            problems.append((f"{key}.name", str(e)))
            continue
        params = block.params
        bools = [(f"{key}.{k}", f"{_BOOL_FOR_NUMBER} ({v!r})") for k, v in params.items()
                 if isinstance(v, bool) and entry.options.field_of(k) is not None
                 and _numeric_annotation(entry.options.model_fields[entry.options.field_of(k)].annotation)]
        if bools:  # pydantic's lax mode would read true/false as 1/0
            problems += bools
            continue
        try:
            block._options = entry.options.model_validate(params)
        except ValidationError as e:
            for k, msg in _convert(e, entry.options, prefix=path):
                if msg.startswith("unknown key"):
                    allowed = sorted(entry.options.model_fields)
                    msg = f"unknown option for {registry.kind} {block.name!r}; allowed: {', '.join(allowed) or '(none)'}"
                    if set_hint:
                        msg += (f" (to switch {key} on the command line, replace the whole block: "
                                f"--set '{key}={{name: {block.name}}}')")
                problems.append((k, msg))
    return problems


_METHOD_BLOCKS = {("reducer",): REDUCERS, ("sync",): SYNCS, ("order",): ORDERS}


def method_section(block: Any, source: str = "ds_config", prefix: str = "ds_ext") -> MethodSection:
    """A method specification outside a recipe (the ``ds_ext`` block of a DeepSpeed config, or the ``method``
    argument of ``ds_ext.attach``), validated with the recipe's schema and messages: the same ``reducer`` /
    ``sync`` / ``order`` blocks as a recipe's ``method`` section, each ``{name: ..., <option>: ...}`` or a
    bare name. Raises ``RecipeError`` (a ``ValueError``) naming ``prefix.<key>`` and what is allowed."""
    load_builtin()
    if not isinstance(block, Mapping):
        raise RecipeError(source, [(prefix, "must be a mapping with the keys reducer, sync, order "
                                            f"(got {_short(block)})")])
    raw = {k: ({"name": v} if isinstance(v, str) else v) for k, v in block.items()}
    try:
        section = MethodSection.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(source, _convert(e, MethodSection, prefix=(prefix,))) from None
    problems = _validate_blocks(section, _METHOD_BLOCKS, (prefix,), set_hint=False)
    if problems:
        raise RecipeError(source, problems)
    return section


_DS_EXAMPLES = {"zero_optimization": "{stage: 0}", "bf16": "{enabled: true}", "fp16": "{enabled: true}",
                "torch_autocast": "{enabled: true, dtype: bfloat16}"}


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _deepspeed_problems(ds: Mapping) -> List[Tuple[str, str]]:
    """Types of the DeepSpeed keys that ds_ext reads itself before the engine exists
    (``zero_optimization.stage``, ``bf16``/``fp16``/``torch_autocast`` ``enabled``, ``fp16.loss_scale``,
    ``gradient_clipping``). Every other key of the section is DeepSpeed's to validate, which happens when
    the engine is built (after the process group started)."""
    problems = []
    for key, example in _DS_EXAMPLES.items():
        if key in ds and not isinstance(ds[key], Mapping):
            problems.append((f"deepspeed.{key}", f"must be a mapping such as {example} (got {_short(ds[key])})"))
    zero = ds.get("zero_optimization")
    if isinstance(zero, Mapping) and "stage" in zero:
        st = zero["stage"]
        if not (isinstance(st, int) and not isinstance(st, bool) and 0 <= st <= 3):
            problems.append(("deepspeed.zero_optimization.stage", f"allowed: 0, 1, 2, 3 (got {_short(st)})"))
    for key in ("bf16", "fp16", "torch_autocast"):
        block = ds.get(key)
        if isinstance(block, Mapping) and "enabled" in block and not isinstance(block["enabled"], bool):
            problems.append((f"deepspeed.{key}.enabled", f"allowed: true, false (got {_short(block['enabled'])})"))
    fp16 = ds.get("fp16")
    if isinstance(fp16, Mapping) and "loss_scale" in fp16:
        ls = fp16["loss_scale"]
        if not (_finite_number(ls) and ls >= 0):
            problems.append(("deepspeed.fp16.loss_scale", f"allowed: a number >= 0 (0: dynamic loss scaling) "
                                                          f"(got {_short(ls)})"))
    if "gradient_clipping" in ds:
        gc = ds["gradient_clipping"]
        if not (_finite_number(gc) and gc >= 0):
            problems.append(("deepspeed.gradient_clipping", f"allowed: a number >= 0 (0: no clipping) "
                                                            f"(got {_short(gc)})"))
    enabled = [k for k in ("bf16", "fp16") if isinstance(ds.get(k), Mapping) and ds[k].get("enabled") is True]
    if len(enabled) == 2:
        problems.append(("deepspeed.fp16.enabled", "bf16 and fp16 are both enabled; enable one of them"))
    return problems


def _walk_non_finite(value, key: str, out: Dict[str, str]) -> None:
    stack = [(value, key)]  # iterative: an option typed as a bare list may hold a value nested thousands deep
    while stack:
        value, key = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            out.setdefault(key, f"must be a finite number (got {value!r})")
        elif isinstance(value, dict):
            stack += [(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(v, f"{key}.{i}") for i, v in enumerate(value)]


def _non_finite(recipe: Recipe) -> List[Tuple[str, str]]:
    """``.inf`` / ``.nan`` (or the strings "inf", "nan", which pydantic parses as floats) anywhere in the
    recipe outside the ``deepspeed`` section: no ds_ext setting has a meaning for them, and a bound such as
    ``lr > 0`` lets infinity through."""
    found: Dict[str, str] = {}
    _walk_non_finite(recipe.model_dump(exclude={"deepspeed"}), "", found)
    for path in _NAMED:
        block = recipe
        for part in path:
            block = getattr(block, part)
        if block._options is not None:
            _walk_non_finite(block._options.model_dump(), ".".join(path), found)
    return sorted(found.items())


def _cross_section(recipe: Recipe) -> List[Tuple[str, str]]:
    """Rules between sections: the schedule's floor must not exceed the optimizer's peak rate."""
    lr, floor = getattr(recipe.optimizer.options, "lr", None), recipe.schedule.min_lr
    if _finite_number(lr) and _finite_number(floor) and floor > lr:
        return [("schedule.min_lr", f"{recipe.schedule.min_lr:g} is above the peak optimizer.lr {lr:g}; the "
                                    f"schedule would raise the rate while it 'decays' (allowed: <= {lr:g})")]
    return []


def method_problems(recipe: Recipe, world_size: Optional[int]) -> List[Tuple[str, str]]:
    """What the three methods' ``check(view)`` classmethods say about this recipe (the same checks
    ``engine.attach`` runs on an engine)."""
    return recipe.method_view(world_size).problems()


def check_combination(recipe: Recipe) -> List[Tuple[str, str]]:
    """Refuse method combinations that cannot work together (before launch)."""
    return method_problems(recipe, None)


# ---- loading ------------------------------------------------------------------------------------

# A YAML document may reuse a node through an anchor (``&x``) and aliases (``*x``). PyYAML's safe_load
# shares one object for every alias, so nine levels of nine aliases load in microseconds, but anything that
# copies or serialises the recipe afterwards (validation, json.dumps for the checkpoint metadata, the
# wandb config) expands them: 9**9 values, a "billion laughs". ``_expansion_problem`` measures the
# document as the tree it expands to, without expanding it, and stops as soon as a limit is passed.
YAML_MAX_VALUES = 100_000  # scalars, keys and containers, counted as a tree; a real recipe has a few hundred
YAML_MAX_CHARS = 10_000_000  # characters of text (keys and strings), counted as a tree


def _expansion_problem(data: Any, top: str = "") -> Optional[Tuple[str, str]]:
    """(key, message) when ``data`` expands to more than ``YAML_MAX_VALUES`` values or ``YAML_MAX_CHARS``
    characters of text once aliases are followed, or contains itself (a cycle never ends); else None.
    ``key`` is the top-level key of ``data`` (a dict) under which the limit was passed, or ``top``.
    Iterative and bounded: at most ``YAML_MAX_VALUES + 1`` nodes are visited whatever the document."""
    values = chars = 0
    shared = False  # an object met twice: the document uses aliases
    seen: set = set()  # ids of the containers and strings visited
    path: set = set()  # ids of the containers on the way down to the current node
    stack: List[Tuple[Any, str, bool]] = [(data, top, False)]
    while stack:
        node, key, leaving = stack.pop()
        if leaving:
            path.discard(id(node))
            continue
        values += 1
        ident = id(node)
        if isinstance(node, (str, bytes)):
            chars += len(node)
            if len(node) > 1:  # Python shares some one-character strings by itself
                shared = shared or ident in seen
                seen.add(ident)
        if values > YAML_MAX_VALUES or chars > YAML_MAX_CHARS:
            what = f"{YAML_MAX_VALUES:,} values" if values > YAML_MAX_VALUES else f"{YAML_MAX_CHARS:,} characters"
            how = (" through YAML aliases (*name repeating an &name anchor); refused without expanding it" if shared
                   else "; a recipe needs far fewer")
            return key, f"expands to more than {what}{how}"
        if not isinstance(node, (dict, list, tuple, set, frozenset)):
            continue
        if ident in path:
            return key, "contains itself through a YAML alias (*name inside its own &name anchor), so it never ends"
        shared = shared or ident in seen
        seen.add(ident)
        path.add(ident)
        stack.append((node, key, True))
        if isinstance(node, dict):
            at_top = node is data and not top
            for k, v in node.items():
                sub = str(k) if at_top else key
                stack.append((k, sub, False))
                stack.append((v, sub, False))
        else:
            stack.extend((v, key, False) for v in node)
    return None


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
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:
            # ValueError: PyYAML's constructors raise it for e.g. 2024-13-45 (a date) or !!int abc
            raise RecipeError("--set", [(key, f"value {raw!r} is not valid YAML: {e or type(e).__name__}")]) from None
        problem = _expansion_problem(value, key.strip())
        if problem:
            raise RecipeError("--set", [(problem[0], f"value {problem[1]}")])
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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [("", f"{what} file is not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    except OSError as e:
        raise RecipeError(str(path), [("", f"cannot read the {what} file: {e.strerror or e}")]) from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # ValueError: PyYAML's constructors raise it for e.g. 2024-13-45 (read as a date) or !!int abc
        raise RecipeError(str(path), [("", f"not valid YAML: {e}")]) from None
    except RecursionError:
        raise RecipeError(str(path), [("", "not usable YAML: nested too deeply")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [("", f"top level must be a mapping, got {type(data).__name__}")])
    problem = _expansion_problem(data)
    if problem:
        raise RecipeError(str(path), [problem])
    return data


def load_host_config(path: Optional[Path]) -> HostConfig:
    if path is None:
        return HostConfig()
    raw = _read_yaml(path, "per-host config")
    try:
        return HostConfig.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(str(path), _convert(e, HostConfig)) from None


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
        text = path.read_text()
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


def recipe_from_dict(raw: dict, source: str = "<dict>", host: Optional[HostConfig] = None,
                     applied: Optional[Dict[str, str]] = None, host_file: Optional[str] = None) -> Recipe:
    load_builtin()
    applied = applied or {}
    raw = dict(raw)
    merge = ds_config_problems(raw, source, applied)
    if merge:
        raise RecipeError(source, _mark_overrides(merge, applied))
    try:
        recipe = Recipe.model_validate(raw)  # not Recipe(**raw): a YAML key may be an int or a date
    except ValidationError as e:
        raise RecipeError(source, _mark_overrides(_convert(e, Recipe), applied)) from None
    recipe._source = source
    recipe._host_file = host_file
    problems = _validate_named(recipe) + _deepspeed_problems(recipe.deepspeed)
    if not problems:
        problems = _non_finite(recipe) + _cross_section(recipe)
    if not problems:
        problems = check_combination(recipe)
    if problems:
        raise RecipeError(source, _mark_overrides(problems, applied))
    _resolve_paths(recipe, host or HostConfig(), source, host_file)
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


def _resolve_paths(recipe: Recipe, host: HostConfig, source: str, host_file: Optional[str] = None) -> None:
    stem = recipe.name or (Path(source).stem if source and not source.startswith("<") else "run")
    host_name = host_file or "the default per-host settings"
    if recipe.data.root is None and host.data_root is not None:
        recipe.data.root = host.data_root
        recipe._origin["data.root"] = f"data_root in {host_name}"
    log_dir = Path(recipe.log.dir or stem)
    if not log_dir.is_absolute():
        log_dir = Path(host.log_root) / log_dir
        recipe._origin["log.dir"] = recipe._origin["checkpoint.dir"] = f"log_root ({host.log_root}) in {host_name}"
    log_dir = log_dir.absolute()
    recipe.log.dir = str(log_dir)
    ck = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else log_dir / "checkpoints"
    if not ck.is_absolute():
        ck = Path(host.log_root) / ck
    recipe.checkpoint.dir = str(ck.absolute())


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = (), host_config: Optional[str] = None) -> Recipe:
    """Read a recipe YAML, apply ``--set`` overrides and the per-host file, validate everything. A bare
    name with no such file (``"quickstart"``) is a bundled recipe (``python -m ds_ext.trainer.recipes list``)."""
    path = Path(path)
    if not path.exists():
        from .recipes import bundled_path

        path = bundled_path(str(path)) or path
    raw = _read_yaml(path, "recipe")
    applied = apply_overrides(raw, overrides)
    host_path = find_host_config(host_config)
    host = load_host_config(host_path)
    return recipe_from_dict(raw, str(path), host, applied, str(host_path) if host_path else None)


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
    return problems


def _cifar_files(sub: str, names: Sequence[str]):
    return lambda o: [("data.root", f"{sub}/{n}") for n in names]


# The files each built-in reader opens first, relative to data.root unless absolute, with the recipe key
# that names them. Only a trigger: when one is missing, ``data_problems`` builds the data set, and the
# reader's own FileNotFoundError (path, layout, how to get the data) is what the user sees; when the
# reader finds its files after all, nothing is refused.
_DATA_FILES = {
    "cifar10": _cifar_files("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    "cifar100": _cifar_files("cifar-100-python", ["train", "test"]),
    "wikitext2": lambda o: [("data.root", "wikitext-2/wiki.train.tokens"),
                            ("data.root", f"wikitext-2/wiki.{o.val_split}.tokens")],
    "ml20m": lambda o: [("data.root", "ml-20m/ratings.csv")],
    "criteo": lambda o: [("data.file" if os.path.isabs(o.file) else "data.root", o.file)],
    "glue_embeddings": lambda o: [("data.root", f"glue-embeddings/{o.task}/{n}") for n in ("train.pt", "dev.pt")],
    "ffcv_imagenet": lambda o: [(f"data.{k}" if os.path.isabs(getattr(o, k)) else "data.root", getattr(o, k))
                                for k in ("train_file", "val_file")],
}


def data_problems(recipe: Recipe) -> List[Tuple[str, str]]:
    """Missing input files of a file-backed data set, found before the process group starts (see
    ``_DATA_FILES``); data sets without an entry check their own files when they are built."""
    d = recipe.data
    files = _DATA_FILES.get(d.name)
    if files is None or d._options is None:
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


def environment_problems(environ: Mapping[str, str]) -> List[Tuple[str, str]]:
    """Environment variables the run reads later, checked up front: ``DS_EXT_OPS`` (the kernel mode,
    otherwise a ValueError at the first training step)."""
    from .. import ops

    problem = ops.mode_problem(environ.get(ops.ENV))
    return [(ops.ENV, problem)] if problem else []


def preflight(recipe: Recipe, world_size: Optional[int], environ: Optional[Mapping[str, str]] = None) -> None:
    """What the trainer checks before ``init_distributed``: the environment (``environment_problems``,
    ``environ`` default ``os.environ``; a ``RecipeError`` from the source "environment"), the world-size
    rules (when the world size is known), the paths it writes and resumes from (``RecipeError``), then the
    data files (``DataPathError``). Every rank runs it on its own files, so a rank with a bad per-host file
    stops before any process group exists."""
    problems = environment_problems(os.environ if environ is None else environ)
    if problems:
        raise RecipeError("environment", problems)
    problems = recipe.world_problems(world_size) if world_size is not None else []
    problems += path_problems(recipe)
    if problems:
        raise RecipeError(recipe.source, problems)
    problems = data_problems(recipe)
    if problems:
        raise DataPathError(recipe.source, problems)
