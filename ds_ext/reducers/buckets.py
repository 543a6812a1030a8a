"""Tensor fusion: parameters grouped into flat buckets of about ``bucket_mb`` MiB.

Buckets are filled in reverse registration order (about the order in which backward produces
gradients) and kept per dtype/device. A bucket's collective is *launched in bucket order only*: a
full bucket waits until all earlier buckets have been launched. Every rank therefore issues the same
collectives in the same order even when autograd finishes parameters in a slightly different order,
or a parameter receives no gradient on some rank (its slot is zero-filled at ``finish``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch


class Bucket:
    def __init__(self, index: int, params: List[torch.nn.Parameter]):
        self.index = index
        self.params = params
        self.offsets = []
        off = 0
        for p in params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.buffer: Optional[torch.Tensor] = None
        self.filled = set()
        self.work = None
        self.launched = False

    def reset(self):
        self.filled.clear()
        self.work = None
        self.launched = False

    @property
    def full(self) -> bool:
        return len(self.filled) == len(self.params)


def fuse_reverse(sizes: Sequence[float], cap: float) -> List[List[int]]:
    """The fusion rule, on sizes alone: indices into ``sizes`` grouped greedily in reverse order, a
    group closed when the next size would take it past ``cap`` (so a size larger than ``cap`` is a group
    of its own). ACP-SGD's fusion groups (``lowrank.greedy_groups``) and the cost model's buckets use it;
    ``build_buckets`` applies the same rule separately per dtype/device."""
    groups: List[List[int]] = []
    cur: List[int] = []
    acc = 0
    for i in reversed(range(len(sizes))):
        if cur and acc + sizes[i] > cap:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(i)
        acc += sizes[i]
    if cur:
        groups.append(cur)
    return groups


def numel_of(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def bucket_sizes(shapes: Sequence[Sequence[int]], bucket_mb: float, elem: int = 4) -> List[int]:
    """Bytes per bucket for parameters of these shapes (one dtype of ``elem`` bytes): ``build_buckets``'s
    rule on sizes alone (greedy in reverse order, a tensor larger than the cap alone)."""
    sizes = [numel_of(shp) * elem for shp in shapes]
    return [sum(sizes[i] for i in g) for g in fuse_reverse(sizes, int(bucket_mb * 2**20))]


def build_buckets(params: List[torch.nn.Parameter], bucket_bytes: int) -> List[Bucket]:
    """Greedy fusion in reverse order; a tensor larger than the cap gets a bucket of its own."""
    open_: Dict[tuple, List[torch.nn.Parameter]] = {}
    sizes: Dict[tuple, int] = {}
    groups: List[List[torch.nn.Parameter]] = []
    for p in reversed(params):
        key = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        if open_.get(key) and sizes[key] + nbytes > bucket_bytes:
            groups.append(open_.pop(key))
        if key not in open_:
            open_[key], sizes[key] = [], 0
        open_[key].append(p)
        sizes[key] += nbytes
    groups.extend(g for g in open_.values() if g)
    return [Bucket(i, g) for i, g in enumerate(groups)]


class BucketedCollective:
    """Copies ready gradients into bucket buffers and launches ``launch(buffer)`` per bucket in order."""

    def __init__(self, params: List[torch.nn.Parameter], bucket_bytes: int,
                 launch: Callable[[torch.Tensor], object]):
        self.buckets = build_buckets(params, bucket_bytes)
        self.where = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self.where[p] = (b, i)
        self.launch_fn = launch
        self.next_launch = 0

    def _buffer(self, b: Bucket) -> torch.Tensor:
        if b.buffer is None:
            b.buffer = torch.empty(b.numel, dtype=b.dtype, device=b.device)
        return b.buffer

    def _slot(self, b: Bucket, i: int) -> torch.Tensor:
        p = b.params[i]
        return self._buffer(b)[b.offsets[i]:b.offsets[i] + p.numel()]

    def ready(self, p: torch.nn.Parameter) -> None:
        b, i = self.where[p]
        if i in b.filled or b.launched:
            return
        self._slot(b, i).copy_(p.grad.reshape(-1))
        b.filled.add(i)
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].full:
            b = self.buckets[self.next_launch]
            b.work = self.launch_fn(b.buffer)
            b.launched = True
            self.next_launch += 1

    def flush(self) -> None:
        """Zero-fill slots of parameters that produced no gradient, launch everything left, in order."""
        for b in self.buckets[self.next_launch:]:
            for i, p in enumerate(b.params):
                if i not in b.filled:
                    slot = self._slot(b, i)
                    if p.grad is None:
                        slot.zero_()
                    else:
                        slot.copy_(p.grad.reshape(-1))
                    b.filled.add(i)
        self._launch_ready()

    def wait_and_unpack(self, post: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            if post is not None:
                post(b.buffer)
            for i, p in enumerate(b.params):
                view = self._slot(b, i).view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
            b.reset()
        self.next_launch = 0
