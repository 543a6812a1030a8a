"""Distributed random reshuffling (D-RR), the D-GraB paper's baseline: each rank keeps its fixed
local shard and visits it in a fresh random permutation every epoch (``torch.randperm(m)`` per
worker in the reference), with no communication."""
from __future__ import annotations

from typing import List

import torch

from ..registry import ORDERS
from .base import Order, seeded_generator


@ORDERS.register("rr")
class RandomReshuffling(Order):
    """Distributed random reshuffling: fixed local shard, new seeded permutation each epoch."""

    def epoch_indices(self, epoch: int) -> List[int]:
        perm = torch.randperm(self.shard_size, generator=seeded_generator(self.seed, epoch, self.rank))
        return [self.shard[i] for i in perm.tolist()]


@ORDERS.register("sequential")
class Sequential(Order):
    """Fixed local shard visited in the same order every epoch (debugging, determinism checks)."""

    def epoch_indices(self, epoch: int) -> List[int]:
        return list(self.shard)
