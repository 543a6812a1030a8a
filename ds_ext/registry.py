"""Name -> implementation registries for every pluggable family (models, data sets, optimizers,
reducers, synchronizers, data orders).

Each entry carries a pydantic ``Options`` model (``extra="forbid"``) so that a recipe block such as
``{name: allreduce, bucket_mb: 25}`` is validated against exactly the options that implementation
accepts. Adding a method is adding one module with one ``@REGISTRY.register(...)`` line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Type

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base class for per-implementation options: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class NoOptions(Options):
    pass


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    options: Type[Options]
    doc: str


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

    def __contains__(self, name):
        return name in self._entries

    def build(self, name: str, options: Optional[dict] = None, *args, **kwargs):
        """Validate ``options`` against the entry's Options model and call its factory."""
        entry = self.get(name)
        opts = options if isinstance(options, entry.options) else entry.options(**(options or {}))
        return entry.factory(*args, options=opts, **kwargs)


MODELS = Registry("model")
DATASETS = Registry("dataset")
OPTIMIZERS = Registry("optimizer")
REDUCERS = Registry("reducer")
SYNCS = Registry("sync")
ORDERS = Registry("order")


def load_builtin() -> None:
    """Import the modules that register the built-in implementations (cheap: no deepspeed import)."""
    from . import models, data, optim  # noqa: F401
    from . import reducers, sync, order  # noqa: F401
