"""Gradient reducers (``method.reducer``): each owns gradient averaging across the data-parallel group.

The built-in reducers are the modules of this package; the list is the registry
(``ds_ext.REDUCERS.names()``, ``python -m ds_ext.methods list``), never typed out by hand.
"""
import importlib
import pkgutil

from .base import Reducer  # noqa: F401

# every module of this package is imported, so a new method registers by adding its module (no list to edit)
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
