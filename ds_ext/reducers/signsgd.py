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

**Per bucket during backward** (``pipelined``, the default with ``scale: tensor``): the tensors are fused into
buckets as S-SGD's (``buckets.fuse_ordered`` on fp32 gradient bytes, reverse registration order, the first one
at most ``first_bucket_mb``, the others ``bucket_mb``). Each gradient is added into ``e`` in its ready hook
(``flat_overlap``); when a bucket's last gradient is in and every earlier bucket has launched, the bucket's
segments are packed (``sign_pack_segments`` on its segment offsets) and its two all_gathers are launched
asynchronously, from the thread that runs the gradient hooks, in bucket order on every rank. ``finish()``
launches what is left (a gradient no hook announced is read then), waits bucket by bucket and decodes as above.
The scale is per tensor, so a bucket's packed bits and scales are exactly that segment range of the
whole-model call (``sign_pack_segments`` is bit-equal to a loop over its segments) and the decode is the same
per-element arithmetic in the same rank order: results are bit-identical to ``pipelined: false`` (one pack,
one pair of all_gathers after backward; tests/dist/test_overlap.py compares them). ``scale: global`` has one
scale over every gradient, so it cannot start before the last one: it always takes the whole-model path.
"""
from __future__ import annotations

from typing import Literal

from typing import List, Sequence

import torch
from pydantic import AliasChoices, Field

from .. import ops
from ..registry import REDUCERS
from .base import GradientOptions, error_feedback_field
from .buckets import fuse_ordered
from .flat_overlap import OverlappedFlatReducer


class SignSGDOptions(GradientOptions):
    error_feedback: bool = error_feedback_field("EF-SignSGD: keep p - scale*sign(p) and add it to the next gradient")
    scale: Literal["tensor", "global"] = Field(
        "tensor", description="'tensor': one mean|p| scale per parameter tensor; 'global': one for all gradients")
    pipelined: bool = Field(True, description="pack and all_gather each bucket as its gradients become ready during "
                                              "backward (scale 'tensor'); false: everything after backward")
    bucket_mb: float = Field(25.0, gt=0, validation_alias=AliasChoices("bucket_mb", "fusion_threshold_mb"),
                             description="bucket size in MiB of fp32 gradient (pipelined)")
    first_bucket_mb: float = Field(1.0, gt=0, description="cap of the first bucket in MiB (pipelined; as S-SGD's)")


def bucket_groups(numels: Sequence[int], options: SignSGDOptions) -> List[List[int]]:
    """Parameter indices per bucket, in launch order (module docstring); one bucket of every tensor when the
    options say whole-model (``pipelined: false`` or ``scale: global``). The one statement of the layout the
    reducer and ``collectives`` (the cost model's bytes) share."""
    if not options.pipelined or options.scale != "tensor":
        return [list(reversed(range(len(numels))))] if numels else []
    return fuse_ordered([4 * n for n in numels], options.bucket_mb * 2**20, options.first_bucket_mb * 2**20)


@REDUCERS.register("signsgd", SignSGDOptions)
class SignSGDReducer(OverlappedFlatReducer):
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
        # per bucket (launch order): its parameters and its segment offsets; the whole-model path is one
        # bucket of every segment
        groups = bucket_groups(self.numels, options)
        whole = len(groups) == 1 and len(groups[0]) == len(self.params)
        self.bucket_offsets = [self.offsets] if whole else [self.offsets[min(g):max(g) + 2] for g in groups]
        self.bucket_of = {i: b for b, g in enumerate(groups) for i in g}
        self.bucket_size = [len(g) for g in groups]
        self.overlapped = options.pipelined and options.scale == "tensor"
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        self._ready = [0] * len(self.bucket_size)
        self._next = 0
        # per launched bucket: the (bits, scales) handles (or tensors) and this rank's packed bits and scales (the
        # inputs of the asynchronous all_gathers, held until they complete)
        self._sent: List[tuple] = []

    @classmethod
    def collectives(cls, shapes, world: int, options: SignSGDOptions, **_) -> list:
        """Per bucket, in launch order: all_gather of the packed signs (ceil(d/8) bytes per segment) and of the
        fp32 scales (one bucket of every tensor when not ``pipelined``)."""
        from ..comm import Collective
        from .buckets import numel_of

        numels = [numel_of(s) for s in shapes]
        if options.scale != "tensor":
            return [Collective("all_gather", (sum(numels) + 7) // 8, world), Collective("all_gather", 4, world)]
        out = []
        for g in bucket_groups(numels, options):
            out += [Collective("all_gather", sum((numels[i] + 7) // 8 for i in g), world),
                    Collective("all_gather", 4 * len(g), world)]
        return out

    def describe(self, total_steps=None) -> str:
        """Attach's line: 1 bit per element plus the scales."""
        per = "tensor" if self.options.scale == "tensor" else "step (global)"
        ef = "on" if self.options.error_feedback else "off"
        return (f"{self.registered_name}: 1 bit per gradient element + one fp32 scale per {per}, all_gathered "
                f"({len(self.params)} tensors{self._launch_note()}), error feedback {ef}, {self.traffic()}")

    def _launch_note(self) -> str:
        if self.overlapped:
            return f"; {len(self.bucket_size)} bucket(s) launched during backward"
        return "; sent after backward"

    # -- during backward: each bucket packed and launched when its gradients are in (module docstring) --------
    def _accumulated(self, i: int) -> None:
        if self.overlapped:
            self._ready[self.bucket_of[i]] += 1
            self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        while self._next < len(self.bucket_size) and (force or self._ready[self._next] == self.bucket_size[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        buf = self.error if self.error is not None else self._send  # p = grad + e on this bucket's range
        packed, scales = ops.sign_pack_segments(buf, self.bucket_offsets[b], residual=buf)
        if self.distributed:
            sent = (self.comm.all_gather(packed, "signsgd_bits", async_op=True),  # [n, bytes]
                    self.comm.all_gather(scales, "signsgd_scales", async_op=True))  # [n, segments], on the device
        else:
            sent = (packed.unsqueeze(0), scales.unsqueeze(0))
        self._sent.append((sent, packed, scales))

    # -- after backward ----------------------------------------------------------------------------------
    def finish(self) -> None:
        self._send_buffer()  # the gradients no hook announced
        self._launch_ready(force=True)
        out = self._output()
        for b, ((bits, scales), _, _) in enumerate(self._sent):  # launch order, the same on every rank
            all_p = bits.wait() if self.distributed else bits
            all_s = scales.wait() if self.distributed else scales
            self._watch(all_s)
            offs = self.bucket_offsets[b]
            for r in range(all_p.shape[0]):  # rank order, the same on every rank
                ops.sign_unpack_segments(all_p[r], all_s[r], offs, out, accumulate=True)
            if self.world_size > 1:
                out[offs[0]:offs[-1]].div_(self.world_size)
        self._write_back(out)
        self.iteration += 1
        local = [s for _, _, s in reversed(self._sent)]  # buckets run backwards: segments back in index order
        self._scales = local[0] if len(local) == 1 else torch.cat(local)
        self._reset_buckets()
        self._end_step()

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
