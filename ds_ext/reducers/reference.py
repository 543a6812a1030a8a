"""Reference reducers: DeepSpeed's own allreduce, and no gradient communication at all."""
from __future__ import annotations

import torch

from ..registry import REDUCERS
from .base import Reducer, any_nonfinite


@REDUCERS.register("deepspeed")
class DeepSpeedReducer(Reducer):
    """DeepSpeed's own gradient allreduce (engine.allreduce_gradients), kept as the reference.

    Bytes are derived, not intercepted: DeepSpeed reduces every gradient present at the boundary in
    ``engine.communication_data_type``; that count is added at ``finish()`` (kind ``allreduce``; under
    ZeRO kind ``zero_reduce``, each micro-batch's at stage 2, and the attachment adds ZeRO's parameter
    all-gather as ``zero_allgather``)."""

    replaces_engine_allreduce = False
    #: DeepSpeed's allreduce has written the mean into every ``p.grad`` by ``finish()`` (ZeRO 0; under ZeRO the
    #: guard is off for this reducer): the guard checks them (one fused pass)
    nonfinite_view = "reduced"

    @classmethod
    def check(cls, view) -> list:
        return []  # DeepSpeed's own reduction: every ZeRO stage is DeepSpeed's to handle

    def describe(self, total_steps=None) -> str:
        """Attach's line: DeepSpeed reduces, ds_ext only meters."""
        from ..meter import human_bytes

        return (f"{self.registered_name}: DeepSpeed's own gradient allreduce, unchanged (ds_ext only meters it), "
                f"{len(self.params)} tensors, ~{human_bytes(self.dense_bytes())}/step in fp32")

    def nonfinite_flag(self):
        return any_nonfinite([p.grad for p in self.params if p.grad is not None], self.comm.device)

    def finish(self):
        if self.world_size == 1:
            return
        dtype = getattr(self.engine, "communication_data_type", None) or torch.float32
        size = torch.empty((), dtype=dtype).element_size()
        stage = self.engine.zero_optimization_stage() if self.engine is not None else 0
        nbytes = sum(p.numel() for p in self.params if p.grad is not None or stage >= 1) * size  # ZeRO frees them
        if stage == 0:
            self.comm.record("allreduce", nbytes)
        else:  # ZeRO reduces each gradient into its owner's partition; stage 2 does so after every micro-batch
            self.comm.record("zero_reduce", nbytes * (self.engine.gradient_accumulation_steps() if stage >= 2 else 1))


@REDUCERS.register("none")
class NoReducer(Reducer):
    """No gradient communication: each rank steps on its own gradient (for parameter-averaging
    synchronizers; alone, ranks diverge)."""

    communicates_gradients = False

    def describe(self, total_steps=None) -> str:
        """Attach's line: nothing sent per step."""
        return (f"{self.registered_name}: no gradient communication; each rank steps on its own gradient "
                f"(the synchronizer averages parameters)")

    @classmethod
    def check(cls, view) -> list:
        problems = []
        if view.names["sync"] == "none":
            problems.append(("method.reducer", "reducer 'none' with sync 'none' never communicates: ranks would train "
                                               "independent models; pick a gradient reducer or a parameter synchronizer"))
        return problems + super().check(view)
