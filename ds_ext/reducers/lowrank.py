"""Low-rank gradient compression: ``powersgd`` and ``acpsgd``.

PowerSGD -- Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", NeurIPS 2019, Algorithm 1 (rank-r power iteration with error feedback and
warm start), with the semantics of epfml/powersgd ``paper-code/gradient_reducers.py: RankKReducer``:

    M = G + E;  P = M Q;  allreduce-mean P;  P = orth(P);  Q = M^T P;  allreduce-mean Q
    G~ = P Q^T;  E = M - G~  (error against the *aggregated* approximation)

ACP-SGD -- Lin Zhang et al., "Evaluation and Optimization of Gradient Compression for Distributed
Deep Learning", ICDCS 2023 (alternating PowerSGD), as ``lzhangbv/powersgd: acpsgd.py`` implements it:
P-steps and Q-steps alternate, one matmul and one allreduce per step:

    P-step:  Q = orth(Q_prev);  P = (M + E) Q;    E = (M + E) - P Q^T   (local P);  allreduce-mean P
    Q-step:  P = orth(P_prev);  Q = (M + E)^T P;  E = (M + E) - P Q^T   (local Q);  allreduce-mean Q
    G~ = P Q^T with the aggregated factor

1-D tensors (biases, norm weights) are not compressed; they travel inside the same fused buffers.
PowerSGD compresses an n x m matrix at rank r only when PyTorch's ``_should_compress`` rule holds,
``(n + m) * r * min_compression_rate < n * m`` (strict: a matrix exactly at the rate is sent whole;
``PowerSGDReducer.compresses``); ACP-SGD compresses every matrix (as its reference).

Option names: both reducers take ``rank`` with PyTorch's ``matrix_approximation_rank`` as an alias, and
``powersgd``'s ``error_feedback`` takes ``use_error_feedback`` (as every error-feedback reducer does).
fp16: dynamic loss scaling is refused and a static ``loss_scale`` accepted, the policy and message of
every error-feedback reducer (``base.fp16_loss_scaling_problem``): E keeps the loss scale of the step
that made it, so a scale change would corrupt it; P Q^T scales with a static scale.

Deliberate choices, named:
* Factors, error feedback and the communicated buffers are fp32 whatever the gradient dtype
  (orthogonalisation in bf16/fp16 loses orthogonality); the result is cast back to the gradient dtype.
* Initial factors come from a generator seeded by (``seed``, parameter index), identical on every rank
  and independent of the global RNG (the reference uses unseeded ``torch.randn``).
* Same-shape matrices are batched (``bmm``, batched QR) instead of a Python loop: E, P and Q of all
  matrices of one shape live in one [B, n, m] / [B, n, r] / [B, m, r] tensor (ordered by descending
  parameter index, so every fused group covers a contiguous slice of each shape class). M + E is
  accumulated in place into E (``_foreach_add_``), E -= P Q^T is one ``baddbmm_``, and on CPU the
  decompressed gradient is written straight into ``p.grad`` (``mm(out=)``), so a step makes about
  four passes over the gradient and no gradient-sized allocation.
* ACP-SGD's per-group compression runs when the whole fused group's gradients are ready (at the
  accumulation boundary), then its allreduce is launched asynchronously -- the reference compresses
  per tensor in each hook and launches when the group is complete; results are identical.
* PowerSGD runs per fusion group during backward (``pipelined``, the default; ``powersgd_pipeline``):
  a group's P all_reduce is launched as soon as its gradients are ready, its Q all_reduce when the next
  group launches, the uncompressed tensors riding in the group's P all_reduce; as PyTorch's per-bucket
  ``powerSGD_hook``, with the same results as the whole-model path. ``pipelined: false`` keeps that path:
  the two dependent allreduces after backward in ``finish()`` (as epfml's reference).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional

import torch
from pydantic import AliasChoices, Field

from ..comm import host_to_device
from ..registry import REDUCERS
from .base import GradientOptions, Reducer, error_feedback_field
from .buckets import fuse_reverse
from .lowrank_common import (_accumulate, _decompress, _flat_grad, _Meta, _seeded_randn, _ShapeClass, _write_grad,
                             orthogonalize)
from .powersgd_pipeline import PowerSGDPipeline, group_sizes, launch_order


def matrix_dims(shape, rank: int) -> tuple:
    """``(n, m, r, numel)`` of a parameter of this shape viewed as (out, in x kh x kw); ``r = 0`` for a 1-D
    tensor (never compressed)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if len(shape) > 1:
        n = int(shape[0])
        m = numel // n
        return n, m, min(rank, n, m), numel
    return numel, 1, 0, numel


def fusion_caps(size_p: int, size_q: int, total: int, fusion_mb: float) -> tuple:
    """ACP-SGD's fusion caps for P and Q buffers: ``fusion_mb`` MiB of original fp32 gradient per group,
    scaled by each phase's compression (elements)."""
    cap = fusion_mb * 2**20 / 4
    return cap * size_p / total, cap * size_q / total


def _phase_sizes(dims, compressed) -> tuple:
    """Elements each tensor puts into a P buffer and into a Q buffer."""
    size_p = [n * r if c else numel for (n, m, r, numel), c in zip(dims, compressed)]
    size_q = [m * r if c else numel for (n, m, r, numel), c in zip(dims, compressed)]
    return size_p, size_q


class ClassSlice(NamedTuple):
    """The compressed members of a fused group that belong to one shape class: its rows a..b-1."""
    cls: "_ShapeClass"
    a: int
    b: int
    metas: List["_Meta"]


class SliceAt(NamedTuple):
    """A class slice and where its factors start in a fused buffer."""
    part: ClassSlice
    offset: int


class PlainAt(NamedTuple):
    """An uncompressed (1-D) tensor and where it starts in a fused buffer."""
    meta: "_Meta"
    offset: int


class Layout(NamedTuple):
    """A fused buffer: class slices first, then the uncompressed tensors; ``total`` elements."""
    slices: List[SliceAt]
    plain: List[PlainAt]
    total: int


PHASES = ("p", "q")  # ACP-SGD's alternating steps: P-step (send P), Q-step (send Q)


def greedy_groups(metas: List[_Meta], sizes: Dict[int, int], cap: float) -> List[List[_Meta]]:
    """Fusion in reverse registration order; a tensor larger than ``cap`` gets its own group."""
    return [[metas[i] for i in g] for g in fuse_reverse([sizes[m.index] for m in metas], cap)]


class _LowRankBase(Reducer):
    #: error feedback E (fp32, in the scale of the gradients it saw): the fp16 policy of
    #: ``base.fp16_loss_scaling_problem`` (dynamic loss scaling refused, static accepted) applies
    keeps_scaled_state = True
    #: a NaN / inf of any rank reaches the all-reduced P / Q buffers (P = (M + E) Q: NaN * anything is NaN),
    #: 1-D tensors and warm-up allreduces included: the guard checks them (``_allreduce`` watches every one)
    nonfinite_view = "reduced"

    def _setup(self, rank: int, seed: int, compress_rule) -> None:
        self.metas: List[_Meta] = []
        for i, p in enumerate(self.params):
            n, m, r, _ = matrix_dims(p.shape, rank)
            self.metas.append(_Meta(i, p, bool(r) and compress_rule(n, m, r), n, m, r))
        by_key: Dict[tuple, List[_Meta]] = defaultdict(list)
        for meta in reversed(self.metas):  # descending index: fused groups are contiguous slices
            if meta.compressed:
                by_key[(meta.n, meta.m, meta.r)].append(meta)
        self.classes: Dict[tuple, _ShapeClass] = {
            k: _ShapeClass(k, v, seed, v[0].p.device) for k, v in by_key.items()}
        # per-parameter views into the batched state (state_dict keys, tests)
        self.E: Dict[int, torch.Tensor] = {}
        self.P: Dict[int, torch.Tensor] = {}
        self.Q: Dict[int, torch.Tensor] = {}
        for c in self.classes.values():
            for j, mt in enumerate(c.metas):
                self.E[mt.index], self.P[mt.index], self.Q[mt.index] = c.E[j], c.P[j], c.Q[j]
        self.steps = 0

    def _slices(self, group: List[_Meta]) -> List[ClassSlice]:
        """The compressed members of a fused group, per shape class (class rows a..b-1)."""
        out: Dict[tuple, List[_Meta]] = {}
        for m in group:
            if m.compressed:
                out.setdefault(m.key, []).append(m)
        res = []
        for key, ms in out.items():
            a, b = ms[0].pos, ms[-1].pos + 1
            assert [m.pos for m in ms] == list(range(a, b)), "fused group is not a contiguous class slice"
            res.append(ClassSlice(self.classes[key], a, b, ms))
        return res

    def _allreduce(self, buf: torch.Tensor, kind: str, async_op: bool = False):
        self._watch(buf)  # the non-finite guard checks it after finish() (base.Reducer.nonfinite_flag)
        return self.comm.all_reduce(buf, kind, async_op=async_op)

    def reset_nonfinite(self) -> None:
        """After a skipped step: E to zero, P and Q to their initial seeded factors, on every rank."""
        seed = self.options.seed
        for c in self.classes.values():
            c.E.zero_()
            n, m, r = c.key
            c.P.copy_(torch.stack([_seeded_randn((n, r), seed, 2 * mt.index, c.P.device) for mt in c.metas]))
            c.Q.copy_(torch.stack([_seeded_randn((m, r), seed, 2 * mt.index + 1, c.Q.device) for mt in c.metas]))

    def _compressed_text(self) -> str:
        """``rank 4: 52 of 161 tensors compressed`` (attach's line)."""
        c = sum(1 for m in self.metas if m.compressed)
        return f"{self.registered_name} rank {self.options.rank}: {c} of {len(self.metas)} tensors compressed"

    def compressed_fraction(self) -> float:
        return sum(m.p.numel() for m in self.metas if m.compressed) / max(1, sum(m.p.numel() for m in self.metas))

    def _sent_elements(self) -> float:
        """Elements one rank sends per step at the last step (the method's own rule)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """For the logs, read on logging steps only: ``compression_ratio`` (gradient elements over elements
        sent per step), ``compressed_fraction`` and ``error_feedback_norm`` (the residual's L2 norm over every
        compressed matrix: one reduction and one host read, on logging steps)."""
        dense = sum(m.p.numel() for m in self.metas)
        out = {"compression_ratio": dense / max(self._sent_elements(), 1.0),
               "compressed_fraction": self.compressed_fraction()}
        if self.classes and getattr(self.options, "error_feedback", True):
            sq = torch.stack([c.E.float().pow(2).sum() for c in self.classes.values()]).sum()
            out["error_feedback_norm"] = float(sq.sqrt())
        return out

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"E": cpu(self.E), "P": cpu(self.P), "Q": cpu(self.Q), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for name in ("E", "P", "Q"):
            own = getattr(self, name)
            if set(own) != set(state[name]):
                raise ValueError(f"{type(self).__name__} state does not match this model's parameters")
            for k, v in state[name].items():
                if own[k].shape != v.shape:
                    raise ValueError(f"{type(self).__name__} state {name}[{k}] has shape {tuple(v.shape)}, "
                                     f"this model needs {tuple(own[k].shape)}")
                own[k].copy_(v)
        self.steps = int(state["steps"])


#: ``rank`` on both low-rank reducers, PyTorch's ``matrix_approximation_rank`` accepted as an alias on both
RANK_ALIASES = AliasChoices("rank", "matrix_approximation_rank")


class PowerSGDOptions(GradientOptions):
    # defaults of torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState; its names
    # matrix_approximation_rank and use_error_feedback are accepted as aliases of the package-wide spellings
    rank: int = Field(1, ge=1, validation_alias=RANK_ALIASES,
                      description="factor rank r, capped at min(n, m) per matrix")
    start_powerSGD_iter: int = Field(1000, ge=0, description="plain allreduce for the first steps")
    min_compression_rate: float = Field(2.0, ge=0, description="compress only if (n+m)*r*rate < n*m (PyTorch's "
                                                                 "strict rule)")
    error_feedback: bool = error_feedback_field("keep the compression error E = M - P Q^T")
    warm_start: bool = True
    orthogonalization_epsilon: float = Field(0.0, ge=0)
    seed: int = 0
    bucket_mb: float = Field(25.0, gt=0, validation_alias=AliasChoices("bucket_mb", "fusion_threshold_mb"),
                             description="MiB of fp32 gradient per fusion group (DDP's bucket_cap_mb; alias as on "
                                         "allreduce and acpsgd: fusion_threshold_mb)")
    pipelined: bool = Field(True, description="launch per fusion group during backward (P, then Q when the next "
                                              "group launches); false: one P and one Q all_reduce after backward")


@REDUCERS.register("powersgd", PowerSGDOptions)
class PowerSGDReducer(_LowRankBase):
    """PowerSGD (Vogels et al. 2019, Algorithm 1): rank-r power iteration, error feedback, warm start; per
    fusion group during backward (``powersgd_pipeline``), or with ``pipelined: false`` for the whole model in
    ``finish()`` (``_finish_serial``, the reference the pipeline is tested against, bit for bit)."""

    def __init__(self, named_params, options: PowerSGDOptions, **kw):
        super().__init__(named_params, options, **kw)
        rate = options.min_compression_rate
        self._setup(options.rank, options.seed, lambda n, m, r: self.compresses(n, m, r, rate))
        self.plain = [m for m in self.metas if not m.compressed]
        self.pipeline = PowerSGDPipeline(self) if options.pipelined else None

    @staticmethod
    def compresses(n: int, m: int, r: int, rate: float) -> bool:
        """The compression rule of PyTorch's ``powerSGD_hook._should_compress``: an (n, m) matrix at rank r
        is compressed when ``(n + m) * r * rate < n * m`` (strict: a matrix exactly at the rate, e.g. 8 x 8
        at rank 2 with rate 2, stays uncompressed). The one statement of the rule: the reducer's set-up and
        ``collectives`` (the cost model's bytes) both call it."""
        return (n + m) * r * rate < n * m

    @classmethod
    def group_bytes(cls, shapes, options: PowerSGDOptions) -> tuple:
        """fp32 bytes of each P all_reduce (P factors and the uncompressed tensors) and of each Q all_reduce,
        per fusion group (``pipelined: false``: one group)."""
        dims = [matrix_dims(s, options.rank) for s in shapes]
        comp = [bool(r) and cls.compresses(n, m, r, options.min_compression_rate) for n, m, r, _ in dims]
        cap = options.bucket_mb * 2**20 / 4 if options.pipelined else float("inf")
        _, p, q = group_sizes(dims, comp, cap)
        return [4 * x for x in p], [4 * x for x in q]

    @classmethod
    def collectives(cls, shapes, world: int, options: PowerSGDOptions, **_) -> list:
        """After ``start_powerSGD_iter``: per fusion group its P all_reduce (P factors and the uncompressed
        tensors) and its Q all_reduce, fp32, in issue order (``powersgd_pipeline.launch_order``)."""
        from ..comm import Collective

        p, q = cls.group_bytes(shapes, options)
        by = {"p": p, "q": q}
        return [Collective("all_reduce", by[ph][k], world) for ph, k in launch_order(p, q)]

    def warmup(self):
        s = self.options.start_powerSGD_iter
        return (s, "start_powerSGD_iter") if s > 0 else None

    def describe(self, total_steps=None) -> str:
        """Attach's line: the matrices compressed, the bytes, and the plain-allreduce warm-up (PyTorch's
        ``start_powerSGD_iter``; until then every gradient travels uncompressed)."""
        line = f"{self._compressed_text()}, {self.traffic()}"
        start = self.options.start_powerSGD_iter
        if total_steps is not None and start >= total_steps:
            return (line + f"; plain allreduce for all {total_steps} steps of this run: start_powerSGD_iter {start} "
                           f">= {total_steps}, nothing is compressed (lower start_powerSGD_iter)")
        if start:
            line += f"; plain allreduce until step {start}: start_powerSGD_iter"
        return line

    def grad_ready(self, p):
        if self.pipeline is not None:
            self.pipeline.ready(p)

    def finish(self):
        if self.pipeline is not None:
            self.pipeline.finish()
            self.steps += 1
            return
        self._finish_serial()

    def _finish_serial(self):
        """The whole model after backward: one P all_reduce (with the uncompressed tensors), one Q all_reduce."""
        o = self.options
        self.steps += 1
        if self.steps <= o.start_powerSGD_iter:
            self._plain_allreduce(self.metas)
            return
        cls = list(self.classes.values())
        Ps = []
        for c in cls:
            _accumulate(c.E, c.metas, o.error_feedback)  # E now holds M (+ E)
            if not o.warm_start:  # fresh seeded factors: drawn on the CPU generator, one copy to the device
                c.Q.copy_(host_to_device(torch.stack([_seeded_randn((c.key[1], c.key[2]), o.seed + self.steps,
                                                                2 * m.index + 1) for m in c.metas]), c.Q.device))
            Ps.append(torch.bmm(c.E, c.Q))
        # allreduce P together with the uncompressed tensors
        flat_p = torch.cat([x.reshape(-1) for x in Ps] + [_flat_grad(m) for m in self.plain]) \
            if (Ps or self.plain) else self.comm.zeros(0)
        self._allreduce(flat_p, "powersgd_p")
        flat_p.div_(self.world_size)
        off = 0
        for c in cls:
            c.P.copy_(orthogonalize(flat_p[off:off + c.P.numel()].view_as(c.P), o.orthogonalization_epsilon))
            off += c.P.numel()
        self._unpack_plain(flat_p, off)
        if cls:
            flat_q = torch.cat([torch.bmm(c.E.transpose(1, 2), c.P).reshape(-1) for c in cls])
            self._allreduce(flat_q, "powersgd_q")
            flat_q.div_(self.world_size)
            off = 0
            for c in cls:
                c.Q.copy_(flat_q[off:off + c.Q.numel()].view_as(c.Q))
                off += c.Q.numel()
        for c in cls:
            if o.error_feedback:
                c.E.baddbmm_(c.P, c.Q.transpose(1, 2), alpha=-1.0)  # E = M - P Q^T (aggregated)
            _decompress(c.metas, c.P, c.Q)

    def _sent_elements(self) -> float:
        if self.steps <= self.options.start_powerSGD_iter:  # still exact allreduce
            return float(sum(m.p.numel() for m in self.metas))
        return float(sum((m.n + m.m) * m.r if m.compressed else m.p.numel() for m in self.metas))

    def _unpack_plain(self, flat, off: int, metas: Optional[List[_Meta]] = None) -> None:
        for m in self.plain if metas is None else metas:
            n = m.p.numel()
            _write_grad(m, flat[off:off + n])
            off += n

    def _plain_allreduce(self, metas: List[_Meta]) -> None:
        flat = torch.cat([_flat_grad(m) for m in metas])
        self._allreduce(flat, "allreduce")
        flat.div_(self.world_size)
        self._unpack_plain(flat, 0, metas)


class ACPSGDOptions(GradientOptions):
    rank: int = Field(4, ge=1, validation_alias=RANK_ALIASES,
                      description="factor rank r, capped at min(n, m) per matrix")
    bucket_mb: float = Field(25.0, gt=0, validation_alias=AliasChoices("bucket_mb", "fusion_threshold_mb"),
                             description="MiB of original gradient per fused buffer (alias: the reference's "
                                         "fusion_threshold_mb)")
    seed: int = 0


@REDUCERS.register("acpsgd", ACPSGDOptions)
class ACPSGDReducer(_LowRankBase):
    """ACP-SGD (Zhang et al. 2023): alternating P/Q low-rank steps, one allreduce per step,
    fused buffers launched asynchronously during backward."""

    def __init__(self, named_params, options: ACPSGDOptions, **kw):
        super().__init__(named_params, options, **kw)
        self._setup(options.rank, options.seed, lambda n, m, r: True)
        self.phase = "p"
        sp, sq = _phase_sizes([(m.n, m.m, m.r, m.p.numel()) for m in self.metas], [m.compressed for m in self.metas])
        size_p = {m.index: v for m, v in zip(self.metas, sp)}
        size_q = {m.index: v for m, v in zip(self.metas, sq)}
        cap_p, cap_q = fusion_caps(sum(sp), sum(sq), sum(m.p.numel() for m in self.metas),
                                   options.bucket_mb)
        self.groups = {"p": greedy_groups(self.metas, size_p, cap_p), "q": greedy_groups(self.metas, size_q, cap_q)}
        self.sizes = {"p": size_p, "q": size_q}
        # buffer layout of each fused group: class slices first (factor rows a..b-1), then 1-D tensors
        self.layout = {phase: [self._layout(g, phase) for g in gs] for phase, gs in self.groups.items()}
        self.pindex = {id(p): i for i, p in enumerate(self.params)}
        self.where = {phase: {m.index: gi for gi, g in enumerate(gs) for m in g} for phase, gs in self.groups.items()}
        self._reset_round()

    def describe(self, total_steps=None) -> str:
        """Attach's line: every matrix compressed, P and Q steps alternating."""
        return f"{self._compressed_text()} (P and Q steps alternate, one all_reduce each), {self.traffic()}"

    def _sent_elements(self) -> float:
        """The P and Q steps alternate: their mean (each phase's fused buffers, 1-D tensors included)."""
        return (sum(self.sizes["p"].values()) + sum(self.sizes["q"].values())) / 2.0

    @classmethod
    def group_bytes(cls, shapes, rank: int, fusion_mb: float = 25.0) -> tuple:
        """Bytes of each fused all_reduce of a P-step and of a Q-step (this reducer's grouping)."""
        dims = [matrix_dims(s, rank) for s in shapes]
        sp, sq = _phase_sizes(dims, [bool(d[2]) for d in dims])
        cap_p, cap_q = fusion_caps(sum(sp), sum(sq), sum(d[3] for d in dims), fusion_mb)
        return ([4 * sum(sp[i] for i in g) for g in fuse_reverse(sp, cap_p)],
                [4 * sum(sq[i] for i in g) for g in fuse_reverse(sq, cap_q)])

    @classmethod
    def collectives(cls, shapes, world: int, options: ACPSGDOptions, **_) -> list:
        """P-steps and Q-steps alternate: each fused buffer's all_reduce every other step."""
        from ..comm import Collective

        gp, gq = cls.group_bytes(shapes, options.rank, options.bucket_mb)
        return [Collective("all_reduce", b, world, 0.5) for b in gp] + [Collective("all_reduce", b, world, 0.5) for b in gq]

    def _layout(self, group: List[_Meta], phase: str) -> Layout:
        slices, off = [], 0
        for part in self._slices(group):
            n, m, r = part.cls.key
            slices.append(SliceAt(part, off))
            off += (part.b - part.a) * (n if phase == "p" else m) * r
        plain = []
        for m in group:
            if not m.compressed:
                plain.append(PlainAt(m, off))
                off += m.p.numel()
        return Layout(slices, plain, off)

    def _reset_round(self):
        gs = self.groups[self.phase]
        self.ready_count = [0] * len(gs)
        self.seen = set()
        self.next_launch = 0
        self.pending: List[Optional[tuple]] = [None] * len(gs)

    def grad_ready(self, p):
        idx = self.pindex[id(p)]
        if idx in self.seen:
            return
        self.seen.add(idx)
        gi = self.where[self.phase][idx]
        self.ready_count[gi] += 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False):
        gs = self.groups[self.phase]
        while self.next_launch < len(gs) and (force or self.ready_count[self.next_launch] == len(gs[self.next_launch])):
            gi = self.next_launch
            buf = self._compress_group(gi)
            work = self._allreduce(buf, f"acpsgd_{self.phase}", async_op=True)
            self.pending[gi] = (buf, work)
            self.next_launch += 1

    def _compress_group(self, gi: int) -> torch.Tensor:
        phase = self.phase
        lay = self.layout[phase][gi]
        buf = torch.empty(lay.total, device=self.groups[phase][gi][0].p.device, dtype=torch.float32)
        for (c, a, b, ms), off in lay.slices:
            E, P, Q = c.E[a:b], c.P[a:b], c.Q[a:b]
            _accumulate(E, ms)  # E <- M + E
            if phase == "p":
                Q.copy_(orthogonalize(Q))
                torch.bmm(E, Q, out=P)
            else:
                P.copy_(orthogonalize(P))
                torch.bmm(E.transpose(1, 2), P, out=Q)
            E.baddbmm_(P, Q.transpose(1, 2), alpha=-1.0)  # local error feedback: (M + E) - P Q^T
            send = P if phase == "p" else Q
            buf[off:off + send.numel()].copy_(send.reshape(-1))
        for m, off in lay.plain:
            buf[off:off + m.p.numel()].copy_(_flat_grad(m))
        return buf

    def finish(self):
        self._launch_ready(force=True)
        phase = self.phase
        for gi in range(len(self.groups[phase])):
            buf, work = self.pending[gi]
            work.wait()
            buf.div_(self.world_size)
            lay = self.layout[phase][gi]
            for m, off in lay.plain:
                _write_grad(m, buf[off:off + m.p.numel()])
            for (c, a, b, ms), off in lay.slices:
                got = c.P[a:b] if phase == "p" else c.Q[a:b]
                got.copy_(buf[off:off + got.numel()].view_as(got))
                _decompress(ms, c.P[a:b], c.Q[a:b])
        self.phase = "q" if phase == "p" else "p"
        self.steps += 1
        self._reset_round()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "compute_p": self.phase == "p"}  # key kept: checkpoints stay loadable

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.phase = "p" if bool(state["compute_p"]) else "q"
        self._reset_round()
