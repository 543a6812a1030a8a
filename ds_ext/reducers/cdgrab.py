"""``cdgrab`` reducer: the gradient-averaging half of CD-GraB (see ``ds_ext/order/dgrab.py``).

Every microbatch gradient (flat fp32, captured by the engine's per-parameter ``Tensor`` hooks before
accumulation) is ``all_gather``ed into ``[n, d]``; the gathered tensor goes to the ``cdgrab`` order
(which balances pair differences of it) and its mean over ranks is accumulated. At the accumulation
boundary ``finish()`` writes the accumulated mean into ``p.grad``: the optimizer applies
sum over microbatches of ``gathered.mean(0)``, which equals DeepSpeed's ``allreduce(sum of
microbatch gradients) / n`` up to floating-point summation order. There is no separate allreduce:
n x d floats cross the network per microbatch (vs d per step for the allreduce), the price of CD-GraB
seeing every rank's gradient. Only valid with order ``cdgrab`` (refused otherwise by the recipe check
and by ``attach``).
"""
from __future__ import annotations

import torch

from ..registry import REDUCERS
from .base import Reducer


@REDUCERS.register("cdgrab")
class CDGrabReducer(Reducer):
    """CD-GraB: all_gather of microbatch gradients replaces the allreduce (optimizer uses their mean)."""

    observes_microbatches = True  # the engine hands it each microbatch gradient instead of the order

    def __init__(self, named_params, options, **kw):
        super().__init__(named_params, options, **kw)
        self.order = None
        self.acc = None

    def describe(self, total_steps=None) -> str:
        """Attach's line: a gather of every microbatch gradient instead of the allreduce."""
        from ..meter import human_bytes

        return (f"{self.registered_name}: every microbatch gradient all_gathered ({len(self.params)} tensors, "
                f"~{human_bytes(self.dense_bytes())} per microbatch per rank) instead of the allreduce; the "
                f"gathered gradients feed order cdgrab")

    def bind_order(self, order) -> None:
        from ..order.dgrab import CDGrab

        if not isinstance(order, CDGrab):
            raise ValueError("reducer 'cdgrab' needs order 'cdgrab' (set method.order={name: cdgrab})")
        self.order = order

    def microbatch(self, flat: torch.Tensor) -> None:
        gathered = self.comm.all_gather(flat, "all_gather")  # [n, d]
        if self.acc is None:
            self.acc = torch.zeros_like(flat)
        self.acc.add_(gathered.mean(0))
        self.order.observe_gathered(gathered)

    def finish(self) -> None:
        if self.acc is None:
            return
        off = 0
        for p in self.params:
            n = p.numel()
            g = self.acc[off:off + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n
        self.acc.zero_()

    @classmethod
    def check(cls, view) -> list:
        problems = []
        if view.names["order"] != "cdgrab":
            problems.append(("method.reducer", f"reducer 'cdgrab' is the gradient half of CD-GraB and needs order "
                                               f"'cdgrab' (got {view.names['order']!r}): set method.order={{name: cdgrab}}"))
        return problems + super().check(view)
