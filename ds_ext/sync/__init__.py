"""Parameter synchronizers (``method.sync``): decide after each optimizer step whether, and with
whom, to average parameters. ``none`` relies on the gradient reducer alone (data-parallel SGD).
``local`` (Local SGD / Local AdamW with a constant, QSR or post-local period, ``averaging.py``) and ``dssync``
(divide-and-shuffle groups, ``dssync.py``) build on ``averaging.py``; the periods live in ``schedules.py``."""
import importlib
import pkgutil

from .base import Synchronizer  # noqa: F401

# every module of this package is imported, so a new method registers by adding its module (no list to edit)
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
