"""What both low-rank reducers and PowerSGD's per-group pipeline share (``lowrank``, ``powersgd_pipeline``): the
orthogonalisation, the seeded initial factors, the batched per-shape state (E, P, Q of every compressed matrix of
one shape in one tensor), and the per-matrix kernels between gradients and that state. The papers, equations and
deliberate choices are stated in ``lowrank``'s docstring."""
from __future__ import annotations

from typing import List

import torch

from ..comm import host_to_device


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


def _seeded_randn(shape, seed: int, index: int, device=None) -> torch.Tensor:
    """Seeded factors from a CPU generator (identical on every rank), moved to ``device`` if given."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    x = torch.randn(*shape, generator=g, dtype=torch.float32)
    return x if device is None else host_to_device(x, device)


class _Meta:
    __slots__ = ("index", "p", "compressed", "n", "m", "r", "key", "pos")

    def __init__(self, index, p, compressed, n, m, r):
        self.index, self.p, self.compressed, self.n, self.m, self.r = index, p, compressed, n, m, r
        self.key, self.pos = None, -1


class _ShapeClass:
    """E, P, Q of every compressed matrix of one (n, m, r), batched; ``metas[j]`` owns row j."""

    def __init__(self, key, metas: List[_Meta], seed: int, device):
        n, m, r = key
        self.key, self.metas = key, metas
        self.E = torch.zeros(len(metas), n, m, device=device)
        self.P = torch.stack([_seeded_randn((n, r), seed, 2 * mt.index, device) for mt in metas])
        self.Q = torch.stack([_seeded_randn((m, r), seed, 2 * mt.index + 1, device) for mt in metas])
        for j, mt in enumerate(metas):
            mt.key, mt.pos = key, j


def _flat_grad(meta: _Meta) -> torch.Tensor:
    """The gradient as a flat fp32 vector (zeros when this rank produced none)."""
    g = meta.p.grad
    if g is None:
        return torch.zeros(meta.p.numel(), device=meta.p.device)
    return g.detach().reshape(-1).float()


def _grad_matrix(meta: _Meta) -> torch.Tensor:
    """The gradient as an (n, m) matrix in its own dtype (a view when contiguous)."""
    g = meta.p.grad
    if g is None:
        return torch.zeros(meta.n, meta.m, device=meta.p.device)
    return g.detach().reshape(meta.n, meta.m)


def _write_grad(meta: _Meta, value: torch.Tensor) -> None:
    p = meta.p
    v = value.reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = v.clone()
    else:
        p.grad.copy_(v)


def _accumulate(E: torch.Tensor, metas: List[_Meta], error_feedback: bool = True) -> None:
    """E[j] <- E[j] + grad_j (or grad_j alone), in place, for a batch slice E [B, n, m]."""
    rows, grads = list(E.unbind(0)), [_grad_matrix(m) for m in metas]
    if error_feedback:
        torch._foreach_add_(rows, grads)
    else:
        torch._foreach_copy_(rows, grads)


def _decompress(metas: List[_Meta], P: torch.Tensor, Q: torch.Tensor) -> None:
    """p.grad <- P_j Q_j^T. On CPU straight into fp32 gradients (no temporary); on accelerators one
    ``bmm`` and one multi-tensor copy (a few kernel launches instead of one per tensor)."""
    if P.device.type == "cpu":
        for j, m in enumerate(metas):
            g = m.p.grad
            if g is not None and g.dtype == torch.float32 and g.is_contiguous():
                torch.mm(P[j], Q[j].T, out=g.view(m.n, m.m))
            else:
                _write_grad(m, P[j] @ Q[j].T)
        return
    approx = torch.bmm(P, Q.transpose(1, 2))
    if all(m.p.grad is not None and m.p.grad.is_contiguous() for m in metas):  # channels_last: not a view
        torch._foreach_copy_([m.p.grad.view(m.n, m.m) for m in metas], list(approx.unbind(0)))
    else:
        for j, m in enumerate(metas):
            _write_grad(m, approx[j])
