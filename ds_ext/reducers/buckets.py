"""Tensor fusion: parameters grouped into flat buckets of about ``bucket_mb`` MiB.

Buckets are filled in reverse registration order (about the order in which backward produces
gradients) and kept per dtype/device. A bucket's collective is *launched in bucket order only*: a
full bucket waits until all earlier buckets have been launched. Every rank therefore issues the same
collectives in the same order even when autograd finishes parameters in a slightly different order,
or a parameter receives no gradient on some rank (its slot is zero-filled at ``finish``).

**Gradients as bucket views** (``views=True``, as torch DDP's ``gradient_as_bucket_view``): every
parameter whose layout is dense (contiguous, channels-last, any non-overlapping dense strides) owns a
``p``-shaped alias of its slot in the bucket (made with ``Tensor.set_`` on the bucket's storage, so it
is not an autograd view and DeepSpeed's ``p.grad.detach_()`` works on it). When a gradient is ready:

* ``p.grad`` already *is* that alias (same data pointer, same strides: a host-side metadata check,
  nothing is read from the device): backward accumulated straight into the bucket, nothing is copied;
* otherwise (``p.grad`` was set to None and autograd allocated a fresh tensor, as DeepSpeed's
  ``zero_grad`` does after every optimizer step, or someone replaced it): the gradient is copied into
  the slot once and ``p.grad`` is rebound to the alias (the fresh tensor is freed).

After the collective the result is already in ``p.grad``: nothing is copied back. A parameter that
produced no gradient gets its zero-filled slot as ``p.grad``. A parameter with a non-dense layout
(overlapping or gapped strides) keeps the copy path: copied in, copied back. ``views=False`` is the
copy path for every parameter (bit-identical results).

With views, a gradient written into a bucket after its collective was launched (a second backward
inside the same boundary micro-batch) would race with the collective; the copy path ignored such a
late gradient (it was overwritten by the copy back). Neither is supported: one backward per micro-batch.

**Layout** (as torch DDP's reducer): the first bucket is small (``first_bytes``, DDP's 1 MiB), so the
link starts almost as soon as backward does; the others hold up to ``bucket_bytes``. The first cap
applies until the closed buckets hold more than it: the tensor that did not fit into the first bucket
starts a second one under the same cap, alone when it is larger (ResNet-50: ``fc.bias`` 4 KB, then
``fc.weight`` 8.2 MB alone, then 25 MiB buckets; DDP's first bucket is those two together, closed at the
tensor that reaches 1 MiB). ``fuse_ordered`` is the rule on sizes alone. The fill order is reverse
registration order until ``rebuild(order)`` is given another one: the order in which the gradients
became ready (``ready_order``, recorded while ``record`` is set), as DDP rebuilds its buckets after the
first iteration. ``rebuild`` moves gradients that are bucket views into the new buckets (one copy each,
once). The arithmetic of each element (sum over ranks, then division) does not depend on the layout;
with ring algorithms over 3 or more ranks the order in which the ranks' values are added can depend on
the element's position in its bucket (last-bit differences), so exact resume restores the layout.
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
        self.slots: List[torch.Tensor] = []  # 1-D views of the buffer, one per parameter
        self.aliases: List[Optional[torch.Tensor]] = []  # p-shaped aliases of the slots (None: copy path)
        self.ptrs: List[int] = []  # data pointer of each slot
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


def dense_strides(t: torch.Tensor) -> Optional[tuple]:
    """``t``'s strides when its elements fill ``t.numel()`` consecutive memory slots exactly once
    (contiguous, channels-last, any permutation of a dense layout), else None. A gradient with these
    strides can live in a bucket slot of ``t.numel()`` elements."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return None
        expected *= sz
    return tuple(t.stride())


def _alias(buffer: torch.Tensor, offset: int, p: torch.Tensor) -> Optional[torch.Tensor]:
    """A ``p``-shaped tensor over ``buffer[offset:offset + p.numel()]`` with ``p``'s strides, sharing the
    storage but not an autograd view (``detach_()`` is allowed on it), or None if ``p`` is not dense."""
    strides = dense_strides(p)
    if strides is None or p.numel() == 0:
        return None
    t = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
    return t.set_(buffer.untyped_storage(), buffer.storage_offset() + offset, tuple(p.shape), strides)


def fuse_reverse(sizes: Sequence[float], cap: float) -> List[List[int]]:
    """The fusion rule, on sizes alone: indices into ``sizes`` grouped greedily in reverse order, a
    group closed when the next size would take it past ``cap`` (so a size larger than ``cap`` is a group
    of its own). ACP-SGD's fusion groups (``lowrank.greedy_groups``) and the cost model's buckets use it;
    ``build_buckets`` applies the same rule separately per dtype/device."""
    return fuse_ordered(sizes, cap)


def numel_of(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def fuse_ordered(sizes: Sequence[float], cap: float, first_cap: Optional[float] = None,
                 order: Optional[Sequence[int]] = None) -> List[List[int]]:
    """The bucket rule of ``build_buckets`` on sizes alone: indices into ``sizes`` taken in ``order`` (default:
    reverse order), a bucket closed when the next size would take it past its cap. The cap is
    ``min(first_cap, cap)`` until the closed buckets hold more than that together, then ``cap`` (module
    docstring, "Layout"); a size larger than the cap is a bucket of its own. ``first_cap=None`` and the default
    order: exactly ``fuse_reverse``."""
    first = cap if first_cap is None else min(first_cap, cap)
    groups: List[List[int]] = []
    cur: List[int] = []
    acc = closed = 0
    for i in (reversed(range(len(sizes))) if order is None else order):
        if cur and acc + sizes[i] > (first if closed <= first else cap):
            groups.append(cur)
            closed += acc
            cur, acc = [], 0
        cur.append(i)
        acc += sizes[i]
    if cur:
        groups.append(cur)
    return groups


def bucket_sizes(shapes: Sequence[Sequence[int]], bucket_mb: float, elem: int = 4,
                 first_bucket_mb: Optional[float] = None) -> List[int]:
    """Bytes per bucket for parameters of these shapes (one dtype of ``elem`` bytes): ``build_buckets``'s
    rule on sizes alone, in reverse order (the layout of the first step; ``fuse_ordered``)."""
    sizes = [numel_of(shp) * elem for shp in shapes]
    first = None if first_bucket_mb is None else int(first_bucket_mb * 2**20)
    return [sum(sizes[i] for i in g) for g in fuse_ordered(sizes, int(bucket_mb * 2**20), first)]


def build_buckets(params: List[torch.nn.Parameter], bucket_bytes: int, first_bytes: Optional[int] = None,
                  order: Optional[Sequence[int]] = None) -> List[Bucket]:
    """``fuse_ordered``'s rule applied separately per dtype/device, parameters taken in ``order`` (indices into
    ``params``; default reverse order); buckets numbered in the order they close."""
    first = bucket_bytes if first_bytes is None else min(first_bytes, bucket_bytes)
    open_: Dict[tuple, List[torch.nn.Parameter]] = {}
    sizes: Dict[tuple, int] = {}
    closed: Dict[tuple, int] = {}
    groups: List[List[torch.nn.Parameter]] = []
    for k in (reversed(range(len(params))) if order is None else order):
        p = params[k]
        key = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        done = closed.get(key, 0)
        if open_.get(key) and sizes[key] + nbytes > (first if done <= first else bucket_bytes):
            groups.append(open_.pop(key))
            closed[key] = done + sizes[key]
        if key not in open_:
            open_[key], sizes[key] = [], 0
        open_[key].append(p)
        sizes[key] += nbytes
    groups.extend(g for g in open_.values() if g)
    return [Bucket(i, g) for i, g in enumerate(groups)]


class BucketedCollective:
    """Gathers ready gradients into bucket buffers and launches ``launch(buffer)`` per bucket in order.

    ``views`` (default): gradients become views into the buckets (module docstring); False: every
    gradient is copied into its bucket and the result copied back. ``first_bytes``: the cap of the first
    bucket (None: ``bucket_bytes``); ``order``: the fill order (indices into ``params``; default reverse).
    ``copied`` / ``in_place``: how many gradients the last completed window (``wait_and_unpack``) copied into
    a bucket / found already there (host-side counters, for tests and benchmarks). With ``record`` set, each
    window notes the order in which its gradients became ready (``ready_order`` after ``wait_and_unpack``:
    indices into ``params``, the ones that never became ready last, in bucket order)."""

    def __init__(self, params: List[torch.nn.Parameter], bucket_bytes: int,
                 launch: Callable[[torch.Tensor], object], views: bool = True, first_bytes: Optional[int] = None,
                 order: Optional[Sequence[int]] = None):
        self.params = list(params)
        self.index = {p: k for k, p in enumerate(self.params)}
        self.bucket_bytes, self.first_bytes = bucket_bytes, first_bytes
        self.views = views
        self.launch_fn = launch
        self.record = False
        self.ready_order: Optional[List[int]] = None
        self._seen: List[int] = []
        self.copied = self.in_place = 0
        self._copied = self._in_place = 0  # of the current window
        self._layout(order)

    def _layout(self, order: Optional[Sequence[int]]) -> None:
        if order is not None and sorted(order) != list(range(len(self.params))):
            raise ValueError(f"bucket order: expected a permutation of the {len(self.params)} parameter indices, got "
                             f"{len(order)} indices")
        self.order = None if order is None else [int(k) for k in order]
        self.buckets = build_buckets(self.params, self.bucket_bytes, self.first_bytes, self.order)
        self.where = {}
        for b in self.buckets:
            b.buffer = torch.empty(b.numel, dtype=b.dtype, device=b.device)
            for i, p in enumerate(b.params):
                self.where[p] = (b, i)
                slot = b.buffer.narrow(0, b.offsets[i], p.numel())
                b.slots.append(slot)
                b.ptrs.append(slot.data_ptr())
                b.aliases.append(_alias(b.buffer, b.offsets[i], p) if self.views else None)
        self.next_launch = 0
        if self.views:  # gradients that exist already move into their buckets now (as DDP does at construction)
            for b in self.buckets:
                for i, p in enumerate(b.params):
                    if p.grad is not None and b.aliases[i] is not None:
                        b.aliases[i].copy_(p.grad)
                        p.grad = b.aliases[i]

    def rebuild(self, order: Sequence[int]) -> None:
        """New buckets filled in ``order`` (indices into ``params``, e.g. a measured ``ready_order``), between two
        windows (nothing in flight); gradients that exist move into them (views: one copy each, once)."""
        if any(b.launched or b.filled for b in self.buckets):
            raise RuntimeError("bucket rebuild inside a window (a bucket is filled or launched)")
        self._layout(order)

    def _buffer(self, b: Bucket) -> torch.Tensor:
        return b.buffer

    def _slot(self, b: Bucket, i: int) -> torch.Tensor:
        return b.slots[i]

    def is_view(self, p: torch.nn.Parameter) -> bool:
        """Whether ``p.grad`` is ``p``'s alias into its bucket (host-side metadata only)."""
        b, i = self.where[p]
        return self._is_alias(b, i, p.grad)

    @staticmethod
    def _is_alias(b: Bucket, i: int, g: Optional[torch.Tensor]) -> bool:
        alias = b.aliases[i]
        return (alias is not None and g is not None and g.data_ptr() == b.ptrs[i] and g.dtype == b.dtype
                and g.device == b.device and g.stride() == alias.stride())

    def _take(self, b: Bucket, i: int, p: torch.nn.Parameter) -> None:
        """``p``'s gradient into slot ``i`` (nothing to do if it is already there); missing: zeros."""
        g = p.grad
        alias = b.aliases[i]
        if alias is None:  # copy path
            if g is None:
                b.slots[i].zero_()
            else:
                b.slots[i].copy_(g.reshape(-1))
                self._copied += 1
            return
        if self._is_alias(b, i, g):
            self._in_place += 1
            return
        if g is None:
            alias.zero_()
        else:
            alias.copy_(g)
            self._copied += 1
        p.grad = alias

    def ready(self, p: torch.nn.Parameter) -> None:
        b, i = self.where[p]
        if i in b.filled or b.launched:
            return
        self._take(b, i, p)
        b.filled.add(i)
        if self.record:
            self._seen.append(self.index[p])
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
                    self._take(b, i, p)
                    b.filled.add(i)
                    if self.record:
                        self._seen.append(self.index[p])
        self._launch_ready()

    def wait_and_unpack(self, post: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            if post is not None:
                post(b.buffer)
            for i, p in enumerate(b.params):
                alias = b.aliases[i]
                if alias is not None:  # the result is in the bucket, which p.grad is (or becomes) a view of
                    if not self._is_alias(b, i, p.grad):
                        p.grad = alias
                    continue
                view = b.slots[i].view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
            b.reset()
        self.next_launch = 0
        self.copied, self.in_place = self._copied, self._in_place
        self._copied = self._in_place = 0
        if self.record:
            self.ready_order, self._seen = self._seen, []
