"""The synchronizer contract:

* ``after_step()`` runs right after every optimizer step at an accumulation boundary and returns
  whether it communicated;
* ``reduce_gradients_now()`` says whether the gradient reducer runs for the coming step (post-local
  SGD: data-parallel first, local later); on the other steps ``local_gradient_exchange`` is the
  synchronizer's own per-step gradient exchange, if any (hierarchical mode's node mean);
* ``eval_view(module, train_batches)`` is a context manager the trainer evaluates inside (local
  methods evaluate the averaged model);
* every collective goes through ``self.comm`` (``ds_ext.comm``);
* its counters (and, for methods whose ranks diverge, each rank's own parameters and optimizer
  state) live in ``state_dict()``;
* ``describe()`` is the line ``attach`` logs on rank 0 (``ds_ext/deepspeed/announce.py``; None: nothing to say).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from ..comm import Communicator, for_params
from ..registry import SYNCS, NoOptions, Options


class Synchronizer:
    Options = NoOptions

    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], options: Options,
                 comm: Optional[Communicator] = None, module: Optional[torch.nn.Module] = None, optimizer=None,
                 lr_at=None, warmup_steps: Optional[int] = None, total_steps: Optional[int] = None,
                 group=None, meter=None, hierarchy=None, steps_per_epoch: Optional[int] = None):
        """What a synchronizer works with, handed in by ``attach`` (never the engine): the parameters,
        the communicator (without one: a communicator over ``group`` on the parameters' device, metered by
        ``meter``), the module (buffers, evaluation), the torch optimizer (moments), the learning rate at
        a step (``lr_at``; QSR), the schedule's warm-up length, the run's length in steps and the
        optimizer steps per epoch (``steps_per_epoch``; None when the caller has no epochs: DS-Sync's
        ``pattern_restart: epoch`` needs it)."""
        self.named_params = named_params
        self.options = options
        self.comm = comm if comm is not None else for_params([p for _, p in named_params], group=group, meter=meter)
        self.module, self.optimizer = module, optimizer
        self.lr_at, self.warmup_steps = lr_at, warmup_steps
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        #: ``ds_ext.hierarchy.HierarchicalAveraging`` in hierarchical mode (``hierarchical: true``), else None
        self.hierarchy = hierarchy

    def after_step(self) -> bool:
        return False

    def local_gradient_exchange(self, flag: torch.Tensor) -> Optional[torch.Tensor]:
        """On a step where the reducer does not run, before the optimizer step: the synchronizer's own
        gradient exchange, if it has one (hierarchical mode: the exact mean inside the node), carrying this
        rank's non-finite flag (0-dim, device) and returning it summed over the ranks it exchanged with, so
        that they skip or step together. None: no such exchange (ranks decide alone)."""
        if self.hierarchy is None:
            return None
        return self.hierarchy.node_gradient_mean([p for _, p in self.named_params], flag=flag)

    def reduce_gradients_now(self) -> bool:
        return True

    def before_step(self) -> None:
        """Right before the optimizer step at an accumulation boundary (after gradient reduction)."""

    @property
    def synced_globally(self) -> bool:
        """True when every rank must now hold identical parameters (checked by ``check_consistency_every``)."""
        return True

    @contextlib.contextmanager
    def eval_view(self, module, train_batches=None):
        yield

    def state_dict(self) -> dict:
        return {}

    def stats(self) -> dict:
        """Scalar diagnostics of the last step (logged as ``sync/<name>``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> Optional[str]:
        """One line for the attach announcement: the registered name and the first line of the class docstring."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        name = SYNCS.name_of(self) or type(self).__name__
        return f"{name}: {doc[0].rstrip('.') if doc else type(self).__name__}"

    @classmethod
    def collectives(cls, shapes, world: int, options, **model) -> list:
        """The collectives one rank issues per optimizer step (averaged over a period), as
        ``Reducer.collectives``."""
        return []

    @classmethod
    def check(cls, view) -> list:
        """Every problem of this synchronizer in this setting, as ``Reducer.check``."""
        return []


@SYNCS.register("none")
class NoSync(Synchronizer):
    """No parameter averaging: parameters stay identical because gradients are averaged every step."""

    def describe(self) -> Optional[str]:
        return None  # the reducer's line says it all
