"""PowerSGD per fusion group during backward: the ``pipelined`` path of ``lowrank.PowerSGDReducer``.

The method is Vogels et al. 2019, Algorithm 1, with epfml's ``RankKReducer`` semantics (``lowrank``'s module
docstring), applied to each fusion group on its own, as PyTorch's ``powerSGD_hook`` applies it to each DDP
bucket. Groups are ``fuse_reverse`` over the parameters' element counts, capped at ``bucket_mb`` MiB of fp32
gradient (reverse registration order, about the order in which backward produces gradients; a tensor larger
than the cap is a group of its own); because every shape class is ordered by descending parameter index, a
group covers a contiguous row range of each class (``lowrank._LowRankBase._slices``).

The schedule, every launch from the thread that runs the gradient hooks (never from a completion callback), in
one fixed order on every rank:

* group k *launches* when all its gradients are ready and groups 0..k-1 have launched (``grad_ready``; as
  ``buckets.BucketedCollective._launch_ready``): M = G + E for its matrices (in place into E), P = M Q with the
  warm-started Q, and the async all_reduce of [P factors, the group's uncompressed tensors];
* right after, group k-1's P is waited for (it was launched one group earlier, so it had the time group k took to
  fill), averaged and orthogonalised, Q = M^T P is computed and its async all_reduce launched;
* ``finish()`` (after backward) launches what is left (a group whose gradient never came is read as zeros, as
  the serial path does), then the last group's Q, and then, group by group in launch order, waits for Q, keeps
  the aggregated factors, updates E = M - P Q^T and writes P Q^T (and the uncompressed means) into ``p.grad``.

Issue order: P0, P1, Q0, P2, Q1, ..., P(G-1), Q(G-2) during backward, Q(G-1) after it. ``p.grad`` is written only
in ``finish()``. Before ``start_powerSGD_iter`` every group is a plain async all_reduce of its gradients, launched
the same way.

**Same results as the serial path** (``pipelined: false``, everything in ``finish()``, one P and one Q all_reduce
for the whole model): each element is computed by the same operations on the same inputs, only batched per group
slice instead of per whole shape class (bmm, baddbmm, QR and the norm act on each matrix independently) and
placed at another offset of another buffer. The all_reduce sums are therefore identical wherever the sum of an
element does not depend on its position in the buffer: two ranks (a + b), the loopback world (rank order).
Deliberate deviation, bounded: with more than two ranks gloo's and NCCL's ring algorithms add an element's
contributions in an order that depends on the chunk it falls in, so the two paths may differ by the reordering of
a W-term fp32 sum, at most (W - 1) eps sum_i |x_i| per element -- the variation every bucketed all_reduce has,
PyTorch's per-bucket hook included. On rank 1 with a norm of 32768 or more elements in one matrix slice of a
single matrix, PyTorch may split that norm over threads (its two-pass reduction): one rounding, relative 1e-7.
tests/dist/test_lowrank.py compares both paths bit for bit.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ..comm import host_to_device
from .buckets import fuse_reverse
from .lowrank_common import _accumulate, _decompress, _flat_grad, _Meta, _seeded_randn, _write_grad, orthogonalize


class Group(NamedTuple):
    """A fusion group: its members, its class slices with their offsets in the P and in the Q buffer, its
    uncompressed tensors with their offsets in the P buffer (after the factors), and the buffer sizes."""
    metas: List[_Meta]
    slices: List[tuple]  # (lowrank.ClassSlice, offset in the P buffer, offset in the Q buffer)
    plain: List[Tuple[_Meta, int]]
    p_total: int
    q_total: int


def group_sizes(dims, compressed, cap_elements: float) -> Tuple[List[List[int]], List[int], List[int]]:
    """The fusion groups (indices, ``fuse_reverse`` over the element counts) and, per group, the elements of its
    P all_reduce (n r per compressed matrix, the whole tensor otherwise) and of its Q all_reduce (m r per
    compressed matrix). ``dims``: ``lowrank.matrix_dims`` per parameter. The one statement of the layout the
    reducer and ``PowerSGDReducer.collectives`` (the cost model's bytes) share."""
    groups = fuse_reverse([d[3] for d in dims], cap_elements)
    p = [sum(dims[i][0] * dims[i][2] if compressed[i] else dims[i][3] for i in g) for g in groups]
    q = [sum(dims[i][1] * dims[i][2] for i in g if compressed[i]) for g in groups]
    return groups, p, q


def launch_order(p: List[int], q: List[int]) -> List[Tuple[str, int]]:
    """``(phase, group)`` in issue order: P0, P1, Q0, P2, Q1, ..., Q(G-1); a group without compressed matrices
    has no Q all_reduce."""
    out: List[Tuple[str, int]] = []
    for k in range(len(p)):
        out.append(("p", k))
        if k and q[k - 1]:
            out.append(("q", k - 1))
    if p and q[-1]:
        out.append(("q", len(p) - 1))
    return out


class PowerSGDPipeline:
    """The per-group schedule of one ``PowerSGDReducer`` (module docstring). Holds no state across steps: E, P and
    Q stay the reducer's batched class tensors (``_ShapeClass``), so ``state_dict`` is the serial path's."""

    def __init__(self, red):
        self.red = red
        cap = red.options.bucket_mb * 2**20 / 4  # fp32 elements
        self.groups = [self._group([red.metas[i] for i in g])
                       for g in fuse_reverse([m.p.numel() for m in red.metas], cap)]
        self.where: Dict[int, int] = {id(m.p): gi for gi, g in enumerate(self.groups) for m in g.metas}
        self._reset()

    def _group(self, metas: List[_Meta]) -> Group:
        slices, off_p, off_q = [], 0, 0
        for part in self.red._slices(metas):
            n, m, r = part.cls.key
            slices.append((part, off_p, off_q))
            off_p += (part.b - part.a) * n * r
            off_q += (part.b - part.a) * m * r
        plain = []
        for m in metas:
            if not m.compressed:
                plain.append((m, off_p))
                off_p += m.p.numel()
        return Group(metas, slices, plain, off_p, off_q)

    def _reset(self) -> None:
        self.ready_count = [0] * len(self.groups)
        self.seen = set()
        self.next_launch = 0
        self.compressing: Optional[bool] = None  # decided when the step's first group launches
        self.sent_p: List[Optional[tuple]] = [None] * len(self.groups)  # (buffer, handle)
        self.sent_q: List[Optional[tuple]] = [None] * len(self.groups)

    # -- during backward -------------------------------------------------------------------------------
    def ready(self, p) -> None:
        gi = self.where[id(p)]
        if id(p) in self.seen:
            return
        self.seen.add(id(p))
        self.ready_count[gi] += 1
        self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        if self.compressing is None:  # this step's number is the reducer's count + 1 (finish() increments it)
            self.compressing = self.red.steps + 1 > self.red.options.start_powerSGD_iter
        while self.next_launch < len(self.groups) and (
                force or self.ready_count[self.next_launch] == len(self.groups[self.next_launch].metas)):
            k = self.next_launch
            if self.compressing:
                self._start_p(k)
                if k:
                    self._start_q(k - 1)
            else:
                self._start_plain(k)
            self.next_launch += 1

    def _start_plain(self, k: int) -> None:
        """Before ``start_powerSGD_iter``: the group's gradients, flat, all_reduced exactly."""
        g = self.groups[k]
        buf = torch.cat([_flat_grad(m) for m in g.metas])
        self.sent_p[k] = (buf, self.red._allreduce(buf, "allreduce", async_op=True))

    def _start_p(self, k: int) -> None:
        """M = G (+ E) into E, P = M Q (warm-started Q, or fresh seeded factors) into the P buffer with the
        uncompressed tensors behind, and its async all_reduce."""
        red, g, o = self.red, self.groups[k], self.red.options
        buf = torch.empty(g.p_total, dtype=torch.float32, device=g.metas[0].p.device)
        for (c, a, b, ms), off, _ in g.slices:
            n, m, r = c.key
            _accumulate(c.E[a:b], ms, o.error_feedback)  # E now holds M (+ E)
            if not o.warm_start:  # the serial path's seeds: (seed + this step, 2 index + 1)
                c.Q[a:b].copy_(host_to_device(torch.stack([_seeded_randn((m, r), o.seed + red.steps + 1,
                                                                         2 * mt.index + 1) for mt in ms]), c.Q.device))
            torch.bmm(c.E[a:b], c.Q[a:b], out=buf[off:off + (b - a) * n * r].view(b - a, n, r))
        for mt, off in g.plain:
            buf[off:off + mt.p.numel()].copy_(_flat_grad(mt))
        self.sent_p[k] = (buf, red._allreduce(buf, "powersgd_p", async_op=True))

    def _start_q(self, k: int) -> None:
        """Group k's P back: its mean, orthogonalised into the class P; Q = M^T P and its async all_reduce."""
        red, g = self.red, self.groups[k]
        buf, work = self.sent_p[k]
        work.wait()
        buf.div_(red.world_size)
        if not g.slices:
            return
        eps = red.options.orthogonalization_epsilon
        q = torch.empty(g.q_total, dtype=torch.float32, device=buf.device)
        for (c, a, b, _), off_p, off_q in g.slices:
            n, m, r = c.key
            c.P[a:b].copy_(orthogonalize(buf[off_p:off_p + (b - a) * n * r].view(b - a, n, r), eps))
            torch.bmm(c.E[a:b].transpose(1, 2), c.P[a:b], out=q[off_q:off_q + (b - a) * m * r].view(b - a, m, r))
        self.sent_q[k] = (q, red._allreduce(q, "powersgd_q", async_op=True))

    # -- after backward ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """Launch what is left (in order), then per group in launch order: wait, keep the aggregated Q, update E,
        write the gradients. Every group's P wait happens in ``_start_q`` (the last one's here)."""
        self._launch_ready(force=True)
        if self.compressing and self.groups:
            self._start_q(len(self.groups) - 1)
        for k, g in enumerate(self.groups):
            if not self.compressing:
                buf, work = self.sent_p[k]
                work.wait()
                buf.div_(self.red.world_size)
                self._unpack(g.metas, buf, 0)
                continue
            self._finish_group(k)
        self._reset()

    def _finish_group(self, k: int) -> None:
        red, g = self.red, self.groups[k]
        for mt, off in g.plain:
            _write_grad(mt, self.sent_p[k][0][off:off + mt.p.numel()])
        if self.sent_q[k] is None:
            return
        q, work = self.sent_q[k]
        work.wait()
        q.div_(red.world_size)
        for (c, a, b, ms), _, off in g.slices:
            n, m, r = c.key
            c.Q[a:b].copy_(q[off:off + (b - a) * m * r].view(b - a, m, r))
            if red.options.error_feedback:
                c.E[a:b].baddbmm_(c.P[a:b], c.Q[a:b].transpose(1, 2), alpha=-1.0)  # E = M - P Q^T (aggregated)
            _decompress(ms, c.P[a:b], c.Q[a:b])

    @staticmethod
    def _unpack(metas: List[_Meta], flat: torch.Tensor, off: int) -> None:
        for mt in metas:
            _write_grad(mt, flat[off:off + mt.p.numel()])
            off += mt.p.numel()
