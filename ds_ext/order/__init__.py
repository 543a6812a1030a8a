"""Data orders (``method.order``): which local examples a rank visits in an epoch, and in which order.

Contract (``Order``, ``base.py``, every capability declared there with its default): ``epoch_indices(epoch)``
returns the dataset indices this rank visits in that epoch, identical in length on every rank, and
``epoch_batches(epoch)`` the same cut into microbatches; ``plan`` fits the batch plan (D-GraB: an even
microbatch count). Gradient-driven sorters (``dgrab``, ``cdgrab``) set ``observes_gradients`` and get
``bind(comm, numel, device)`` and each microbatch gradient through ``observe_microbatch`` (or, for ``cdgrab``,
the gathered gradients from the ``cdgrab`` reducer). ``variable_units``, ``remainder_note()`` and ``stats()``
inform the trainer; ``collectives()`` describes the traffic; state goes through ``state_dict``.
"""
from .base import Order  # noqa: F401
from . import dgrab  # noqa: F401  (registration)
from . import rr
