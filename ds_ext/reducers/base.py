"""The reducer contract.

* The engine's own gradient allreduce is switched off (``engine.enable_backward_allreduce = False``,
  as DeepSpeed's 1-bit Adam does) unless ``replaces_engine_allreduce`` is False.
* ``grad_ready(p)`` is called from ``p.register_post_accumulate_grad_hook`` during backward, and
  only on the micro-batch that closes a gradient-accumulation window, so communication can start
  while backward is still running.
* ``finish()`` is called before the optimizer step at that boundary: it waits for outstanding
  communication and writes the averaged gradients into ``p.grad``.
* Every collective goes through ``self.comm`` (``ds_ext.comm.Communicator``: metering, device,
  DeepSpeed's comms logger); a reducer never calls ``torch.distributed``.
* ``state_dict()`` / ``load_state_dict()`` hold all state needed to resume exactly.
* ``stats()`` returns scalar diagnostics of the last step (e.g. achieved density); the trainer logs
  them as ``reducer/<name>``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from pydantic import Field

from ..comm import Communicator, for_params
from ..registry import NoOptions, Options, precision_of, zero_stage_of


class GradientOptions(Options):
    """Options every gradient-compressing reducer shares."""

    hierarchical: bool = Field(False, description="exact mean inside each node, the method only between nodes "
                                                  "(node layout from the deepspeed launcher; ds_ext/hierarchy.py)")


def zero_stage_problem(reducer: str, ds) -> Optional[Tuple[str, str]]:
    """Why a gradient reducer (one that replaces DeepSpeed's reduction) cannot run under this DeepSpeed
    config's ZeRO settings, as ``(recipe key, message)``, or None. The one statement of the rule: the recipe check and ``attach`` both
    reach it through ``Reducer.check``. Stages 1 and 2 work: the method's exchange replaces ZeRO's
    gradient reduce-scatter and ZeRO keeps its optimizer-state partitions (``engine.ZeroBridge``)."""
    zero = ds.get("zero_optimization") or {}
    stage = zero_stage_of(ds)
    if stage == 0:
        return None
    if stage >= 3:
        return ("deepspeed.zero_optimization.stage",
                f"reducer {reducer!r} works with ZeRO stage 0, 1 or 2 (got {stage}): ZeRO-3 partitions the "
                "parameters themselves, so no rank holds a whole gradient to compress. Use stage 1 or 2 (the "
                "optimizer state is partitioned either way), or reducer 'deepspeed' to keep ZeRO-3")
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "")
    if stage == 1 and precision_of(ds) == "bf16" and accum.lower() in ("fp32", "float32", "float"):
        return ("deepspeed.data_types.grad_accum_dtype",
                f"reducer {reducer!r}: with bf16, ZeRO stage 1 and data_types.grad_accum_dtype {accum!r} DeepSpeed runs "
                "its BF16_Optimizer, not the ZeRO optimizer the reducer plugs into; remove grad_accum_dtype (the "
                "methods reduce in the gradients' dtype, their own state is fp32) or use stage 2")
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else offload
    if device not in (None, "none", False):
        return ("deepspeed.zero_optimization.offload_optimizer",
                f"reducer {reducer!r} with ZeRO stage {stage} keeps the optimizer partition on the accelerator; "
                f"zero_optimization.offload_optimizer (device {device!r}) is not supported with a replacing "
                "reducer: remove it, or use reducer 'deepspeed'")
    return None


class Reducer:
    Options = NoOptions
    replaces_engine_allreduce = True

    #: uses ``ds_ext.ops`` kernels (``attach`` prepares them at start-up, not inside step 1)
    uses_kernels = False
    #: exchanges gradients on the steps the synchronizer reduces them (``none`` does not: nothing is
    #: exchanged per step, so no per-step control vote can ride on it; see ``engine.StopVote``)
    communicates_gradients = True
    #: consumes every microbatch gradient itself (``microbatch``; with the matching order, ``bind_order``)
    observes_microbatches = False

    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], options: Options,
                 comm: Optional[Communicator] = None, engine=None, group=None, meter=None):
        """``comm``: the communicator ``attach`` hands in; without one (benchmarks, tests) a
        communicator over ``group`` on the parameters' device, metered by ``meter``."""
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.options = options
        self.comm = comm if comm is not None else for_params(self.params, group=group, meter=meter)
        self.engine = engine
        self.world_size = self.comm.world_size
        self.rank = self.comm.rank

    @property
    def meter(self):
        return self.comm.meter

    def grad_ready(self, p: torch.nn.Parameter) -> None:
        pass

    def bind_order(self, order) -> None:
        """Reducers that observe microbatches take their order here (``observes_microbatches``)."""
        raise ValueError(f"reducer {type(self).__name__} does not observe microbatch gradients")

    def microbatch(self, flat: torch.Tensor) -> None:
        raise ValueError(f"reducer {type(self).__name__} does not observe microbatch gradients")

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def stats(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def collectives(cls, shapes, world: int, options, **model) -> list:
        """The collectives one rank issues per optimizer step for parameters of these shapes
        (``ds_ext.comm.Collective``; fp32 gradients, steady state): what the cost model adds up and what
        the meter counts (tests/test_cluster.py checks the two agree). ``model``: assumptions a
        data-dependent method needs (``imbalance`` for exdyna, ``lr`` for a QSR period)."""
        return []

    @classmethod
    def check(cls, view) -> list:
        """Every problem of this reducer in this setting (``ds_ext.registry.MethodView``): a list of
        ``(recipe key, message)``. The one place each rule lives: the recipe check (before launch) and
        ``attach()`` both call it. World-size rules apply when ``view.world`` is known."""
        problem = zero_stage_problem(view.names["reducer"], view.deepspeed)
        return [problem] if problem else []
