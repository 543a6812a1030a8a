"""Host synchronisations made by ds_ext's own code (issues 14 and 27), counted on any device, CPU included.

``SyncCounter`` is a ``torch.overrides.TorchFunctionMode``: every torch function / ``Tensor`` method called while
it is active passes through its ``__torch_function__``, which counts the calls that would block the host on a
CUDA device. On CPU nothing blocks, so it counts the *call patterns* that do on CUDA; on a GPU
``torch.cuda.set_sync_debug_mode`` counts the real ones (the GPU check). Three kinds, all in the budget:

* **host reads** (``READS``): ``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``,
  ``cpu``, ``numpy``, ``nonzero``, ``is_nonzero``, ``equal``, ``allclose``, ``__contains__``, ``__array__``,
  ``__repr__``, ``__format__``, ``.to("cpu")``, ``copy_`` into a host tensor;
* **host-to-device copies that block**: ``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor`` of data
  that is not a device tensor (a Python list or scalar, a numpy array, a host tensor) onto a device (a pageable
  copy: PyTorch synchronises the stream after it); ``Tensor.to(device)`` / ``.cuda()`` / ``copy_`` from a host
  tensor without ``non_blocking=True``;
* **data-dependent shapes** (``SHAPED``): ``unique``, ``unique_consecutive``, ``masked_select``, ``argwhere``,
  ``bincount``, single-argument ``torch.where``, ``repeat_interleave`` with tensor repeats and no ``output_size``,
  boolean-mask ``__getitem__`` / ``__setitem__``: the output size is read back from the device.

What is a device and what is the host, when everything is on the CPU: a ``device=`` argument (or ``.to``'s
target) counts as *the device* unless it is the string ``"cpu"`` (``"cpu"`` spelled out is host placement;
ds_ext names its device with a ``torch.device``: ``comm.device``, a parameter's ``.device``). A tensor is
*host* when the counter saw it made on the host while active (a factory call with no device or ``"cpu"``:
``torch.tensor(list)``, ``torch.zeros(n)``; ``.cpu()``; ``.to("cpu")``; any op whose tensor inputs are all host
tensors) and is not moved to the device afterwards. Everything else, including tensors made before the counter
was entered, is treated as device data (conservative: a read of it counts). Reads and shape calls on host tensors
are free (no sync), and a blocking copy needs a host source, so ``.to(comm.device)`` of a tensor made before the
counter started is not counted: the GPU check covers those.

A sync is attributed to the nearest Python frame outside torch (frames inside the torch package and the
counter's own frames are skipped); it is one of ds_ext's when that frame's file is under ``prefix`` (the
repository's ``ds_ext/`` directory by default). The site also names the nearest frame further out, in another
file, that is under ``prefix`` (``<- file:line function``): who called ``Communicator.tensor``, or where in
ds_ext DeepSpeed's own read ran. Syncs from elsewhere (DeepSpeed, the model, the training loop) are kept apart
(``foreign``), for the record.

Two properties of torch function modes that matter here:

* While ``__torch_function__`` runs, the mode is popped from the mode stack, so nothing that ``func``
  itself calls is seen. For ``Tensor.backward`` / ``torch.autograd.backward`` that would hide every
  gradient hook (ds_ext's reducers work inside ``register_post_accumulate_grad_hook`` hooks, D-GraB's
  capture in ``Tensor.register_hook`` hooks): the counter runs the backward itself with the mode pushed
  again (``_backward``), so the hooks' syncs are counted.
* Python-level torch functions that dispatch through ``handle_torch_function`` (``torch.unique``,
  ``Tensor.split``, ``torch.nn.functional.*``) are seen as one call; syncs inside them are not (none of
  the functions ds_ext calls on its step path syncs internally, except ``clip_grad_norm_(...,
  error_if_nonfinite=True)``, whose read is charged to its caller: see the tests).
"""
from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
import torch.autograd as _autograd
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
PKG_PREFIX = str(ROOT / "ds_ext") + os.sep
TORCH_PREFIX = str(Path(torch.__file__).resolve().parent) + os.sep

T = torch.Tensor
READS = {
    T.item: "item", T.tolist: "tolist", T.__bool__: "__bool__", T.__int__: "__int__", T.__float__: "__float__",
    T.__index__: "__index__", T.cpu: "cpu", T.numpy: "numpy", T.nonzero: "nonzero", torch.nonzero: "nonzero",
    torch.is_nonzero: "is_nonzero", T.is_nonzero: "is_nonzero", torch.equal: "equal", T.equal: "equal",
    torch.allclose: "allclose", T.allclose: "allclose", T.__contains__: "__contains__", T.__array__: "__array__",
    T.__repr__: "__repr__", T.__format__: "__format__",
}
SHAPED = {torch.unique: "unique", T.unique: "unique", torch.unique_consecutive: "unique_consecutive",
          T.unique_consecutive: "unique_consecutive", torch.masked_select: "masked_select",
          T.masked_select: "masked_select", torch.argwhere: "argwhere", T.argwhere: "argwhere",
          torch.bincount: "bincount", T.bincount: "bincount"}
_INDEXING = {T.__getitem__: "getitem[bool mask]", T.__setitem__: "setitem[bool mask]"}
_WHERE = (torch.where, T.where)
_REPEAT = (torch.repeat_interleave, T.repeat_interleave)
_NEW = {torch.tensor: "tensor", torch.as_tensor: "as_tensor"}
_BACKWARD = (T.backward, _autograd.backward)
_NOT_SET = object()


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


def _to_target(args, kwargs):
    """``Tensor.to``'s target: (device argument or ``_NOT_SET`` for a dtype-only call, non_blocking)."""
    device, rest = kwargs.get("device", _NOT_SET), list(args[1:])
    if rest and isinstance(rest[0], (str, int, torch.device, torch.Tensor)) and not isinstance(rest[0], bool):
        device = rest.pop(0)
    rest = [r for r in rest if not isinstance(r, torch.dtype)]
    non_blocking = kwargs.get("non_blocking", rest[0] if rest and isinstance(rest[0], bool) else False)
    return device, bool(non_blocking)


class SyncCounter(TorchFunctionMode):
    """Counts host synchronisations per call site while active (``with SyncCounter() as c: ...``).

    ``syncs``: ``Counter`` of ``(site, what)`` attributed to ``prefix`` (ds_ext); ``foreign``: the same for
    syncs attributed elsewhere. ``what`` is the torch function (``item``, ``unique``), ``tensor(host data)``
    for a pageable host-to-device copy or ``<fn>(blocking H2D)`` for a blocking copy. A site is
    ``path:line function`` relative to the repository (after ``site-packages/`` outside it)."""

    def __init__(self, prefix: str = PKG_PREFIX):
        super().__init__()
        self.prefix = prefix
        self.syncs: Counter = Counter()
        self.foreign: Counter = Counter()
        self._host = {}  # id -> weakref of every tensor known to live in host memory

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    # ---- host tensors
    def _on_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, out, host: bool) -> None:
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if not isinstance(t, torch.Tensor):
                continue
            if host:
                self._host[id(t)] = weakref.ref(t, lambda _r, k=id(t), h=self._host: h.pop(k, None))
            else:
                self._host.pop(id(t), None)

    def _is_host(self, device) -> bool:
        """A placement argument that means the host: absent, or the string ``cpu`` (``cpu:0``) spelled out in a
        frame under ``prefix`` (elsewhere it is the device: DeepSpeed names the CPU accelerator's device
        ``"cpu"``, ``get_accelerator().current_device_name()``, where it names ``cuda:0`` on a GPU)."""
        if device is None:
            return True
        if not (isinstance(device, str) and device.split(":")[0] == "cpu"):
            return False
        f = self._caller()
        return f is not None and f.f_code.co_filename.startswith(self.prefix)

    # ---- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what, host_out = self._classify(func, args, kwargs)
        if what is not None:
            site, ours = self._site()
            (self.syncs if ours else self.foreign)[(site, what)] += 1
        if func in _BACKWARD:
            return self._backward(func, args, kwargs)
        out = func(*args, **kwargs)
        if host_out is not None:
            if host_out and func in (T.cpu, T.to) and out is args[0] and not self._on_host(out):
                out = out[...]  # ``.cpu()`` of a CPU tensor is itself: a new object, as on CUDA, marked host
            self._mark(out, host_out)
        return out

    def _classify(self, func, args, kwargs):
        """(what is counted or None, whether the output lives on the host: True, False, None for unchanged)."""
        if func in _NEW or func is T.new_tensor:
            return self._new(func, args, kwargs)
        if func is T.to or func is T.cuda:
            return self._move(func, args, kwargs)
        if func is T.copy_:
            return self._copy(args, kwargs)
        ins = list(_tensors(args, kwargs))
        if ins and all(self._on_host(t) for t in ins):
            return None, True  # host data: nothing waits for a device
        name = READS.get(func)
        if name is not None:
            return name, (True if func is T.cpu else None)
        name = SHAPED.get(func) or self._shaped(func, args, kwargs)
        if name is not None:
            return name, None
        if not ins:  # a factory: on the host unless placed on a device
            return None, self._is_host(kwargs.get("device"))
        return None, None

    def _new(self, func, args, kwargs):
        """``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor``: a copy from the host to the device
        blocks (pageable memory); Python data is host data; device tensors inside it are read."""
        if func is T.new_tensor:
            owner, data = args[0], (args[1] if len(args) > 1 else kwargs.get("data"))
            device = kwargs["device"] if "device" in kwargs else (None if self._on_host(owner) else owner.device)
        else:
            data, device = (args[0] if args else kwargs.get("data")), kwargs.get("device")
        name = _NEW.get(func, "new_tensor")
        if isinstance(data, torch.Tensor) and device is None and func is not T.new_tensor:
            return None, (True if self._on_host(data) else None)  # stays where it is
        if self._is_host(device):
            read = any(not self._on_host(t) for t in _tensors((data,), {}))
            return (f"{name}(device data)" if read else None), True
        if isinstance(data, torch.Tensor) and not self._on_host(data):
            return None, False  # device to device
        return f"{name}(host data)", False

    def _move(self, func, args, kwargs):
        """``Tensor.to`` / ``Tensor.cuda``: to the host is a read; from the host a blocking copy unless
        ``non_blocking``; the result is on the device (even when it is the same object, as on CPU)."""
        if func is T.to:
            device, non_blocking = _to_target(args, kwargs)
        else:
            device, non_blocking = kwargs.get("device", "cuda"), bool(kwargs.get("non_blocking", False))
        if device is _NOT_SET:
            return None, None  # a dtype change where the tensor is
        if isinstance(device, torch.Tensor):
            device = None if self._on_host(device) else device.device
        src = args[0]
        if self._is_host(device):
            return (None if self._on_host(src) else "to(cpu)"), True
        return (f"{func.__name__}(blocking H2D)" if self._on_host(src) and not non_blocking else None), False

    def _copy(self, args, kwargs):
        """``dst.copy_(src)``: into a host tensor from the device is a read; from the host into the device
        blocks unless ``non_blocking``."""
        dst, src = args[0], (args[1] if len(args) > 1 else kwargs.get("src"))
        non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
        if not isinstance(src, torch.Tensor):
            return None, None
        if self._on_host(dst):
            return (None if self._on_host(src) else "copy_(D2H)"), None
        return ("copy_(blocking H2D)" if self._on_host(src) and not non_blocking else None), None

    @staticmethod
    def _shaped(func, args, kwargs):
        if func in _INDEXING and len(args) > 1 and _bool_index(args[1]):
            return _INDEXING[func]
        if func in _WHERE and len(args) + len(kwargs) == 1:
            return "where(cond)"
        if func in _REPEAT and kwargs.get("output_size") is None:
            reps = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
            if isinstance(reps, torch.Tensor):  # the output size is the sum of the repeats
                return "repeat_interleave"
        return None

    def _site(self):
        """(``file:line function`` of the nearest frame outside torch and outside this mode, with the nearest
        frame under ``prefix`` further out in another file; whether the first is under ``prefix``)."""
        f = self._caller()
        if f is None:
            return "<no frame>", False
        fn = f.f_code.co_filename
        site = _where(f)
        up = f.f_back
        while up is not None and (up.f_code.co_filename == fn or not up.f_code.co_filename.startswith(self.prefix)):
            up = up.f_back
        if up is not None:
            site += f" <- {_where(up)}"
        return site, fn.startswith(self.prefix)

    @staticmethod
    def _caller():
        """The nearest frame outside torch and outside this mode (None if there is none)."""
        f = sys._getframe(1)
        while f is not None and (f.f_code in _OWN_CODE or f.f_code.co_filename.startswith(TORCH_PREFIX)):
            f = f.f_back
        return f

    def _backward(self, func, args, kwargs):
        """Run a backward with this mode active, so that gradient hooks are counted: the mode is pushed
        again and ``torch.autograd.backward``'s own ``__torch_function__`` check is bypassed for the call
        (it would hand the call straight back to this mode)."""
        if func is T.backward:
            tensor, rest = args[0], args[1:]
            kw = dict(zip(("gradient", "retain_graph", "create_graph", "inputs"), rest))
            kw.update(kwargs)
            call_args = (tensor, kw.get("gradient"), kw.get("retain_graph"), kw.get("create_graph", False))
            call_kwargs = {"inputs": kw.get("inputs")}
        else:
            call_args, call_kwargs = args, kwargs
        saved = _autograd.has_torch_function
        _autograd.has_torch_function = _never
        try:
            with self:
                return _autograd.backward(*call_args, **call_kwargs)
        finally:
            _autograd.has_torch_function = saved


def _where(f) -> str:
    fn = f.f_code.co_filename
    try:
        rel = str(Path(fn).resolve().relative_to(ROOT))
    except ValueError:
        rel = fn.split("site-packages" + os.sep, 1)[-1]
    return f"{rel}:{f.f_lineno} {f.f_code.co_qualname}"


def _never(*_args, **_kwargs) -> bool:
    return False


_OWN_CODE = {c.__code__ for c in (
    SyncCounter.__torch_function__, SyncCounter._classify, SyncCounter._new, SyncCounter._move, SyncCounter._copy,
    SyncCounter._shaped, SyncCounter._site, SyncCounter._caller,
    SyncCounter._backward, SyncCounter._on_host, SyncCounter._mark, SyncCounter._is_host, _never, _bool_index,
    _tensors, _to_target, _where)}
