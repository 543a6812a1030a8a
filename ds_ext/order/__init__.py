"""Data orders (``method.order``): which local examples a rank visits in an epoch, and in which order.

Contract (``Order``): ``epoch_indices(epoch)`` returns the dataset indices this rank visits in that
epoch, identical in length on every rank; gradient-driven sorters (``dgrab``, ``cdgrab``) set
``observes_gradients`` and additionally get ``plan`` (batch plan, even microbatch count), ``bind``
(group, meter) and each microbatch gradient through ``observe_microbatch`` (or, for ``cdgrab``, the
gathered gradients from the ``cdgrab`` reducer). State goes through ``state_dict``.
"""
from .base import Order  # noqa: F401
from . import dgrab  # noqa: F401  (registration)
from . import rr
