"""What the flat reducers (``signsgd``, ``topk``, ``exdyna``) start during backward, before ``finish()``.

Each gradient's error-feedback accumulation ``e[a:b] += grad`` (without error feedback: ``send[a:b] = 0 + grad``)
runs in its own ready hook (``grad_ready``, called from the thread that runs the gradient hooks), exactly the
addition ``FlatReducer._send_buffer`` does after backward: the same operation on the same slices, so the
vector ``finish()`` reads is bit-identical to the whole-model path. ``finish()`` adds whatever gradient did not
announce itself (a parameter without a gradient on this rank, or a wrapper that never calls ``grad_ready``, e.g.
the hierarchical reducer's inner one) the same way. The dense output vector is zeroed at the step's first ready
hook instead of after the selection (it is not read in between). A gradient is final when its hook fires (one
backward per boundary micro-batch), as the bucketed S-SGD and pipelined PowerSGD assume; a second call for the
same parameter in one step is ignored.

The *suffix* is the part of the flat vector whose gradients are all accumulated: backward produces them in about
reverse registration order, so it grows from the end. ``ExDyna`` reads it to start per-partition work once its
own partition is complete, and ``extremes`` chunks of it for the non-finite flag.
"""
from __future__ import annotations

from typing import List

import torch

from .flat import FlatReducer


def extremes(t: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``t`` in fp32: ``base.any_nonfinite``'s per-tensor step, for a flag built from chunks
    (``nonfinite_of``) that equals ``any_nonfinite([whole])`` exactly (NaN propagates into both, +-inf is an
    extreme; a finite tensor never is)."""
    return torch.stack(torch.aminmax(t)).float()


def nonfinite_of(parts: List[torch.Tensor]) -> torch.Tensor:
    """Whether any of the ``extremes`` is NaN or +-inf (0-dim bool, not read)."""
    return ~torch.isfinite(torch.cat(parts) if len(parts) > 1 else parts[0]).all()


class OverlappedFlatReducer(FlatReducer):
    """``FlatReducer`` whose gradients are accumulated in their ready hooks (module docstring)."""

    def __init__(self, named_params, options, **kw):
        super().__init__(named_params, options, **kw)
        self.starts: List[int] = []
        off = 0
        for n in self.numels:
            self.starts.append(off)
            off += n
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._reset_ready()

    def _reset_ready(self) -> None:
        self._added = [False] * len(self.params)
        self._suffix = len(self.params)  # params[_suffix:] are all accumulated
        self._started = False

    @property
    def suffix_start(self) -> int:
        """Flat offset from which every gradient of this step is accumulated (``numel``: none yet)."""
        return self.starts[self._suffix] if self._suffix < len(self.params) else self.numel

    def _begin_step(self) -> None:
        """The step's first ready hook (or ``finish`` without one): the dense output to zero."""
        self._started = True
        self._dense.zero_()

    def _add(self, i: int) -> None:
        p, a, n = self.params[i], self.starts[i], self.numels[i]
        sl = (self.error if self.error is not None else self._send)[a:a + n]
        if self.error is None:
            sl.zero_()
        if p.grad is not None:
            sl.add_(p.grad.detach().reshape(-1))
        self._added[i] = True
        while self._suffix and self._added[self._suffix - 1]:
            self._suffix -= 1

    def grad_ready(self, p) -> None:
        i = self._index.get(id(p))
        if i is None or self._added[i]:
            return
        if not self._started:
            self._begin_step()
        self._add(i)
        self._accumulated(i)

    def _accumulated(self, i: int) -> None:
        """After gradient ``i`` joined the send vector (during backward): subclasses start work here."""

    def _send_buffer(self) -> torch.Tensor:
        """g = grad + e (module docstring): the gradients no hook announced are added now."""
        if not self._started:
            self._begin_step()
        for i, done in enumerate(self._added):
            if not done:
                self._add(i)
        return self.error if self.error is not None else self._send

    def _output(self) -> torch.Tensor:
        """The dense output, zeroed at the step's start (``_begin_step``)."""
        if not self._started:
            self._begin_step()
        return self._dense

    def _end_step(self) -> None:
        """The end of ``finish()``: the next step's hooks start from scratch."""
        self._reset_ready()
