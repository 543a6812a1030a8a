"""Parameter synchronizers (``method.sync``): decide after each optimizer step whether, and with
whom, to average parameters. ``none`` relies on the gradient reducer alone (data-parallel SGD).
``local`` (Local SGD / Local AdamW with a constant, QSR or post-local period) and ``dssync``
(divide-and-shuffle groups) live in ``averaging.py``; the periods in ``schedules.py``."""
from .base import Synchronizer  # noqa: F401
from . import base  # noqa: F401  (registration)
from . import averaging
