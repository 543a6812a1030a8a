"""Parameter synchronizers (``method.sync``): decide after each optimizer step whether, and with
whom, to average parameters. ``none`` relies on the gradient reducer alone (data-parallel SGD).
The Local SGD / QSR and DS-Sync synchronizers plug in here (see the README's status table)."""
from .base import Synchronizer  # noqa: F401
from . import base  # noqa: F401  (registration)
