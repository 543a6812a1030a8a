"""The Python face of the compressed-communication kernels.

Every function here is the single entry point the reducers call for an inner loop over a gradient
vector. Each has a pure-torch implementation (the reference, and the fallback) and, for CPU and CUDA
tensors, a compiled kernel from ``ds_ext/csrc`` built by ``ds_ext/op_builder``; reducers never see
which one ran.

Which one runs: ``DS_EXT_OPS`` (read at every call, so tests can switch it):

* ``auto`` (default): the compiled op for the tensor's device -- prebuilt at install, else JIT-built on
  first use (ninja; cached on disk per checkout, about a minute for the CPU op and a few minutes for
  the CUDA op on 2 cores, the very first time) -- else the torch code, with ONE message per device on the ``ds_ext.ops``
  logger naming the reason (no compiler, no CUDA toolkit, build error, ...): a warning for the CPU, an
  error for CUDA (a GPU run without its kernels is much slower; the message says how to prebuild);
* ``compiled``: the compiled op or an error saying why not (for tests and benchmarks);
* ``torch``: always the torch code (no compiler is ever invoked).

Importing this module never builds or needs a compiler. ``prepare(device)`` loads (builds) the op up
front, with one log line before a build, so that the build does not happen inside the first training
step; ``status()`` tells what is in use (see ``python -m ds_ext.report``).

Results are identical whichever path runs, with two named exceptions (``sign_pack``'s fp32 scale may differ
by one ulp between paths; ``scatter_add_`` with repeated indices on CUDA); host reads and device asserts are
listed with them in ``docs/dev/notes/ops.md``.

Conventions shared by all functions:

* inputs are 1-D tensors; outputs live on the input's device; every tensor argument on one device;
* indices are ``int64`` positions in the *whole* vector (global, not relative to a slice);
* comparisons and arithmetic run in fp32 for fp16/bf16 input (a threshold rounded to bf16 would move
  the selection by up to 0.4 %); values are returned as exact copies in the input's dtype;
* thresholds, ranges, counts and segment offsets are host numbers (Python ints / floats);
* no Python loop over elements, no sort.
"""
from __future__ import annotations

import logging
import operator
import os
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .build_lock import watch

_HALF = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("auto", "compiled", "torch")
ENV = "DS_EXT_OPS"
log = logging.getLogger("ds_ext.ops")
PREBUILD_HINT = "DS_BUILD_DS_EXT_COMM_CUDA=1 bash run/setup.sh"
# seconds of a from-scratch JIT build measured on 2 cores (run/bench-ops.sh --build-time,
# run/cuda-build-check.sh); the CUDA build parallelises over its files and arch targets
_BUILD_SECONDS = {"cpu": 60, "cuda": 160}

# device type -> (module or None, how it was obtained or why not)
_loaded: Dict[str, Tuple[Optional[object], str]] = {}
_warned: set = set()


def _normalised(value: Optional[str]) -> str:
    return (value or "").strip().lower() or "auto"


def mode_problem(value: Optional[str]) -> Optional[str]:
    """Why ``value``, the text of ``$DS_EXT_OPS`` (None: unset), selects no mode, or None when it does.
    Case and surrounding blanks do not matter; unset or blank means ``auto``. The trainer's preflight
    refuses a bad value before any process group starts (``ds_ext.trainer.recipe.preflight``)."""
    if _normalised(value) in MODES:
        return None
    return f"{value!r} is not a kernel mode; allowed: {', '.join(MODES)} (unset or empty: auto)"


def mode() -> str:
    raw = os.environ.get(ENV)
    problem = mode_problem(raw)
    if problem:
        raise ValueError(f"{ENV}: {problem}")
    return _normalised(raw)


def _build_estimate(dev: str) -> int:
    base = _BUILD_SECONDS.get(dev, 60)
    if dev == "cuda":
        base = base * 2 / min(max(os.cpu_count() or 2, 2), 4)
    return int(round(base, -1)) or 10


def _load(dev: str) -> Tuple[Optional[object], str]:
    if dev not in ("cpu", "cuda"):
        return None, f"no compiled kernels for device type {dev!r}"
    try:
        from .op_builder import BUILDERS
        b = BUILDERS[dev]()
        if not b.is_compatible():
            return None, f"{b.NAME} is not compatible here: {b.error_log}"
        if b.will_compile():
            log.warning("compiling ds_ext's comm kernels for %s (%s), once, about %d s", dev, b.arch_description(),
                        _build_estimate(dev))
        with watch(f"loading ds_ext's {dev} kernels ({b.name})"):  # says what a long wait waits for
            mod = b.load(verbose=False)
        how = b.loaded_from
        if how == "jit" and b.prebuilt_problem and "torch" in b.prebuilt_problem:
            how += f" ({b.prebuilt_problem})"
        return mod, how
    except Exception as e:  # a build error, missing ninja, ...: the torch code takes over
        text = str(e).strip()
        msg = text.splitlines()
        why = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:400]
        if "cannot find -lcudart" in text:
            why += (" (the linker found no libcudart.so: pip's CUDA runtime ships only libcudart.so.<major>; "
                    "put a libcudart.so symlink to it on LIBRARY_PATH, as run/cuda-build-check.sh does)")
        return None, why


def _unavailable(dev: str, why: str) -> None:
    """One message per device: an error on CUDA (the run is much slower without its kernels), a
    warning on the CPU."""
    if dev in _warned:
        return
    _warned.add(dev)
    if dev == "cuda":
        log.error("ds_ext.ops: the compiled CUDA kernels are unavailable, the much slower torch fallback runs "
                  "(more kernel launches and host synchronisations): %s. Prebuild them: %s "
                  "(python -m ds_ext.report shows the state)", why, PREBUILD_HINT)
    else:
        log.warning("ds_ext.ops: compiled %s kernels unavailable, using the torch fallback: %s", dev, why)


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
        _unavailable(dev, why)
    return mod


def prepare(device="cpu") -> dict:
    """Load the compiled op for ``device`` now -- prebuilt, JIT-cached, or JIT-built with one
    ``ds_ext.ops`` warning first ("compiling ds_ext's comm kernels for ..., once, about N s") -- so that a
    build happens at start-up and not inside the first training step. Returns ``status(device)`` plus
    ``seconds`` (the time this call took). ``DS_EXT_OPS=torch``: nothing is loaded; ``compiled``: raises
    when the op is unavailable; ``auto``: logs why (an error on CUDA) and the torch fallback runs."""
    dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
    t0 = time.time()
    kernels(dev)
    st = status(dev)
    st["seconds"] = round(time.time() - t0, 1)
    return st


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


def _check_range(name: str, x: torch.Tensor, start: int, end: int, error: Optional[torch.Tensor]) -> Tuple[int, int]:
    _check_1d(name, x)
    n = x.numel()
    end = n if end < 0 else end
    if not 0 <= start <= end <= n:
        raise ValueError(f"{name}: need 0 <= start <= end <= {n}, got start={start}, end={end}")
    if error is not None and (error.dim() != 1 or error.numel() != n or error.dtype != torch.float32):
        raise ValueError(f"{name}: error must be an fp32 1-D tensor as long as x")
    return start, end


def _y(x: torch.Tensor, start: int, end: int, error: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[start:end] (+ error[start:end])`` in fp32 for fp16/bf16 (the torch code's selection input)."""
    part = _compute_view(x[start:end])
    return part if error is None else part + error[start:end]


def threshold_count(x: torch.Tensor, threshold: float, start: int = 0, end: int = -1,
                    error: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The number of entries of ``x[start:end]`` (``+ error``, as in ``threshold_select``) with
    ``|.| >= threshold``, as a 0-d ``int64`` tensor on ``x``'s device: nothing is read back to the
    host. Pass ``int()`` of it (read when the caller wants, e.g. with every rank's count at once) to
    ``threshold_select(..., count=)``. NaN entries never count. ``end=-1`` means ``x.numel()``."""
    start, end = _check_range("threshold_count", x, start, end, error)
    k = kernels(x.device) if x.dtype in _KERNEL_DTYPES else None
    if k is not None:
        return k.threshold_count(x, error, float(threshold), start, end)
    return (_y(x, start, end, error).abs() >= threshold).sum()


def threshold_select(x: torch.Tensor, threshold: float, start: int = 0, end: int = -1,
                     error: Optional[torch.Tensor] = None,
                     count: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Indices and values of ``x[start:end]`` with ``|x| >= threshold``.

    With ``error`` (an fp32 vector as long as ``x``, the error-feedback memory) the selection runs on
    ``y = x + error`` (computed in fp32, never materialised) and the values are ``y`` at the selected
    indices, cast to ``x``'s dtype. The compiled kernel does the whole thing in one pass over the
    range (CPU: blocks of 64 tested at once, an exact pass only over blocks holding a hit, compaction
    into per-chunk lists, then one copy out; CUDA: per-tile counts, a scan, an ordered compaction).

    Returns ``(indices, values, count)``: global ``int64`` indices in increasing order, the values of
    ``x`` at those indices (``x``'s dtype) and ``count == indices.numel()`` as a Python int. ``end=-1``
    means ``x.numel()``. NaN entries are never selected. No sort and no top-k.

    ``count``: the exact number of hits, known beforehand (``int(threshold_count(...))`` with the same
    arguments). The output is then sized from it and nothing reads the device (no host
    synchronisation on CUDA): the torch code is ``nonzero_static(mask, size=count)`` on every device,
    the CUDA kernel skips its count read. A wrong count is an error on the CPU kernel; elsewhere the
    result is then unspecified (truncated, or padded as ``nonzero_static`` pads) but never written out
    of bounds. Without ``count`` (the host must learn it: one read of the device on CUDA):

    * CUDA, and slices shorter than ``_BLOCKED_MIN``: one mask (``|x| >= t``) and one ``nonzero``.
    * CPU, long slices: blocked. One pass of per-row ``amax`` / ``amin`` over rows of ``_ROW``
      elements finds the rows that can hold a hit; the exact mask and ``nonzero`` run on those rows
      only. At the sparse densities this op serves, that is one read of ``x`` plus a little work,
      against four full passes (abs, compare, two in ``nonzero``) that made the plain form about 8x a
      copy on one CPU thread (``run/bench-sparse.sh``). The result is identical; when more than a
      quarter of the rows hold a hit the plain form is used.
    """
    start, end = _check_range("threshold_select", x, start, end, error)
    if count is not None:
        if isinstance(count, torch.Tensor):
            raise TypeError("threshold_select: count must be a Python int (int() of threshold_count's result); "
                            "a tensor would be read back here")
        count = operator.index(count)
        if count < 0:
            raise ValueError(f"threshold_select: count must be >= 0, got {count}")
    k = kernels(x.device) if x.dtype in _KERNEL_DTYPES else None
    if k is not None:
        idx, vals = k.threshold_select(x, error, float(threshold), start, end, -1 if count is None else count)
        return idx, vals, idx.numel()
    part = _y(x, start, end, error)
    if count is not None:  # sized from the count: no host read, one algorithm on every device
        idx = torch.nonzero_static(part.abs() >= threshold, size=count).view(-1)
    elif x.device.type == "cpu" and part.numel() >= _BLOCKED_MIN:
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
    error-feedback update, fused into the same pass by the compiled kernel.

    Order of additions: the result does not depend on it only when ``indices`` are unique within one
    call. With repeats, the CPU adds in index order but CUDA (the kernel's atomics, and ``index_add_``
    in the fallback) in an unspecified order, so sums of three or more terms can differ in the last bits
    from run to run and from rank to rank. Callers that must agree bit for bit across ranks and hold
    repeats across ranks (every rank's (index, value) pairs gathered) scatter rank by rank, in rank
    order, one call per rank with that rank's unique indices. Out-of-range indices: an error on the
    CPU, a device-side assert on CUDA (no host read after the call)."""
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


def _scale_arg(scale, device: torch.device) -> Tuple[Optional[torch.Tensor], float]:
    """``(tensor on device, 0.0)`` for a tensor scale (no host read), ``(None, value)`` for a number;
    a CPU tensor for another device is read on the host (no device involved)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"sign_unpack: scale must hold one value, got {scale.numel()}")
        if scale.device == device:
            return scale.reshape(()), 0.0
        if scale.device.type == "cpu":
            return None, float(scale)
        return scale.reshape(()).to(device, non_blocking=True), 0.0
    return None, float(scale)


def sign_unpack(packed: torch.Tensor, scale, numel: int, out: Optional[torch.Tensor] = None,
                accumulate: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``sign_pack``: ``±scale`` (fp32 arithmetic) for the first ``numel`` signs, written to
    ``out`` (or a new ``dtype`` tensor), or added to ``out`` when ``accumulate``. ``scale``: a number, or
    a 0-d / one-element tensor (``sign_pack``'s), used on the device without a host read."""
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
    st, sv = _scale_arg(scale, packed.device)
    k = kernels(packed.device) if out.dtype in _KERNEL_DTYPES and out.is_contiguous() else None
    if k is not None:
        return k.sign_unpack(packed, st, sv, out, accumulate)
    bits = ((packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0).view(-1)[:numel]
    st = st.float() if st is not None else torch.full((), sv, dtype=torch.float32, device=packed.device)
    signed = torch.where(bits, st, -st)
    if accumulate:
        return out.add_(signed)
    return out.copy_(signed)


# -------------------------------------------------------------------------- segmented sign compression
def _check_offsets(name: str, offsets: Sequence[int], numel: int) -> List[int]:
    if isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name}: offsets must be a host list of ints (a tensor would be read back here)")
    offs = [operator.index(o) for o in offsets]
    if not offs:
        raise ValueError(f"{name}: offsets needs at least one entry (T + 1 for T segments)")
    if offs[0] < 0 or offs[-1] > numel or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"{name}: offsets must be non-decreasing within [0, {numel}], got {offs[:4]}"
                         f"{'...' if len(offs) > 4 else ''}{offs[-1:] if len(offs) > 4 else ''}")
    return offs


class _SegPlan:
    """Host layout of a segmentation (and its small device tensor), cached per device and offsets."""

    def __init__(self, offs: List[int], device: torch.device):
        self.offs = offs
        self.lo, self.hi = offs[0], offs[-1]
        self.n = self.hi - self.lo
        self.lengths = [b - a for a, b in zip(offs, offs[1:])]
        self.byte_off = [0]
        for m in self.lengths:
            self.byte_off.append(self.byte_off[-1] + (m + 7) // 8)
        self.nbytes = self.byte_off[-1]
        # every segment but the last a whole number of bytes: the bits of the range are already in place
        self.aligned = all(m % 8 == 0 for m in self.lengths[:-1])
        self.lengths_t = _host_to(self.lengths, device)
        self.pad = torch.zeros(8, dtype=torch.bool, device=device)

    def padded_bits(self, pos: torch.Tensor) -> torch.Tensor:
        """The bits of [lo, hi) with each segment padded to whole bytes (one ``cat`` of views)."""
        if self.aligned:
            tail = 8 * self.nbytes - self.n
            return torch.cat([pos, self.pad[:tail]]) if tail else pos
        pieces = []
        for a, m in zip(self.offs, self.lengths):
            pieces.append(pos[a - self.lo:a - self.lo + m])
            if m % 8:
                pieces.append(self.pad[:8 - m % 8])
        return torch.cat(pieces)

    def unpadded_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Inverse of ``padded_bits``: the bits of the elements of [lo, hi) from the byte-padded stream."""
        if self.aligned:
            return bits[:self.n]
        return torch.cat([bits[8 * bo:8 * bo + m] for bo, m in zip(self.byte_off, self.lengths)])

    def per_element(self, per_segment: torch.Tensor) -> torch.Tensor:
        return per_segment.repeat_interleave(self.lengths_t, output_size=self.n)


_SEG_PLANS: "OrderedDict[tuple, _SegPlan]" = OrderedDict()


def _host_to(values: List[int], device: torch.device) -> torch.Tensor:
    """A host list as an int64 tensor on ``device``: pinned and non-blocking for CUDA (a pageable copy
    would synchronise the stream)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _seg_plan(offs: List[int], device: torch.device) -> _SegPlan:
    key = (device, tuple(offs))
    plan = _SEG_PLANS.get(key)
    if plan is None:
        plan = _SEG_PLANS[key] = _SegPlan(offs, device)
        if len(_SEG_PLANS) > 32:
            _SEG_PLANS.popitem(last=False)
    else:
        _SEG_PLANS.move_to_end(key)
    return plan


def sign_pack_segments(x: torch.Tensor, offsets: Sequence[int],
                       residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sign_pack`` of every segment ``x[offsets[t]:offsets[t+1]]`` (``offsets``: a host list of T + 1
    non-decreasing ints) in one call: ``(packed, scales)`` with ``packed`` ``uint8[sum_t ceil(n_t/8)]``,
    each segment's signs packed from its own byte boundary exactly as ``sign_pack`` packs them (bit j of
    byte b of segment t is element ``offsets[t] + 8b + j``; unused high bits 0), and ``scales``
    ``fp32[T]``, ``scales[t] = mean |segment t|`` accumulated in fp64 (0 for an empty segment).
    ``residual`` (an fp32 vector as long as ``x``, may be ``x`` itself): receives
    ``x - scales[t] * sign(x)`` on every segment (elements outside the segments untouched).

    Equal, bit for bit, to ``[sign_pack(x[a:b], residual[a:b]) for a, b in segments]`` concatenated, on
    either path (compiled or torch). No host synchronisation: CUDA launches three kernels for all
    segments together (partial sums over min(1024, ceil(n_t/256)) blocks of each segment, one thread per
    segment to finish its scale, one pass packing and writing the residual); the segment table is one
    pinned, non-blocking copy."""
    _check_1d("sign_pack_segments", x)
    offs = _check_offsets("sign_pack_segments", offsets, x.numel())
    if residual is not None and (residual.dim() != 1 or residual.numel() != x.numel()
                                 or residual.dtype != torch.float32):
        raise ValueError("sign_pack_segments: residual must be an fp32 1-D tensor as long as x")
    k = (kernels(x.device) if x.dtype in _KERNEL_DTYPES and (residual is None or residual.is_contiguous())
         else None)
    if k is not None:
        return tuple(k.sign_pack_segments(x, offs, residual))
    plan = _seg_plan(offs, x.device)
    v = _compute_view(x)
    # the scales exactly as sign_pack computes each (same reduction: bit-equal to the loop)
    zero = torch.zeros((), device=x.device)
    scales = [(v[a:b].abs().sum(dtype=torch.float64) / (b - a)).float() if b > a else zero
              for a, b in zip(offs, offs[1:])]
    scales = torch.stack(scales) if scales else torch.zeros(0, device=x.device)
    sub = v[plan.lo:plan.hi]
    pos = sub >= 0
    bits = plan.padded_bits(pos)
    packed = (bits.view(-1, 8).to(torch.uint8) * _bit_weights(x.device)).sum(1, dtype=torch.uint8)
    if residual is not None and plan.n:
        sc = plan.per_element(scales)
        residual[plan.lo:plan.hi].copy_(sub.float() - torch.where(pos, sc, -sc))
    return packed, scales


def sign_unpack_segments(packed: torch.Tensor, scales: torch.Tensor, offsets: Sequence[int], out: torch.Tensor,
                         accumulate: bool = False) -> torch.Tensor:
    """Inverse of ``sign_pack_segments``: ``out[offsets[t] + i] = ±scales[t]`` (fp32 arithmetic, in
    ``out``'s dtype) for every element of every segment, or added to ``out`` when ``accumulate``;
    elements outside the segments untouched. ``scales``: an ``fp32[T]`` tensor on ``out``'s device, read
    there (no host read). Equal, bit for bit, to a loop of ``sign_unpack`` over the segments. CUDA: one
    kernel for all segments."""
    _check_1d("sign_unpack_segments", packed)
    _check_1d("sign_unpack_segments", out)
    offs = _check_offsets("sign_unpack_segments", offsets, out.numel())
    if packed.dtype != torch.uint8:
        raise ValueError(f"sign_unpack_segments: packed must be uint8, got {packed.dtype}")
    if not isinstance(scales, torch.Tensor) or scales.numel() != len(offs) - 1:
        raise ValueError(f"sign_unpack_segments: scales must be a tensor of {len(offs) - 1} values (one per segment)")
    scales = scales.reshape(-1)
    if scales.device != out.device:
        scales = scales.to(out.device, non_blocking=True)
    if scales.dtype != torch.float32:
        scales = scales.float()
    plan = _seg_plan(offs, out.device)
    if packed.numel() < plan.nbytes:
        raise ValueError(f"sign_unpack_segments: {packed.numel()} bytes, the segments need {plan.nbytes}")
    k = kernels(out.device) if out.dtype in _KERNEL_DTYPES and out.is_contiguous() else None
    if k is not None:
        return k.sign_unpack_segments(packed, scales, offs, out, accumulate)
    if not plan.n:
        return out
    bits = ((packed[:plan.nbytes].reshape(-1, 1) & _bit_weights(packed.device)) != 0).view(-1)
    bits = plan.unpadded_bits(bits)
    sc = plan.per_element(scales)
    signed = torch.where(bits, sc, -sc)
    seg = out[plan.lo:plan.hi]
    if accumulate:
        seg.add_(signed)
    else:
        seg.copy_(signed)
    return out


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
