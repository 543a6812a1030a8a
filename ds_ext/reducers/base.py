"""The reducer contract.

* The engine's own gradient allreduce is switched off (``engine.enable_backward_allreduce = False``,
  as DeepSpeed's 1-bit Adam does) unless ``replaces_engine_allreduce`` is False.
* ``grad_ready(p)`` is called from ``p.register_post_accumulate_grad_hook`` during backward, and
  only on the micro-batch that closes a gradient-accumulation window, so communication can start
  while backward is still running.
* ``finish()`` is called before the optimizer step at that boundary: it waits for outstanding
  communication and writes the averaged gradients into ``p.grad``.
* Every byte handed to a collective is reported to the ``CommMeter``.
* ``state_dict()`` / ``load_state_dict()`` hold all state needed to resume exactly.
* ``stats()`` returns scalar diagnostics of the last step (e.g. achieved density); the trainer logs
  them as ``reducer/<name>``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..registry import NoOptions, Options


def zero_stage_problem(reducer: str, stage: int) -> str:
    """Why a reducer other than ``deepspeed`` refuses ZeRO stage >= 1 (shared by the recipe check and
    ``attach``)."""
    return (f"reducer {reducer!r} needs ZeRO stage 0 (got {stage}): from stage 1 on, DeepSpeed's ZeRO optimizer "
            "reduce-scatters the full gradients itself, so a replacement reducer would be bypassed or followed by "
            "a second, uncompressed reduction (DeepSpeed's own 1-bit optimizers refuse ZeRO for the same reason). "
            "Set deepspeed.zero_optimization.stage=0 (optimizer state stays replicated), or use reducer 'deepspeed' "
            "to keep ZeRO")


class Reducer:
    Options = NoOptions
    replaces_engine_allreduce = True

    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], options: Options,
                 group: Optional[dist.ProcessGroup] = None, meter=None, engine=None):
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.options = options
        self.group = group
        self.meter = meter
        self.engine = engine
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1

    def grad_ready(self, p: torch.nn.Parameter) -> None:
        pass

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def stats(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _count(self, kind: str, t: torch.Tensor) -> None:
        if self.meter is not None:
            self.meter.add(kind, t.numel() * t.element_size())

    @classmethod
    def check_recipe(cls, recipe) -> list:
        return []
