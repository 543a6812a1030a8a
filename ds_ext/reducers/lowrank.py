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

Deliberate choices, named:
* Factors, error feedback and the communicated buffers are fp32 whatever the gradient dtype
  (orthogonalisation in bf16/fp16 loses orthogonality); the result is cast back to the gradient dtype.
* Initial factors come from a generator seeded by (``seed``, parameter index), identical on every rank
  and independent of the global RNG (the reference uses unseeded ``torch.randn``).
* Same-shape matrices of one fused group are batched (``bmm``, batched QR) instead of a Python loop.
* ACP-SGD's per-group compression runs when the whole fused group's gradients are ready (at the
  accumulation boundary), then its allreduce is launched asynchronously -- the reference compresses
  per tensor in each hook and launches when the group is complete; results are identical.
* PowerSGD's two dependent allreduces run after backward in ``finish()`` (as the reference), with the
  uncompressed tensors fused into the P allreduce.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from pydantic import Field

from ..registry import REDUCERS, Options
from .base import Reducer


def orthogonalize(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Orthonormal columns for a batch [B, n, r]: QR (r > 1, eps == 0), normalisation (r == 1), or
    Gram-Schmidt with ``eps`` added to each norm (PyTorch PowerSGD's ``orthogonalization_epsilon``)."""
    r = x.shape[-1]
    if r == 1:
        return x / (x.norm(dim=-2, keepdim=True) + (eps if eps > 0 else 1e-30))
    if eps == 0.0:
        return torch.linalg.qr(x).Q
    cols = []
    for i in range(r):
        c = x[..., i:i + 1]
        for q in cols:
            c = c - (q * c).sum(-2, keepdim=True) * q
        cols.append(c / (c.norm(dim=-2, keepdim=True) + eps))
    return torch.cat(cols, dim=-1)


def _seeded_randn(shape, seed: int, index: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device)


class _Meta:
    __slots__ = ("index", "p", "compressed", "n", "m", "r")

    def __init__(self, index, p, compressed, n, m, r):
        self.index, self.p, self.compressed, self.n, self.m, self.r = index, p, compressed, n, m, r


def _matrix_shape(p) -> tuple:
    n = p.shape[0]
    return n, p.numel() // n


def _flat_grad(meta: _Meta) -> torch.Tensor:
    """The gradient as a flat fp32 vector (zeros when this rank produced none)."""
    g = meta.p.grad
    if g is None:
        return torch.zeros(meta.p.numel(), device=meta.p.device)
    return g.detach().reshape(-1).float()


def _grad_matrix(meta: _Meta) -> torch.Tensor:
    return _flat_grad(meta).view(meta.n, meta.m)


def _write_grad(meta: _Meta, value: torch.Tensor) -> None:
    p = meta.p
    v = value.reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = v.clone()
    else:
        p.grad.copy_(v)


def greedy_groups(metas: List[_Meta], sizes: Dict[int, int], cap: float) -> List[List[_Meta]]:
    """Fusion in reverse registration order; a tensor larger than ``cap`` gets its own group."""
    groups, cur, acc = [], [], 0
    for meta in reversed(metas):
        s = sizes[meta.index]
        if cur and acc + s > cap:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(meta)
        acc += s
    if cur:
        groups.append(cur)
    return groups


def _by_shape(metas: List[_Meta]) -> Dict[tuple, List[_Meta]]:
    out: Dict[tuple, List[_Meta]] = defaultdict(list)
    for m in metas:
        if m.compressed:
            out[(m.n, m.m, m.r)].append(m)
    return out


class _LowRankBase(Reducer):
    def _setup(self, rank: int, seed: int, compress_rule) -> None:
        self.metas: List[_Meta] = []
        for i, p in enumerate(self.params):
            if p.ndim > 1:
                n, m = _matrix_shape(p)
                r = min(rank, n, m)
                self.metas.append(_Meta(i, p, compress_rule(n, m, r), n, m, r))
            else:
                self.metas.append(_Meta(i, p, False, p.numel(), 1, 0))
        self.E: Dict[int, torch.Tensor] = {}
        self.P: Dict[int, torch.Tensor] = {}
        self.Q: Dict[int, torch.Tensor] = {}
        for meta in self.metas:
            if meta.compressed:
                dev = meta.p.device
                self.E[meta.index] = torch.zeros(meta.n, meta.m, device=dev)
                self.P[meta.index] = _seeded_randn((meta.n, meta.r), seed, 2 * meta.index, dev)
                self.Q[meta.index] = _seeded_randn((meta.m, meta.r), seed, 2 * meta.index + 1, dev)
        self.steps = 0

    def _allreduce(self, buf: torch.Tensor, kind: str, async_op: bool = False):
        self._count(kind, buf)
        return dist.all_reduce(buf, group=self.group, async_op=async_op)

    def compressed_fraction(self) -> float:
        return sum(m.p.numel() for m in self.metas if m.compressed) / max(1, sum(m.p.numel() for m in self.metas))

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"E": cpu(self.E), "P": cpu(self.P), "Q": cpu(self.Q), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for name in ("E", "P", "Q"):
            own = getattr(self, name)
            if set(own) != set(state[name]):
                raise ValueError(f"{type(self).__name__} state does not match this model's parameters")
            for k, v in state[name].items():
                own[k].copy_(v)
        self.steps = int(state["steps"])


class PowerSGDOptions(Options):
    # names and defaults of torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState
    matrix_approximation_rank: int = Field(1, ge=1)
    start_powerSGD_iter: int = Field(1000, ge=0, description="plain allreduce for the first steps")
    min_compression_rate: float = Field(2.0, ge=0, description="compress only if n*m >= rate * (n+m)*r")
    use_error_feedback: bool = True
    warm_start: bool = True
    orthogonalization_epsilon: float = Field(0.0, ge=0)
    seed: int = 0


@REDUCERS.register("powersgd", PowerSGDOptions)
class PowerSGDReducer(_LowRankBase):
    """PowerSGD (Vogels et al. 2019): rank-r power iteration, error feedback, warm start."""

    def __init__(self, named_params, options: PowerSGDOptions, **kw):
        super().__init__(named_params, options, **kw)
        rate = options.min_compression_rate
        self._setup(options.matrix_approximation_rank, options.seed,
                    lambda n, m, r: n * m >= rate * (n + m) * r)
        self.shapes = _by_shape(self.metas)
        self.plain = [m for m in self.metas if not m.compressed]

    def finish(self):
        o = self.options
        self.steps += 1
        if self.steps <= o.start_powerSGD_iter:
            self._plain_allreduce(self.metas)
            return
        Ms, Ps = {}, {}
        for key, metas in self.shapes.items():
            M = torch.stack([_grad_matrix(m) for m in metas])
            if o.use_error_feedback:
                M += torch.stack([self.E[m.index] for m in metas])
            if o.warm_start:
                Q = torch.stack([self.Q[m.index] for m in metas])
            else:
                Q = torch.stack([_seeded_randn((m.m, m.r), o.seed + self.steps, 2 * m.index + 1, M.device)
                                 for m in metas])
            Ms[key], Ps[key] = M, torch.bmm(M, Q)
        # allreduce P together with the uncompressed tensors
        flat_p = self._pack([Ps[k] for k in self.shapes], self.plain)
        self._allreduce(flat_p, "powersgd_p")
        flat_p.div_(self.world_size)
        Ps = self._unpack_factors(flat_p, Ps)
        self._unpack_plain(flat_p, sum(v.numel() for v in Ps.values()))
        Qs = {}
        for key in self.shapes:
            Ps[key] = orthogonalize(Ps[key], o.orthogonalization_epsilon)
            Qs[key] = torch.bmm(Ms[key].transpose(1, 2), Ps[key])
        flat_q = self._pack([Qs[k] for k in self.shapes], [])
        if flat_q.numel():
            self._allreduce(flat_q, "powersgd_q")
            flat_q.div_(self.world_size)
        Qs = self._unpack_factors(flat_q, Qs)
        for key, metas in self.shapes.items():
            approx = torch.bmm(Ps[key], Qs[key].transpose(1, 2))
            for j, m in enumerate(metas):
                if o.use_error_feedback:
                    self.E[m.index].copy_(Ms[key][j] - approx[j])
                self.P[m.index].copy_(Ps[key][j])
                self.Q[m.index].copy_(Qs[key][j])
                _write_grad(m, approx[j])

    def _pack(self, factors: List[torch.Tensor], plain: List[_Meta]) -> torch.Tensor:
        parts = [f.reshape(-1) for f in factors] + [_flat_grad(m) for m in plain]
        if not parts:
            return torch.zeros(0)
        return torch.cat(parts)

    def _unpack_factors(self, flat, like: Dict[tuple, torch.Tensor]) -> Dict[tuple, torch.Tensor]:
        out, off = {}, 0
        for key, t in like.items():
            out[key] = flat[off:off + t.numel()].view_as(t)
            off += t.numel()
        return out

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


class ACPSGDOptions(Options):
    rank: int = Field(4, ge=1)
    fusion_threshold_mb: float = Field(25.0, gt=0, description="MB of original gradient per fused buffer")
    seed: int = 0


@REDUCERS.register("acpsgd", ACPSGDOptions)
class ACPSGDReducer(_LowRankBase):
    """ACP-SGD (Zhang et al. 2023): alternating P/Q low-rank steps, one allreduce per step,
    fused buffers launched asynchronously during backward."""

    def __init__(self, named_params, options: ACPSGDOptions, **kw):
        super().__init__(named_params, options, **kw)
        self._setup(options.rank, options.seed, lambda n, m, r: True)
        self.compute_p = True
        size_p = {m.index: (m.n * m.r if m.compressed else m.p.numel()) for m in self.metas}
        size_q = {m.index: (m.m * m.r if m.compressed else m.p.numel()) for m in self.metas}
        total = sum(m.p.numel() for m in self.metas)
        cap = options.fusion_threshold_mb * 2**20 / 4  # in elements of the original fp32 gradient
        self.groups = {
            True: greedy_groups(self.metas, size_p, cap * sum(size_p.values()) / total),
            False: greedy_groups(self.metas, size_q, cap * sum(size_q.values()) / total),
        }
        self.sizes = {True: size_p, False: size_q}
        self.pindex = {id(p): i for i, p in enumerate(self.params)}
        self.where = {phase: {m.index: gi for gi, g in enumerate(gs) for m in g} for phase, gs in self.groups.items()}
        self._reset_round()

    def _reset_round(self):
        gs = self.groups[self.compute_p]
        self.ready_count = [0] * len(gs)
        self.seen = set()
        self.next_launch = 0
        self.pending: List[Optional[tuple]] = [None] * len(gs)

    def grad_ready(self, p):
        idx = self.pindex[id(p)]
        if idx in self.seen:
            return
        self.seen.add(idx)
        gi = self.where[self.compute_p][idx]
        self.ready_count[gi] += 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False):
        gs = self.groups[self.compute_p]
        while self.next_launch < len(gs) and (force or self.ready_count[self.next_launch] == len(gs[self.next_launch])):
            gi = self.next_launch
            buf = self._compress_group(gs[gi])
            work = self._allreduce(buf, "acpsgd_p" if self.compute_p else "acpsgd_q", async_op=True)
            self.pending[gi] = (buf, work)
            self.next_launch += 1

    def _compress_group(self, group: List[_Meta]) -> torch.Tensor:
        phase = self.compute_p
        sizes = self.sizes[phase]
        offsets, off = {}, 0
        for m in group:
            offsets[m.index] = off
            off += sizes[m.index]
        buf = torch.empty(off, device=group[0].p.device, dtype=torch.float32)
        for key, metas in _by_shape(group).items():
            M = torch.stack([_grad_matrix(m) for m in metas]) + torch.stack([self.E[m.index] for m in metas])
            if phase:
                Q = orthogonalize(torch.stack([self.Q[m.index] for m in metas]))
                P = torch.bmm(M, Q)
            else:
                P = orthogonalize(torch.stack([self.P[m.index] for m in metas]))
                Q = torch.bmm(M.transpose(1, 2), P)
            E = M - torch.bmm(P, Q.transpose(1, 2))
            send = P if phase else Q
            for j, m in enumerate(metas):
                self.E[m.index].copy_(E[j])
                self.P[m.index].copy_(P[j])
                self.Q[m.index].copy_(Q[j])
                buf[offsets[m.index]:offsets[m.index] + send[j].numel()].copy_(send[j].reshape(-1))
        for m in group:
            if not m.compressed:
                buf[offsets[m.index]:offsets[m.index] + m.p.numel()].copy_(_flat_grad(m))
        return buf

    def finish(self):
        self._launch_ready(force=True)
        phase = self.compute_p
        for gi, group in enumerate(self.groups[phase]):
            buf, work = self.pending[gi]
            work.wait()
            buf.div_(self.world_size)
            off = 0
            for m in group:
                n = self.sizes[phase][m.index]
                part = buf[off:off + n]
                off += n
                if not m.compressed:
                    _write_grad(m, part)
                elif phase:
                    self.P[m.index].copy_(part.view(m.n, m.r))
                else:
                    self.Q[m.index].copy_(part.view(m.m, m.r))
            for key, metas in _by_shape(group).items():
                P = torch.stack([self.P[m.index] for m in metas])
                Q = torch.stack([self.Q[m.index] for m in metas])
                approx = torch.bmm(P, Q.transpose(1, 2))
                for j, m in enumerate(metas):
                    _write_grad(m, approx[j])
        self.compute_p = not phase
        self.steps += 1
        self._reset_round()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "compute_p": self.compute_p}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.compute_p = bool(state["compute_p"])
        self._reset_round()
