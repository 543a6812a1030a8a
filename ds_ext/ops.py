"""The Python face of the compressed-communication kernels.

Every function here is the single entry point the reducers call for an inner loop over a gradient
vector. Each has a pure-torch implementation (the reference, and the fallback) and, for CPU and CUDA
tensors, a compiled kernel from ``ds_ext/csrc`` built by ``ds_ext/op_builder``; reducers never see
which one ran.

Which one runs: ``DS_EXT_OPS`` (read at every call, so tests can switch it):

* ``auto`` (default): the compiled op for the tensor's device -- prebuilt at install, else JIT-built on
  first use (ninja; cached on disk, a few tens of seconds the very first time) -- else the torch code,
  with ONE warning per device naming the reason (no compiler, no CUDA toolkit, build error, ...);
* ``compiled``: the compiled op or an error saying why not (for tests and benchmarks);
* ``torch``: always the torch code (no compiler is ever invoked).

Importing this module never builds or needs a compiler. ``status()`` tells what is in use (see
``python -m ds_ext.report``).

Results are identical whichever path runs (same indices, same bits, same values), except:

* ``sign_pack``'s scale (mean |x|): both paths accumulate in fp64 but in a different order, so the
  fp32 scale may differ by one ulp (tests: ``rtol=1e-6``), and the residual ``x - scale*sign(x)`` by as
  much;
* ``scatter_add_`` on CUDA with repeated indices adds with atomics in an unspecified order, as
  ``index_add_`` on CUDA does (sums of more than two terms may differ in the last bits).

Conventions shared by all functions:

* inputs are 1-D tensors; outputs live on the input's device;
* indices are ``int64`` positions in the *whole* vector (global, not relative to a slice);
* comparisons and arithmetic run in fp32 for fp16/bf16 input (a threshold rounded to bf16 would move
  the selection by up to 0.4 %); values are returned as exact copies in the input's dtype;
* no Python loop over elements, no sort.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import torch

_HALF = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("auto", "compiled", "torch")
ENV = "DS_EXT_OPS"

# device type -> (module or None, how it was obtained or why not)
_loaded: Dict[str, Tuple[Optional[object], str]] = {}
_warned: set = set()


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}")
    return m


def _load(dev: str) -> Tuple[Optional[object], str]:
    if dev not in ("cpu", "cuda"):
        return None, f"no compiled kernels for device type {dev!r}"
    try:
        from .op_builder import BUILDERS
        b = BUILDERS[dev]()
        if not b.is_compatible():
            return None, f"{b.NAME} is not compatible here: {b.error_log}"
        mod = b.load(verbose=False)
        how = b.loaded_from
        if how == "jit" and b.prebuilt_problem and "torch" in b.prebuilt_problem:
            how += f" ({b.prebuilt_problem})"
        return mod, how
    except Exception as e:  # a build error, missing ninja, ...: the torch code takes over
        msg = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {msg[-1] if msg else ''}"[:400]


def kernels(device) -> Optional[object]:
    """The compiled op module for ``device`` (a torch.device or type string), or None for the torch
    code. Loads (maybe JIT-builds) it on first use; see the module docstring for ``DS_EXT_OPS``."""
    m = mode()
    if m == "torch":
        return None
    dev = device if isinstance(device, str) else device.type
    if dev not in _loaded:
        _loaded[dev] = _load(dev)
    mod, why = _loaded[dev]
    if mod is None:
        if m == "compiled":
            raise RuntimeError(f"{ENV}=compiled but the {dev} kernels are unavailable: {why}")
        if dev not in _warned:
            _warned.add(dev)
            warnings.warn(f"ds_ext.ops: compiled {dev} kernels unavailable, using the torch fallback: {why}",
                          RuntimeWarning, stacklevel=3)
    return mod


def status(device: str = "cpu", load: bool = False) -> dict:
    """What serves ``device``: ``{"mode", "in_use": "compiled"|"torch", "how"}`` (``how``: prebuilt / jit /
    the reason for the fallback). Loads the op only when ``load`` is true."""
    m = mode()
    if m == "torch":
        return {"mode": m, "in_use": "torch", "how": f"{ENV}=torch"}
    if device not in _loaded and not load:
        return {"mode": m, "in_use": "not loaded yet", "how": ""}
    if device not in _loaded:
        _loaded[device] = _load(device)
    mod, why = _loaded[device]
    return {"mode": m, "in_use": "compiled" if mod is not None else "torch", "how": why}


def _reset() -> None:
    """Forget loaded ops and warnings (tests)."""
    _loaded.clear()
    _warned.clear()


def _compute_view(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _HALF else x


def _check_1d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 1:
        raise ValueError(f"{name} expects a 1-D tensor, got shape {tuple(x.shape)}")


def threshold_select(x: torch.Tensor, threshold: float, start: int = 0, end: int = -1,
                     error: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Indices and values of ``x[start:end]`` with ``|x| >= threshold``.

    With ``error`` (an fp32 vector as long as ``x``, the error-feedback memory) the selection runs on
    ``y = x + error`` (computed in fp32, never materialised) and the values are ``y`` at the selected
    indices, cast to ``x``'s dtype. The compiled kernel does the whole thing in one pass over the
    range (blocks of 64 tested at once, an exact pass only over blocks holding a hit; compaction into
    per-chunk lists, then one copy out).

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
    if error is not None and (error.dim() != 1 or error.numel() != n or error.dtype != torch.float32):
        raise ValueError("threshold_select: error must be an fp32 1-D tensor as long as x")
    k = kernels(x.device) if x.dtype in _KERNEL_DTYPES else None
    if k is not None:
        idx, vals = k.threshold_select(x, error, float(threshold), start, end)
        return idx, vals, idx.numel()
    part = _compute_view(x[start:end])
    if error is not None:
        part = part + error[start:end]
    if x.device.type == "cpu" and part.numel() >= _BLOCKED_MIN:
        idx = _blocked_nonzero(part, threshold)
    else:
        idx = (part.abs() >= threshold).nonzero().view(-1)
    vals = None if error is None else part[idx].to(x.dtype)
    if start:
        idx += start
    return idx, x[idx] if vals is None else vals, idx.numel()


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


def scatter_add_(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 zero_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dense[indices] += values`` with repeated indices accumulated (not overwritten); in place.
    ``values`` are converted to ``dense``'s dtype (keep ``dense`` fp32 for half-precision values).

    ``zero_in`` (an fp32 vector as long as ``dense``): also ``zero_in[indices] = 0``, the matching
    error-feedback update, fused into the same pass by the compiled kernel."""
    _check_1d("scatter_add_", dense)
    if zero_in is not None and (zero_in.dim() != 1 or zero_in.numel() != dense.numel()
                                or zero_in.dtype != torch.float32):
        raise ValueError("scatter_add_: zero_in must be an fp32 1-D tensor as long as dense")
    k = (kernels(dense.device) if dense.dtype in _KERNEL_DTYPES and values.dtype in _KERNEL_DTYPES
         and dense.is_contiguous() and (zero_in is None or zero_in.is_contiguous()) else None)
    if k is not None:
        return k.scatter_add_(dense, indices.to(torch.int64), values, zero_in)
    dense.index_add_(0, indices, values.to(dense.dtype))
    if zero_in is not None:
        zero_in.index_fill_(0, indices, 0)
    return dense


def zero_at_(buf: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``buf[indices] = 0`` in place: the error-feedback update after the selected coordinates were
    sent (``scatter_add_(..., zero_in=buf)`` fuses it with the scatter when the index sets agree)."""
    _check_1d("zero_at_", buf)
    return buf.index_fill_(0, indices, 0)


# --------------------------------------------------------------------------------- sign compression
_BIT_WEIGHTS: Dict[torch.device, torch.Tensor] = {}


def _bit_weights(device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = (1 << torch.arange(8, device=device)).to(torch.uint8)
    return _BIT_WEIGHTS[device]


def sign_pack(x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-bit compression: ``(packed, scale)`` with ``packed`` ``uint8[ceil(n/8)]`` (bit j of byte b is
    element ``8b+j``; 1 means ``x >= 0``, so 0 and -0 count as positive and NaN as negative; unused
    high bits 0) and ``scale = mean |x|`` as a 0-d fp32 tensor (0 for an empty ``x``), accumulated in
    fp64. ``residual`` (an fp32 vector as long as ``x``, may be ``x`` itself): receives
    ``x - scale * sign(x)``, the error-feedback memory of EF-SignSGD, in the same pass."""
    _check_1d("sign_pack", x)
    n = x.numel()
    if residual is not None and (residual.dim() != 1 or residual.numel() != n or residual.dtype != torch.float32):
        raise ValueError("sign_pack: residual must be an fp32 1-D tensor as long as x")
    k = (kernels(x.device) if x.dtype in _KERNEL_DTYPES and (residual is None or residual.is_contiguous())
         else None)
    if k is not None:
        return tuple(k.sign_pack(x, residual))
    v = _compute_view(x)
    if n:
        scale = (v.abs().sum(dtype=torch.float64) / n).float()
    else:
        scale = torch.zeros((), device=x.device)
    pos = v >= 0
    pad = (-n) % 8
    bits = torch.cat([pos, pos.new_zeros(pad)]) if pad else pos
    packed = (bits.view(-1, 8).to(torch.uint8) * _bit_weights(x.device)).sum(1, dtype=torch.uint8)
    if residual is not None:
        residual.copy_(v.float() - torch.where(pos, scale, -scale))
    return packed, scale


def sign_unpack(packed: torch.Tensor, scale, numel: int, out: Optional[torch.Tensor] = None,
                accumulate: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``sign_pack``: ``±scale`` (fp32 arithmetic) for the first ``numel`` signs, written to
    ``out`` (or a new ``dtype`` tensor), or added to ``out`` when ``accumulate``."""
    _check_1d("sign_unpack", packed)
    if packed.dtype != torch.uint8 or packed.numel() * 8 < numel:
        raise ValueError(f"sign_unpack: need uint8 holding >= {numel} bits, got {packed.dtype}[{packed.numel()}]")
    if out is None:
        if accumulate:
            raise ValueError("sign_unpack: accumulate needs out")
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    _check_1d("sign_unpack", out)
    if out.numel() != numel:
        raise ValueError(f"sign_unpack: out has {out.numel()} elements, expected {numel}")
    s = float(scale)
    k = kernels(packed.device) if out.dtype in _KERNEL_DTYPES and out.is_contiguous() else None
    if k is not None:
        return k.sign_unpack(packed, s, out, accumulate)
    bits = ((packed.view(-1, 1) & _bit_weights(packed.device)) != 0).view(-1)[:numel]
    st = torch.tensor(s, dtype=torch.float32, device=packed.device)
    signed = torch.where(bits, st, -st)
    if accumulate:
        return out.add_(signed)
    return out.copy_(signed)


# ------------------------------------------------------------------------------------ value packing
def pack_values(values: torch.Tensor, dtype: torch.dtype = torch.float16,
                indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``values[indices]`` (or ``values``) converted to ``dtype`` (fp16 / bf16 for the sparse exchange,
    round to nearest even exactly as ``.to(dtype)``); gather and conversion in one pass."""
    _check_1d("pack_values", values)
    k = (kernels(values.device) if values.dtype in _KERNEL_DTYPES and dtype in _KERNEL_DTYPES else None)
    if k is not None:
        return k.pack_values(values, None if indices is None else indices.to(torch.int64), dtype)
    v = values if indices is None else values[indices]
    return v.to(dtype)


def unpack_values(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed values back to ``dtype`` (fp32 by default): exact (fp16 / bf16 -> fp32 loses nothing)."""
    return pack_values(packed, dtype)
