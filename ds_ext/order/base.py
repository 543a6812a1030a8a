"""The order contract (``Order``): every capability an order has is declared here with its default, so the
attachment and the trainer use plain attribute access, never discovery."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from ..registry import NoOptions, Options

if TYPE_CHECKING:
    from ..comm import Communicator


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed mixes the given integers (independent of the global RNG)."""
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + (int(p) & 0xFFFFFFFF) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)


class Order:
    """Base class: a fixed, disjoint shard of ``num_examples // world`` examples per rank,
    drawn once by a seeded permutation shared by all ranks (the D-GraB partition,
    ``d_data.py: D_Dataset_Partitioned``); subclasses decide the visiting order inside the shard.

    Declared capabilities (override where an order differs): ``observes_gradients`` (``attach`` feeds it
    every microbatch gradient after ``bind``), ``variable_units`` (the epoch's microbatches differ in size:
    the trainer takes them from ``epoch_batches``), ``remainder_note()``, ``stats()``, ``state_dict()`` /
    ``load_state_dict()`` and the ``collectives()`` it issues per optimizer step."""

    Options = NoOptions
    #: ``attach`` hands it every microbatch gradient (``bind``, then ``observe_microbatch``)
    observes_gradients = False
    #: the epoch's microbatches differ in size: the trainer takes them from ``epoch_batches``
    variable_units = False

    def __init__(self, num_examples: int, rank: int, world_size: int, seed: int, options: Options = None):
        if num_examples < world_size:
            raise ValueError(f"{num_examples} training examples cannot be split over {world_size} ranks")
        self.options, self.rank, self.world, self.seed = options or self.Options(), rank, world_size, seed
        perm = torch.randperm(num_examples, generator=seeded_generator(seed, 0xDA7A))
        self.shard_size = num_examples // world_size
        self.shard = perm[rank * self.shard_size:(rank + 1) * self.shard_size].tolist()
        self.micro = 1  # examples per microbatch (``plan``)

    def epoch_indices(self, epoch: int) -> List[int]:
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The epoch's microbatches in visiting order, one list of example indices each: by default
        ``epoch_indices`` cut into microbatches of the planned size (the last one may be short)."""
        idx, b = self.epoch_indices(epoch), self.micro
        return [idx[i:i + b] for i in range(0, len(idx), b)]

    def remainder_note(self) -> Optional[str]:
        """What happens to the shard's examples that do not fill the epoch, for the trainer's start-up line
        (None: nothing to say)."""
        return None

    # ---- gradient-driven orders (D-GraB); no-ops for the others -------------------------------
    def plan(self, micro_batch_size: int, grad_acc: int, steps_per_epoch: int) -> Tuple[int, Optional[str]]:
        """Called by the trainer before the engine is built, with the batch plan and the steps per
        epoch it intends to run: returns the steps per epoch this order can serve (e.g. an even number
        of microbatches for PairBalance) and a note for the log (None: nothing to say)."""
        self.micro = micro_batch_size
        return steps_per_epoch, None

    def bind(self, comm: "Communicator", numel: int, device=None) -> None:
        """Called by ``ds_ext.deepspeed.attach`` when ``observes_gradients``: the communicator (the
        data-parallel group, its device and meter) and the size and device of the flat fp32 gradient it
        will observe (``device`` None: ``comm.device``)."""

    def observe_microbatch(self, flat_grad: torch.Tensor) -> None:
        """Called by the engine after each microbatch backward, with that microbatch's gradient
        (flat fp32, captured by per-parameter ``Tensor`` hooks before accumulation into ``.grad``)
        when ``observes_gradients``; the buffer is reused afterwards (copy what you keep)."""

    def stats(self) -> dict:
        """What the trainer logs under ``order/`` on logging steps (host counters only)."""
        return {}

    def describe(self) -> str:
        """The line ``attach`` logs on rank 0 (``ds_ext/deepspeed/announce.py``): the registered name, the first
        line of the class docstring, the shard and the options."""
        from ..registry import ORDERS

        doc = (type(self).__doc__ or "").strip().splitlines()
        name = ORDERS.name_of(self) or type(self).__name__
        opts = ", ".join(f"{k} {v}" for k, v in self.options.model_dump().items())
        return (f"{name}: {doc[0].rstrip('.') if doc else type(self).__name__}; {self.shard_size} examples per rank"
                + (f" ({opts})" if opts else ""))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def collectives(cls, shapes, world: int, options, grad_acc: int = 1, **model) -> list:
        """The collectives one rank issues per optimizer step for parameters of these shapes, as
        ``Reducer.collectives`` (``ds_ext.comm.Collective``); ``grad_acc``: microbatches per step. None by default."""
        return []

    @classmethod
    def check(cls, view) -> list:
        """Every problem of this order in this setting, as ``Reducer.check``."""
        return []
