"""``half``: gradients sent in half precision, PyTorch DDP's ``fp16_compress_hook`` / ``bf16_compress_hook``.

Not one of the five papers' methods: the simplest gradient compression, kept as a baseline a DDP user
knows. The gradients are fused into the same buckets as ``allreduce`` (``buckets.BucketedCollective``,
filled from the gradient-ready hooks, launched during backward, in bucket order). Per bucket ``b`` of
fp32 (or bf16) gradients on W ranks:

    s = cast(b, dtype) / W          (in ``dtype``: the division first keeps fp16 sums in range)
    s = sum over ranks of s         (one ``all_reduce``, kind ``half``)
    b = cast(s, b.dtype)            (back into the gradients)

which is the hook's arithmetic (``buffer.to(dtype).div_(world_size)``, all_reduce, ``buffer.copy_``),
so with the same inputs the result equals DDP's bit for bit wherever the summation order is the same (2
ranks always; ``tests/dist/test_half_reducer.py``). The payload per step is 2 bytes per element instead of 4.

Deliberate differences from the hook: ``dtype`` is an option of one method, not two hooks; the buckets
are ds_ext's (``bucket_mb``, as ``allreduce``), not DDP's; DeepSpeed's ``communication_data_type`` is not
consulted (choosing the wire dtype is this method's whole job). No state is carried between steps (no
error feedback), so exact resume needs nothing and DeepSpeed's fp16 loss scaling is accepted. A value
that overflows fp16 after the division becomes inf on every rank: the non-finite guard skips that step
(``bf16`` has fp32's range).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..comm import Collective, Handle
from ..registry import REDUCERS
from .allreduce import AllreduceOptions, AllreduceReducer
from .buckets import bucket_sizes

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfOptions(AllreduceOptions):
    dtype: Literal["fp16", "bf16"] = Field("fp16", description=(
        "wire dtype of the gradients: fp16 (DDP's fp16_compress_hook) or bf16 (bf16_compress_hook)"))


@REDUCERS.register("half", HalfOptions)
class HalfReducer(AllreduceReducer):
    """Half-precision gradient allreduce (DDP's fp16/bf16 compress hooks), bucketed, during backward."""

    #: what the cost model prices and the benchmarks run (ds_ext/costmodel/presets.py ``declared_presets``)
    preset = {"label": "fp16 allreduce", "options": {"dtype": "fp16"}, "overlaps_backward": True}

    def __init__(self, named_params, options: HalfOptions, **kw):
        self.wire = _DTYPES[options.dtype]
        super().__init__(named_params, options, **kw)

    def _launch(self, buf: torch.Tensor) -> Handle:
        send = buf.to(self.wire).div_(self.comm.world_size)
        work = self.comm.all_reduce(send, "half", async_op=True)
        return Handle(work, buf, post=lambda: buf.copy_(send))

    def describe(self, total_steps=None) -> str:
        """Attach's line: the buckets sent in fp16 / bf16."""
        return (f"{self.registered_name} {self.options.dtype}: every gradient averaged in {self.options.dtype} on the "
                f"wire ({len(self.params)} tensors, bucketed, during backward), {self.traffic()}")

    @classmethod
    def collectives(cls, shapes, world: int, options: HalfOptions, **_) -> list:
        """One all_reduce per bucket, 2 bytes per fp32 gradient element."""
        return [Collective("all_reduce", b // 2, world)
                for b in bucket_sizes(shapes, options.bucket_mb, first_bucket_mb=options.first_bucket_mb)]
