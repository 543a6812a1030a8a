"""Gradient reducers (``method.reducer``): each owns gradient averaging across the data-parallel group.

Built in: ``deepspeed`` (the engine's own allreduce, kept as the reference), ``allreduce`` (S-SGD:
bucketed, asynchronous, overlapped with backward) and ``none`` (no gradient communication, for the
local/parameter-averaging synchronizers), ``powersgd`` and ``acpsgd`` (low-rank compression), ``topk``
and ``exdyna`` (sparsification with error feedback).
"""
from .base import Reducer  # noqa: F401
from . import allreduce  # noqa: F401  (registration)
from . import cdgrab
from . import lowrank
from . import reference
from . import sparse
from . import signsgd  # noqa: F401  (registration: 1-bit EF-SignSGD on the ds_ext.ops sign kernels)
