"""``allreduce``: S-SGD, the synchronous data-parallel baseline of every paper here.

Gradients are fused into ~``bucket_mb`` MiB flat buckets; each bucket's ``all_reduce`` is launched
asynchronously from the gradient-ready hooks as soon as the bucket is full (in bucket order), only
on the micro-batch that closes the accumulation window, so communication overlaps the rest of
backward (wait-free backpropagation, as torch DDP and Horovod do; DeepSpeed's own ZeRO-0 allreduce
runs after backward). The average is sum / world size in the gradient dtype, the same arithmetic as
DeepSpeed's ``buffered_allreduce_fallback`` with default settings. The buckets travel in DeepSpeed's
``communication_data_type`` (``engine.communication_data_type``: the gradient dtype unless the config
sets it): a bf16 model whose config asks for fp32 communication sends fp32 buckets, as DeepSpeed does
(then the cast to and from the wire dtype still copies each bucket).

Zero-copy: the gradients are views into the buckets (``buckets.BucketedCollective``, as DDP's
``gradient_as_bucket_view``). After ``finish()`` every ``p.grad`` is its slot of a bucket, so the average
is never copied back. Whether backward also writes straight into the bucket depends on what happens
to ``p.grad`` between steps: left in place and zeroed (``optimizer.zero_grad(set_to_none=False)``, the
benchmarks' loops) the next backward accumulates into the bucket and nothing is copied at all; set to
None, as DeepSpeed 0.19 does after every optimizer step in every configuration (``engine.zero_grad`` at
fp32 ZeRO-0, ``optimizer.zero_grad()`` with ``set_to_none=True`` for bf16/fp16 and ZeRO 1/2), autograd
hands over a fresh tensor and the ready hook copies it into the bucket once and rebinds ``p.grad``
(one copy instead of two; DDP does the same then).

On by default (option ``bucket_view``; ``false``: the copy path, every gradient copied into its bucket and
the result copied back). With views, the buckets' all_reduces, launched during backward, write into
``p.grad`` itself (on NCCL, in place on the communication stream). So that no compute-stream access to
``p.grad`` between the accumulation-boundary backward and ``engine.step()`` (hand-made clipping,
gradient-norm logging) can race with them (issue 27 N10), the reduction is completed at the end of that
backward, as DDP does: an autograd final callback flushes the buckets and waits for them (``work.wait()``:
on NCCL the compute stream waits for the communication stream, the host does not), so ``p.grad`` holds the
average once ``engine.backward`` returns, as with DeepSpeed's own reduction (run in ``engine.backward``'s
epilogue) and DDP; ``finish()`` then has nothing left to do. Where ``grad_ready`` is called outside a
backward pass (the hierarchical wrapper feeds it from its own ``finish``) the reduction completes in
``finish()``. The copy path instead keeps each rank's local gradient in ``p.grad`` until ``engine.step()``.
Nothing in ds_ext reads that local gradient: a gradient-driven order (D-GraB) takes each microbatch's
gradient from its own tensor hook, before accumulation into ``p.grad`` and before any bucket is filled
(``ds_ext/deepspeed/attach.py``), so its tables are the same either way (``tests/dist/test_order.py``).
Both paths give bit-identical results (``tests/dist/test_zero_copy.py``). The class attribute
``force_bucket_view`` (tests) overrides the option.

Buckets as DDP's (``buckets.py``, "Layout"): the first holds at most ``first_bucket_mb`` (1 MiB), the others
``bucket_mb``, filled in reverse registration order on the first step. That step records the order in which
the gradients of its boundary micro-batch became ready; rank 0's order is broadcast once (one control
collective in the run, unmetered) and every rank rebuilds its buckets in it, so the layout, and with it the
order of the collectives, is the same on every rank (autograd's order can differ between ranks). The order is
in ``state_dict()`` and restored on resume (no collective); a checkpoint without it (saved before the first
step, or by an older version) records it again on the first step after the resume. ``rebuild_buckets:
false`` keeps the first step's layout.
"""
from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from ..registry import REDUCERS
from .base import GradientOptions, Reducer, any_nonfinite
from .buckets import BucketedCollective, bucket_sizes


class AllreduceOptions(GradientOptions):
    bucket_mb: float = Field(25.0, gt=0, validation_alias=AliasChoices("bucket_mb", "fusion_threshold_mb"),
                             description="fusion bucket size in MiB of gradient (alias fusion_threshold_mb, as on "
                                         "acpsgd)")
    first_bucket_mb: float = Field(1.0, gt=0, description=(
        "cap of the first bucket in MiB (DDP's 1 MiB), so the first all_reduce starts early in backward"))
    bucket_view: bool = Field(True, description=(
        "gradients as views into the fusion buckets (zero-copy, as DDP's gradient_as_bucket_view); the reduction "
        "completes at the end of the boundary backward, so p.grad holds the mean when engine.backward returns; "
        "false: each gradient is copied into its bucket and back, p.grad keeps the local gradient until step"))
    rebuild_buckets: bool = Field(True, description=(
        "after the first step, rebuild the buckets in the measured gradient-ready order (rank 0's, broadcast "
        "once; kept in the checkpoint), as DDP"))


@REDUCERS.register("allreduce", AllreduceOptions)
class AllreduceReducer(Reducer):
    """S-SGD: bucketed asynchronous allreduce of gradients, overlapped with backward."""

    #: tests: force the views on (True) or off (False) whatever the option says; None: the option decides
    force_bucket_view = None
    #: a NaN / inf of any rank reaches the reduced buckets (a sum): the guard checks them (``base.Reducer``)
    nonfinite_view = "reduced"

    def __init__(self, named_params, options: AllreduceOptions, **kw):
        super().__init__(named_params, options, **kw)
        views = options.bucket_view if self.force_bucket_view is None else self.force_bucket_view
        self.fusion = BucketedCollective(self.params, int(options.bucket_mb * 2**20), self._launch, views=views,
                                         first_bytes=int(options.first_bucket_mb * 2**20))
        self.fusion.record = options.rebuild_buckets  # until the buckets are rebuilt in the ready order
        self._queued = self._completed = False
        self._reduced_flag = None

    def _launch(self, buf):
        return self.comm.all_reduce_mean(buf, "allreduce", async_op=True, wire=True)

    @classmethod
    def collectives(cls, shapes, world: int, options: AllreduceOptions, **_) -> list:
        """One all_reduce per bucket (fp32 gradients)."""
        from ..comm import Collective

        return [Collective("all_reduce", b, world)
                for b in bucket_sizes(shapes, options.bucket_mb, first_bucket_mb=options.first_bucket_mb)]

    def describe(self, total_steps=None) -> str:
        """Attach's line: every gradient averaged exactly, in buckets launched during backward."""
        from ..meter import human_bytes

        buckets = len(type(self).collectives([tuple(p.shape) for p in self.params], self.world_size, self.options))
        return (f"{self.registered_name}: every gradient averaged exactly, no compression ({len(self.params)} tensors "
                f"in {buckets} bucket(s) of <= {self.options.bucket_mb:g} MiB, launched during backward), "
                f"~{human_bytes(self.bytes_per_step())}/step")

    def grad_ready(self, p):
        self.fusion.ready(p)
        if self.fusion.views and not self._queued:  # complete at the end of this backward (module docstring)
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._complete)
                self._queued = True
            except RuntimeError:  # not inside a backward pass: finish() completes it
                pass

    def _complete(self):
        """The autograd final callback of the boundary backward (bucket views)."""
        self._queued = False
        self._reduce()
        self._completed = True

    def _reduce(self):
        self.fusion.flush()
        self.fusion.wait_and_unpack()  # the handles divide by the world size
        if self.fusion.record and self.fusion.ready_order is not None:  # the first window: rebuild (docstring)
            # the guard's check of this window reads the buckets that were reduced, not the new ones (on the copy
            # path those hold no gradient yet); once per run
            self._reduced_flag = any_nonfinite([b.buffer for b in self.fusion.buckets], self.comm.device)
            self._rebuild(self._agreed(self.fusion.ready_order))

    def _agreed(self, order) -> list:
        """Rank 0's ready order on every rank (one broadcast, once; a host read of it, once)."""
        t = self.comm.tensor(order, dtype=torch.int32)
        return self.comm.broadcast(t, 0).tolist()

    def _rebuild(self, order) -> None:
        self.fusion.record = False
        self.fusion.rebuild(order)

    def state_dict(self) -> dict:
        return {"bucket_order": self.fusion.order}

    def load_state_dict(self, state: dict) -> None:
        order = state.get("bucket_order")
        if order is not None:  # the layout the saved run had (same on every rank): no collective
            self._rebuild(order)

    def nonfinite_flag(self):
        """The reduced buckets (the mean, identical on every rank after ``finish``) hold a NaN or inf."""
        if self._reduced_flag is not None:  # the window that rebuilt the buckets (_reduce)
            flag, self._reduced_flag = self._reduced_flag, None
            return flag
        return any_nonfinite([b.buffer for b in self.fusion.buckets], self.comm.device)

    def finish(self):
        if self._completed:  # done at the end of backward (bucket views)
            self._completed = False
            return
        self._reduce()
