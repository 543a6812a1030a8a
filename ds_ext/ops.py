"""The Python face of the compressed-communication kernels.

Every function here is the single entry point the reducers call for an inner loop over a gradient
vector. Today each runs a pure-torch implementation; the op-builder issue adds compiled C++/CUDA ops
(``ds_ext/op_builder``, ``ds_ext/csrc``) behind the same signatures, so reducers never change.

Conventions shared by all functions:

* inputs are 1-D tensors; outputs live on the input's device;
* indices are ``int64`` positions in the *whole* vector (global, not relative to a slice);
* comparisons and arithmetic run in fp32 for fp16/bf16 input (a threshold rounded to bf16 would move
  the selection by up to 0.4 %); values are returned as exact copies in the input's dtype;
* no Python loop over elements, no sort.
"""
from __future__ import annotations

from typing import Tuple

import torch

_HALF = (torch.float16, torch.bfloat16)


def _compute_view(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _HALF else x


def _check_1d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 1:
        raise ValueError(f"{name} expects a 1-D tensor, got shape {tuple(x.shape)}")


def threshold_select(x: torch.Tensor, threshold: float, start: int = 0, end: int = -1
                     ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Indices and values of ``x[start:end]`` with ``|x| >= threshold``.

    Returns ``(indices, values, count)``: global ``int64`` indices in increasing order, the values of
    ``x`` at those indices (``x``'s dtype) and ``count == indices.numel()`` as a Python int (the
    host needs it to size the next collective anyway). ``end=-1`` means ``x.numel()``. NaN entries are
    never selected. No sort and no top-k:

    * CUDA, and slices shorter than ``_BLOCKED_MIN``: one mask (``|x| >= t``) and one ``nonzero``.
    * CPU, long slices: blocked. One pass of per-row ``amax`` / ``amin`` over rows of ``_ROW``
      elements finds the rows that can hold a hit; the exact mask and ``nonzero`` run on those rows
      only. At the sparse densities this op serves, that is one read of ``x`` plus a little work,
      against four full passes (abs, compare, two in ``nonzero``) that made the plain form about 8x a
      copy on one CPU thread (``run/bench-sparse.sh``). The result is identical; when more than a
      quarter of the rows hold a hit the plain form is used.
    """
    _check_1d("threshold_select", x)
    n = x.numel()
    end = n if end < 0 else end
    if not 0 <= start <= end <= n:
        raise ValueError(f"threshold_select: need 0 <= start <= end <= {n}, got start={start}, end={end}")
    part = _compute_view(x[start:end])
    if x.device.type == "cpu" and part.numel() >= _BLOCKED_MIN:
        idx = _blocked_nonzero(part, threshold)
    else:
        idx = (part.abs() >= threshold).nonzero().view(-1)
    if start:
        idx += start
    return idx, x[idx], idx.numel()


_ROW = 64
_BLOCKED_MIN = 1 << 16


def _blocked_nonzero(v: torch.Tensor, threshold: float) -> torch.Tensor:
    rows_n = v.numel() // _ROW
    body = v[:rows_n * _ROW].view(rows_n, _ROW)
    hi = body.amax(1)
    cand = (hi >= threshold) | (body.amin(1) <= -threshold) | hi.isnan()  # NaN rows: let the exact mask decide
    rows = cand.nonzero().view(-1)
    if 4 * rows.numel() > rows_n:
        return (v.abs() >= threshold).nonzero().view(-1)
    r, c = (body[rows].abs() >= threshold).nonzero(as_tuple=True)
    idx = rows[r] * _ROW + c
    tail = v[rows_n * _ROW:]
    if tail.numel():
        idx = torch.cat([idx, (tail.abs() >= threshold).nonzero().view(-1) + rows_n * _ROW])
    return idx


def topk_select(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest magnitude: ``(indices int64, values)`` in no particular order
    (``torch.topk(|x|, k, sorted=False)``; a partial selection, not a full sort)."""
    _check_1d("topk_select", x)
    if not 0 <= k <= x.numel():
        raise ValueError(f"topk_select: need 0 <= k <= {x.numel()}, got k={k}")
    _, idx = torch.topk(_compute_view(x).abs(), k, sorted=False)
    return idx, x[idx]


def scatter_add_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``dense[indices] += values`` with repeated indices accumulated (not overwritten); in place.
    ``values`` are converted to ``dense``'s dtype (keep ``dense`` fp32 for half-precision values)."""
    _check_1d("scatter_add_", dense)
    return dense.index_add_(0, indices, values.to(dense.dtype))


def zero_at_(buf: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``buf[indices] = 0`` in place: the error-feedback update after the selected coordinates were
    sent."""
    _check_1d("zero_at_", buf)
    return buf.index_fill_(0, indices, 0)
