"""``signsgd``: 1-bit gradient compression (scaled sign) with error feedback.

Papers: Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed Optimisation for
Non-Convex Problems", ICML 2018 (sign compression, 1 bit per coordinate); Karimireddy, Rebjock,
Stich & Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019
(EF-SignSGD, Algorithm 1 there): with ``p = g + e``, send ``delta = (||p||_1 / d) sign(p)`` and keep
``e <- p - delta``. It is the classic 1-bit baseline the ACP-SGD paper evaluates against.

Per rank and per parameter tensor (d = its number of elements): ``p = grad + e`` (fp32), packed
with ``ds_ext.ops.sign_pack_segments`` (every tensor of the flat vector in one call) to ``ceil(d/8)``
bytes and one fp32 scale ``mean |p|``; the residual is written in the same pass. One all_gather of every rank's packed bits (all tensors in one uint8
buffer) and one of the scales (fp32, one per tensor); every rank then decodes the same data in the
same order (rank 0 first, ``ops.sign_unpack_segments(..., accumulate=True)``, the scales read on the
device, never on the host) and divides by n, so all ranks
apply identical gradients: ``(1/n) sum_r scale_r,t sign(p_r,t)``. Bytes sent per step and rank:
``sum_t ceil(d_t/8) + 4 * tensors``, about 1/32 of fp32.

Deliberate choices, named:

* the scale is per parameter tensor (``scale: tensor``, default) or one for the whole flattened
  gradient (``scale: global``); EF-SignSGD states the compressor for one vector and leaves the
  grouping open;
* aggregation is the mean of the scaled signs (the EF-SignSGD compressor used in data-parallel form
  with an all_gather), not signSGD's majority vote (``sign(sum_r sign(g_r))``, which has no scale and
  no error feedback); ``error_feedback: false`` gives the scaled-sign compressor without memory;
* a missing gradient counts as zeros (its sign is +, scale 0, so it contributes nothing);
* the residual is fp32 whatever the parameter dtype; results are cast back to it. Recipes with fp16
  dynamic loss scaling are refused with the policy and message every error-feedback reducer shares
  (``base.fp16_loss_scaling_problem``: the residual keeps each step's loss scale); a static
  ``fp16.loss_scale`` is accepted (``mean |p| sign(p)`` scales with it);
* ``error_feedback`` also accepts PyTorch PowerSGD's spelling ``use_error_feedback``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .. import ops
from ..registry import REDUCERS
from .base import GradientOptions, error_feedback_field
from .flat import FlatReducer


class SignSGDOptions(GradientOptions):
    error_feedback: bool = error_feedback_field("EF-SignSGD: keep p - scale*sign(p) and add it to the next gradient")
    scale: Literal["tensor", "global"] = Field(
        "tensor", description="'tensor': one mean|p| scale per parameter tensor; 'global': one for all gradients")


@REDUCERS.register("signsgd", SignSGDOptions)
class SignSGDReducer(FlatReducer):
    """EF-SignSGD (Karimireddy et al. 2019) over signSGD's 1-bit sign compression (Bernstein et al. 2018)."""

    keeps_scaled_state = True  # the residual e: base.fp16_loss_scaling_problem applies
    #: ``scale = mean |p|`` of a segment holding a NaN / inf is NaN / inf (sign() alone would hide it): the
    #: gathered scales, identical on every rank, show any rank's non-finite value (``base.Reducer``)
    nonfinite_view = "reduced"

    def __init__(self, named_params, options: SignSGDOptions, **kw):
        super().__init__(named_params, options, **kw)
        if options.scale == "tensor":
            self.offsets = [0]
            for n in self.numels:
                self.offsets.append(self.offsets[-1] + n)
        else:
            self.offsets = [0, self.numel]
        self.nbytes = [(b - a + 7) // 8 for a, b in zip(self.offsets, self.offsets[1:])]
        self._scales = None

    @classmethod
    def collectives(cls, shapes, world: int, options: SignSGDOptions, **_) -> list:
        """All_gather of the packed signs (ceil(d/8) bytes per segment) and of the fp32 scales."""
        from ..comm import Collective
        from .buckets import numel_of

        sizes = [numel_of(s) for s in shapes] if options.scale == "tensor" else [sum(numel_of(s) for s in shapes)]
        return [Collective("all_gather", sum((d + 7) // 8 for d in sizes), world),
                Collective("all_gather", 4 * len(sizes), world)]

    def describe(self, total_steps=None) -> str:
        """Attach's line: 1 bit per element plus the scales."""
        per = "tensor" if self.options.scale == "tensor" else "step (global)"
        ef = "on" if self.options.error_feedback else "off"
        return (f"{self.registered_name}: 1 bit per gradient element + one fp32 scale per {per}, all_gathered "
                f"({len(self.params)} tensors), error feedback {ef}, {self.traffic()}")

    def finish(self) -> None:
        buf = self._send_buffer()  # p = grad + e; the pack leaves the residual in it
        packed, scales = ops.sign_pack_segments(buf, self.offsets, residual=buf)  # every segment, one call
        if self.distributed:
            all_p = self.comm.all_gather(packed, "signsgd_bits")  # [n, bytes]
            all_s = self.comm.all_gather(scales, "signsgd_scales")  # [n, segments], stays on the device
        else:
            all_p, all_s = packed.unsqueeze(0), scales.unsqueeze(0)
        self._watch(all_s)
        out = self._output()
        for r in range(all_p.shape[0]):  # rank order, the same on every rank
            ops.sign_unpack_segments(all_p[r], all_s[r], self.offsets, out, accumulate=True)
        if self.world_size > 1:
            out.div_(self.world_size)
        self._write_back(out)
        self.iteration += 1
        self._scales = scales

    def stats(self) -> dict:
        """Read on logging steps only (the mean scale is a host read)."""
        if self._scales is None:
            return {}
        return {"bits_per_element": 8.0 * (sum(self.nbytes) + 4 * len(self.nbytes)) / self.numel,
                "mean_scale": float(self._scales.mean())}

    def state_dict(self) -> dict:
        return self._base_state()

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
