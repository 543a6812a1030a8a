"""Name -> implementation registries for every pluggable family (models, data sets, optimizers,
reducers, synchronizers, data orders).

Each entry carries a pydantic ``Options`` model (``extra="forbid"``) so that a recipe block such as
``{name: allreduce, bucket_mb: 25}`` is validated against exactly the options that implementation
accepts. Adding a method is adding one module with one ``@REGISTRY.register(...)`` line.
"""
from __future__ import annotations

import importlib

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base class for per-implementation options: unknown keys are refused. One spelling per concept
    across methods (``rank``, ``error_feedback``, ``bucket_mb``); a method's older or reference spelling
    is accepted as an alias (``validation_alias=AliasChoices(...)``)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    @classmethod
    def field_of(cls, key: str) -> Optional[str]:
        """The field a recipe key sets (its own name or one of its aliases), or None."""
        if key in cls.model_fields:
            return key
        for name, f in cls.model_fields.items():
            choices = getattr(f.validation_alias, "choices", ()) or ()
            if key in choices:
                return name
        return None


class NoOptions(Options):
    pass


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    options: Type[Options]
    doc: str


def zero_stage_of(ds: Mapping) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when absent)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def precision_of(ds: Mapping) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what a DeepSpeed config enables."""
    for key in ("bf16", "fp16"):
        if (ds.get(key) or {}).get("enabled", False):
            return key
    return "fp32"


@dataclass
class MethodView:
    """What a method's ``check(view)`` may look at, built alike from a recipe (``Recipe.method_view``) and
    from an engine (``engine.attach``): the names of the three method blocks, their validated options
    (None where a block's options did not validate), the DeepSpeed settings, and the world size (None
    where it is not known yet: a recipe linted without ``--world-size``)."""

    names: Dict[str, str]
    options: Dict[str, Optional["Options"]] = field(default_factory=dict)
    deepspeed: Mapping = field(default_factory=dict)
    world: Optional[int] = None

    def zero_stage(self) -> int:
        return zero_stage_of(self.deepspeed)

    def precision(self) -> str:
        return precision_of(self.deepspeed)

    def problems(self) -> List[Tuple[str, str]]:
        """What the three methods' ``check(view)`` classmethods say (unknown names are skipped: the
        recipe reports those itself)."""
        out: List[Tuple[str, str]] = []
        for kind, registry in (("reducer", REDUCERS), ("sync", SYNCS), ("order", ORDERS)):
            name = self.names.get(kind)
            if name is not None and name in registry:
                out += registry.get(name).factory.check(self)
        return out


Problems = List[Tuple[str, str]]  # (recipe key, message)


class UnknownName(KeyError):
    def __init__(self, kind: str, name: str, allowed):
        self.kind, self.name, self.allowed = kind, name, sorted(allowed)
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(self.allowed)}")

    def __str__(self):  # KeyError quotes its message otherwise
        return self.args[0]


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, options: Optional[Type[Options]] = None):
        def deco(factory):
            if name in self._entries:
                if getattr(factory, "__module__", None) == "__main__":
                    # `python -m ds_ext.x.y` runs a second copy of a module the package import has
                    # already registered: keep the package's entry
                    return factory
                raise ValueError(f"{self.kind} {name!r} registered twice")
            opts = options or getattr(factory, "Options", None) or NoOptions
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, factory, opts, doc[0] if doc else "")
            return factory

        return deco

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(self.kind, name, self._entries) from None

    def names(self):
        return sorted(self._entries)

    def name_of(self, obj) -> Optional[str]:
        """The registered name of an instance's class (None if it is not registered here)."""
        for name, entry in self._entries.items():
            if type(obj) is entry.factory:
                return name
        return None

    def name_of_class(self, cls) -> Optional[str]:
        """The registered name of a class (None if it is not registered here)."""
        for name, entry in self._entries.items():
            if cls is entry.factory:
                return name
        return None

    def __contains__(self, name):
        return name in self._entries

    def validated(self, name: str, options=None) -> "Options":
        """``options`` (a dict or the entry's Options) validated against the entry's Options model."""
        entry = self.get(name)
        return options if isinstance(options, entry.options) else entry.options(**(options or {}))

    def build(self, name: str, options: Optional[dict] = None, *args, **kwargs):
        """Validate ``options`` against the entry's Options model and call its factory."""
        return self.get(name).factory(*args, options=self.validated(name, options), **kwargs)


MODELS = Registry("model")
DATASETS = Registry("dataset")
OPTIMIZERS = Registry("optimizer")
REDUCERS = Registry("reducer")
SYNCS = Registry("sync")
ORDERS = Registry("order")


def load_builtin() -> None:
    """Make sure the built-in implementations are registered. They register when the package ``ds_ext`` is
    imported (``ds_ext/__init__.py`` imports its plugin packages); this ground-floor module knows no plugin."""
    importlib.import_module("ds_ext")
