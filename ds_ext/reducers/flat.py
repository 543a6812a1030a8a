"""The shared machinery of reducers that compress one flat vector of all gradients (``topk``,
``exdyna``, ``signsgd``): every trainable parameter's gradient added into one persistent fp32 vector
(with error feedback it *is* the residual), a persistent dense output written back into ``p.grad`` in
the parameter's dtype, the fp16 dynamic-loss-scaling refusal and the per-rank
state checks."""
from __future__ import annotations

import torch

from .base import Reducer


class FlatReducer(Reducer):
    """Flat fp32 view of all gradients, error feedback, write-back."""

    uses_kernels = True

    def __init__(self, named_params, options, **kw):
        super().__init__(named_params, options, **kw)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: no trainable parameters")
        self.device = self.params[0].device
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)
        self.error = torch.zeros(self.numel, device=self.device) if options.error_feedback else None
        # persistent work buffers (fresh N-element allocations cost page faults every step on the CPU)
        self._send = None if options.error_feedback else torch.zeros(self.numel, device=self.device)
        self._dense = torch.zeros(self.numel, device=self.device)
        self.iteration = 0
        self._stats: dict = {}

    # -- gradients in and out --------------------------------------------------------------------
    def _send_buffer(self) -> torch.Tensor:
        """g = grad + e as one fp32 vector. With error feedback this *is* ``self.error`` (updated in
        place: after the step it holds the new residual once the sent coordinates are zeroed)."""
        if self.error is not None:
            buf = self.error
        else:
            buf = self._send
            buf.zero_()
        off = 0
        for p, n in zip(self.params, self.numels):
            if p.grad is not None:
                buf[off:off + n].add_(p.grad.detach().reshape(-1))
            off += n
        return buf

    def _output(self) -> torch.Tensor:
        """The zeroed dense fp32 output vector the averaged sparse gradient is scattered into."""
        return self._dense.zero_()

    def _write_back(self, dense: torch.Tensor) -> None:
        off = 0
        for p, n in zip(self.params, self.numels):
            v = dense[off:off + n].view(p.shape)
            if p.grad is None:
                p.grad = v.to(p.dtype).clone()
            else:
                p.grad.copy_(v)
            off += n

    @property
    def distributed(self) -> bool:
        return self.comm.distributed

    def grad_ready(self, p) -> None:
        pass  # here all work is in finish(); OverlappedFlatReducer (flat_overlap.py) starts what it can in the hooks

    def stats(self) -> dict:
        return dict(self._stats)

    def reset_nonfinite(self) -> None:
        """After a skipped step: the residual (which absorbed the non-finite value) to zero, on every rank."""
        if self.error is not None:
            self.error.zero_()

    def _base_state(self) -> dict:
        return {"numel": self.numel, "world_size": self.world_size, "iteration": self.iteration,
                "error": None if self.error is None else self.error.detach().cpu().clone()}

    def _load_base_state(self, state: dict) -> None:
        name = type(self).__name__
        if state["numel"] != self.numel:
            raise ValueError(f"{name} state is for {state['numel']} gradient elements, this model has {self.numel}")
        if state["world_size"] != self.world_size:
            raise ValueError(f"{name} state was saved with world size {state['world_size']}, "
                             f"now {self.world_size}: error feedback and partitions are per rank")
        if (state["error"] is None) != (self.error is None):
            raise ValueError(f"{name} state and options disagree on error_feedback")
        if self.error is not None:
            self.error.copy_(state["error"])
        self.iteration = int(state["iteration"])
