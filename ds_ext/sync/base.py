"""The synchronizer contract: ``after_step()`` runs right after every applied optimizer step and
returns whether it communicated; its counters live in ``state_dict()``."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..registry import SYNCS, NoOptions, Options


class Synchronizer:
    Options = NoOptions

    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], options: Options,
                 group: Optional[dist.ProcessGroup] = None, meter=None, engine=None):
        self.named_params = named_params
        self.options = options
        self.group = group
        self.meter = meter
        self.engine = engine

    def after_step(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def stats(self) -> dict:
        """Scalar diagnostics of the last step (logged as ``sync/<name>``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def check_recipe(cls, recipe) -> list:
        return []


@SYNCS.register("none")
class NoSync(Synchronizer):
    """No parameter averaging: parameters stay identical because gradients are averaged every step."""
