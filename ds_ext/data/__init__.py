"""Data sets registered by recipe name (``data: {name: ..., <options>}``).

A data set factory returns a ``DataBundle`` (train / val ``torch.utils.data.Dataset`` plus shape
metadata). Which examples a rank visits, and in which order, is decided by the ``order`` method
(``ds_ext.order``), not here.
"""
from .base import DataBundle  # noqa: F401
from . import digits  # noqa: F401  (registration)
