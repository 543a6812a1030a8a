from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..registry import NoOptions, Options


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed mixes the given integers (independent of the global RNG)."""
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + (int(p) & 0xFFFFFFFF) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)


class Order:
    """Base class: a fixed, disjoint shard of ``num_examples // world`` examples per rank,
    drawn once by a seeded permutation shared by all ranks (the D-GraB partition,
    ``d_data.py: D_Dataset_Partitioned``); subclasses decide the visiting order inside the shard."""

    Options = NoOptions
    observes_gradients = False

    def __init__(self, num_examples: int, rank: int, world_size: int, seed: int, options: Options = None):
        if num_examples < world_size:
            raise ValueError(f"{num_examples} training examples cannot be split over {world_size} ranks")
        self.options, self.rank, self.world, self.seed = options or self.Options(), rank, world_size, seed
        perm = torch.randperm(num_examples, generator=seeded_generator(seed, 0xDA7A))
        self.shard_size = num_examples // world_size
        self.shard = perm[rank * self.shard_size:(rank + 1) * self.shard_size].tolist()

    def epoch_indices(self, epoch: int) -> List[int]:
        raise NotImplementedError

    # ---- gradient-driven orders (D-GraB); no-ops for the others -------------------------------
    def plan(self, micro_batch_size: int, grad_acc: int, steps_per_epoch: int) -> Tuple[int, Optional[str]]:
        """Called by the trainer before the engine is built, with the batch plan and the steps per
        epoch it intends to run: returns the steps per epoch this order can serve (e.g. an even number
        of microbatches for PairBalance) and a note for the log (None: nothing to say)."""
        return steps_per_epoch, None

    def bind(self, group=None, meter=None, numel: int = 0, device=None) -> None:
        """Called by ``engine.attach`` when ``observes_gradients``: the process group, the
        communication meter, and the size/device of the flat gradient it will observe."""

    def observe_microbatch(self, flat_grad: torch.Tensor) -> None:
        """Called by the engine after each microbatch backward, with that microbatch's gradient
        (flat fp32, captured by per-parameter ``Tensor`` hooks before accumulation into ``.grad``)
        when ``observes_gradients``; the buffer is reused afterwards (copy what you keep)."""

    def stats(self) -> dict:
        """What the trainer logs under ``order/`` on logging steps (host counters only)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def check(cls, view) -> list:
        """Every problem of this order in this setting, as ``Reducer.check``."""
        return []
