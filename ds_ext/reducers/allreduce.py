"""``allreduce``: S-SGD, the synchronous data-parallel baseline of every paper here.

Gradients are fused into ~``bucket_mb`` MiB flat buckets; each bucket's ``all_reduce`` is launched
asynchronously from the gradient-ready hooks as soon as the bucket is full (in bucket order), only
on the micro-batch that closes the accumulation window, so communication overlaps the rest of
backward (wait-free backpropagation, as torch DDP and Horovod do; DeepSpeed's own ZeRO-0 allreduce
runs after backward). The average is sum / world size in the gradient dtype, the same arithmetic as
DeepSpeed's ``buffered_allreduce_fallback`` with default settings.
"""
from __future__ import annotations

import torch.distributed as dist
from pydantic import Field

from ..registry import REDUCERS, Options
from .base import Reducer
from .buckets import BucketedCollective


class AllreduceOptions(Options):
    bucket_mb: float = Field(25.0, gt=0, description="fusion bucket size in MiB of gradient")


@REDUCERS.register("allreduce", AllreduceOptions)
class AllreduceReducer(Reducer):
    """S-SGD: bucketed asynchronous allreduce of gradients, overlapped with backward."""

    def __init__(self, named_params, options: AllreduceOptions, **kw):
        super().__init__(named_params, options, **kw)
        self.fusion = BucketedCollective(self.params, int(options.bucket_mb * 2**20), self._launch)

    def _launch(self, buf):
        self._count("allreduce", buf)
        return dist.all_reduce(buf, group=self.group, async_op=True)

    def grad_ready(self, p):
        self.fusion.ready(p)

    def finish(self):
        self.fusion.flush()
        self.fusion.wait_and_unpack(lambda buf: buf.div_(self.world_size))
