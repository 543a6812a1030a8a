"""Data orders (``method.order``): which local examples a rank visits in an epoch, and in which order.

Contract (``Order``): ``epoch_indices(epoch)`` returns the dataset indices this rank visits in that
epoch, identical in length on every rank; gradient-driven sorters (D-GraB) additionally see each
microbatch gradient through ``observe_microbatch``. State goes through ``state_dict``.
"""
from .base import Order  # noqa: F401
from . import rr  # noqa: F401  (registration)
