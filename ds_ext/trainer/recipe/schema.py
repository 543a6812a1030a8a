"""The recipe schema: the sections of a recipe (``Recipe``), the per-host file (``HostConfig``) and the
rules that need no file system and no world size beyond the schema itself (option types per registry
entry, the DeepSpeed keys ds_ext reads, non-finite values, rules between sections, the methods' own
``check``). ``Recipe.world_problems`` adds the world-size rules.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

from pydantic import Field, PrivateAttr, field_validator

from ...registry import (
    DATASETS, MODELS, OPTIMIZERS, ORDERS, REDUCERS, SYNCS, precision_of, zero_stage_of)
from ...spec import MethodSection, NamedBlock, RecipeError, Section, _short, _validate_blocks


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
# The floor of 1 s: c10d counts whole milliseconds (1e-9 s became a 0 ms timeout that failed the first
# collective at start-up) and start-up waits at a collective for the slowest rank's imports and model build,
# which take seconds; below 1 s a timeout is an instant failure, not a bound on a stuck rank.
SEED_MAX = 2**31 - 1
COLLECTIVE_TIMEOUT_MIN_S = 1.0
COLLECTIVE_TIMEOUT_MAX_S = 7 * 24 * 3600  # 604800 s, 7 days
# The largest peak learning rate: far above any working rate of SGD / Adam / AdamW (published large-batch
# SGD rates stay below 50, Adam's below 1), so no real recipe is refused, and lr x gradient stays inside
# float32 (3.4e38) for gradients up to 1e32: a rate that passes --check can diverge (the non-finite guard
# then stops the run with exit 8) but not crash in torch's optimizer (1e300 overflowed converting to float).
LR_MAX = 1e6


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
    collective_timeout_s: float = Field(600.0, ge=COLLECTIVE_TIMEOUT_MIN_S, le=COLLECTIVE_TIMEOUT_MAX_S,
                                        allow_inf_nan=False, description=(
        "seconds a collective may wait for the other ranks before it fails; 1 to 604800 (7 days)"))
    check_consistency_every: int = Field(0, ge=0, description="steps between cross-rank parameter checks (0: off)")
    nonfinite: Literal["skip", "raise", "off"] = Field(
        "skip", description="a NaN/inf in any rank's gradient: 'skip' the update on every rank (zeroed before any "
                            "reducer or error-feedback buffer sees it; logged), 'raise' stop, 'off' no check "
                            "(see ds_ext.deepspeed.attach.attach)")
    max_consecutive_skips: int = Field(20, ge=0, description=(
        "stop the run (exit 8) after this many optimizer steps in a row were skipped for non-finite gradients "
        "(train.nonfinite: skip); 0 = no limit"))

    @field_validator("nonfinite", mode="before")
    @classmethod
    def _off_is_false_in_yaml(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads an unquoted off as false


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
    dir: Optional[str] = Field(None, description=(
        "run directory, used as given (a relative path is relative to the working directory); default "
        "<log_root>/<name>, log_root from the per-host file"))
    overwrite: bool = Field(False, description=(
        "let a run that starts afresh replace the records (summary.json, history.jsonl) of an earlier run in "
        "log.dir; false: such a run is refused before it starts (a run resuming a checkpoint continues them)"))
    every_steps: int = Field(10, ge=1)
    progress: bool = True
    wandb: WandbSection = Field(default_factory=WandbSection)


class CheckpointSection(Section):
    dir: Optional[str] = Field(None, description="used as given; default: <log.dir>/checkpoints")
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
        from ...registry import MethodView

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
    """Rules between sections: the optimizer's peak rate at most ``LR_MAX``; the schedule's floor must not
    exceed it."""
    lr, floor = getattr(recipe.optimizer.options, "lr", None), recipe.schedule.min_lr
    if _finite_number(lr) and lr > LR_MAX:
        return [("optimizer.lr", f"{lr:g} is outside the allowed range 0 < lr <= {LR_MAX:g} (a larger rate "
                                 f"overflows in the optimizer's float32 arithmetic)")]
    if _finite_number(lr) and _finite_number(floor) and floor > lr:
        return [("schedule.min_lr", f"{recipe.schedule.min_lr:g} is above the peak optimizer.lr {lr:g}; the "
                                    f"schedule would raise the rate while it 'decays' (allowed: <= {lr:g})")]
    return []


def method_problems(recipe: Recipe, world_size: Optional[int]) -> List[Tuple[str, str]]:
    """What the three methods' ``check(view)`` classmethods say about this recipe (the same checks
    ``engine.attach`` runs on an engine), and whether ``method.clip`` can run (``ds_ext/deepspeed/clipping.py``)."""
    from ...deepspeed.clipping import settings_problem

    clip = settings_problem(recipe.method.clip, recipe.method.reducer.name, recipe.deepspeed)
    return recipe.method_view(world_size).problems() + ([("method.clip", clip)] if clip else [])


def check_combination(recipe: Recipe) -> List[Tuple[str, str]]:
    """Refuse method combinations that cannot work together (before launch)."""
    return method_problems(recipe, None)
