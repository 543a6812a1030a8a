"""Host reads made by ds_ext's own code per optimizer step (issue 14), counted on real DeepSpeed engines.

``HostReadCounter`` is a ``torch.overrides.TorchFunctionMode``: every torch function / ``Tensor`` method
called while it is active passes through its ``__torch_function__``, which counts the calls that read
device data on the host (``READS``: ``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``,
``__index__``, ``cpu``, ``numpy``, ``nonzero``, ``is_nonzero``). A read is attributed to the nearest Python
frame outside torch (frames inside the torch package and the counter's own frames are skipped); it is
one of ds_ext's when that frame's file is under ``prefix`` (the repository's ``ds_ext/`` directory by
default). Reads from elsewhere (DeepSpeed, the model, the training loop) are kept apart, for the record.

Two properties of torch function modes that matter here:

* While ``__torch_function__`` runs, the mode is popped from the mode stack, so nothing that ``func``
  itself calls is seen. For ``Tensor.backward`` / ``torch.autograd.backward`` that would hide every
  gradient hook (ds_ext's reducers work inside ``register_post_accumulate_grad_hook`` hooks, D-GraB's
  capture in ``Tensor.register_hook`` hooks): the counter runs the backward itself with the mode pushed
  again (``_backward``), so the hooks' reads are counted.
* Python-level torch functions that dispatch through ``handle_torch_function`` (``torch.unique``,
  ``Tensor.split``, ``torch.nn.functional.*``) are seen as one call; reads inside them are not (none of
  the functions ds_ext calls on its step path reads the host internally).

Beyond the counted reads, ``SHAPED`` records calls whose output size depends on the data (``unique``,
``masked_select``, boolean-mask indexing): on a GPU they synchronise with the host although nothing is
read in Python. They are reported, not counted.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.autograd as _autograd
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
PKG_PREFIX = str(ROOT / "ds_ext") + os.sep
TORCH_PREFIX = str(Path(torch.__file__).resolve().parent) + os.sep

T = torch.Tensor
READS = {
    T.item: "item", T.tolist: "tolist", T.__bool__: "__bool__", T.__int__: "__int__", T.__float__: "__float__",
    T.__index__: "__index__", T.cpu: "cpu", T.numpy: "numpy", T.nonzero: "nonzero", torch.nonzero: "nonzero",
    torch.is_nonzero: "is_nonzero", T.is_nonzero: "is_nonzero",
}
SHAPED = {torch.unique: "unique", T.unique: "unique", torch.unique_consecutive: "unique_consecutive",
          torch.masked_select: "masked_select", T.masked_select: "masked_select"}
_INDEXING = {T.__getitem__: "getitem[bool mask]", T.__setitem__: "setitem[bool mask]"}
_BACKWARD = (T.backward, _autograd.backward)


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


class HostReadCounter(TorchFunctionMode):
    """Counts host reads per call site while active (``with HostReadCounter() as c: ...``).

    ``reads``: ``Counter`` of ``(site, function)`` for reads attributed to ``prefix`` (ds_ext);
    ``foreign``: the same for reads attributed elsewhere; ``shaped``: data-dependent-shape calls under
    ``prefix``. A site is ``path:line`` relative to the repository (absolute outside it)."""

    def __init__(self, prefix: str = PKG_PREFIX):
        super().__init__()
        self.prefix = prefix
        self.reads: Counter = Counter()
        self.foreign: Counter = Counter()
        self.shaped: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = READS.get(func)
        if name is not None:
            site, ours = self._site()
            (self.reads if ours else self.foreign)[(site, name)] += 1
        else:
            name = SHAPED.get(func)
            if name is None and func in _INDEXING and len(args) > 1 and _bool_index(args[1]):
                name = _INDEXING[func]
            if name is not None:
                site, ours = self._site()
                if ours:
                    self.shaped[(site, name)] += 1
        if func in _BACKWARD:
            return self._backward(func, args, kwargs)
        return func(*args, **kwargs)

    def _site(self):
        """(``file:line``, under ``prefix``) of the nearest frame outside torch and outside this mode."""
        f = sys._getframe(1)
        while f is not None:
            fn = f.f_code.co_filename
            if f.f_code not in _OWN_CODE and not fn.startswith(TORCH_PREFIX):
                break
            f = f.f_back
        if f is None:
            return "<no frame>", False
        fn = f.f_code.co_filename
        try:
            rel = str(Path(fn).resolve().relative_to(ROOT))
        except ValueError:
            rel = fn
        return f"{rel}:{f.f_lineno}", fn.startswith(self.prefix)

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


def _never(*_args, **_kwargs) -> bool:
    return False


_OWN_CODE = {HostReadCounter.__torch_function__.__code__, HostReadCounter._site.__code__,
             HostReadCounter._backward.__code__, _never.__code__, _bool_index.__code__}


# ------------------------------------------------------------------------------------- the methods
CONTROL = "control: allreduce, check_every=1"


def methods_two_ranks() -> dict:
    """name -> spec of every method measured on 2 ranks (spec: ``method`` for ``attach``; optional
    ``order`` (a gradient-driven order's name), ``gas``, ``micro`` (default 1 and 8), ``check_every``)."""
    return {
        "allreduce": {"method": {"reducer": {"name": "allreduce"}}},
        "allreduce (4 buckets)": {"method": {"reducer": {"name": "allreduce", "bucket_mb": 0.01}}},
        "powersgd": {"method": {"reducer": {"name": "powersgd", "start_powerSGD_iter": 0}}},
        "acpsgd": {"method": {"reducer": {"name": "acpsgd"}}},
        "topk allgather": {"method": {"reducer": {"name": "topk", "exchange": "allgather"}}},
        "topk union": {"method": {"reducer": {"name": "topk", "exchange": "union"}}},
        "exdyna": {"method": {"reducer": {"name": "exdyna"}}},
        "signsgd": {"method": {"reducer": {"name": "signsgd"}}},
        "deepspeed": {"method": {"reducer": {"name": "deepspeed"}}},
        "cdgrab": {"method": {"reducer": {"name": "cdgrab"}}, "order": "cdgrab", "gas": 2, "micro": 1},
        "dgrab + allreduce": {"method": {"reducer": {"name": "allreduce"}}, "order": "dgrab", "gas": 2, "micro": 1},
        "local h=2": {"method": {"reducer": {"name": "none"}, "sync": {"name": "local", "h": 2}}},
        # groups must divide the world: on 2 ranks groups 1 averages over the world (groups 2 would be
        # groups of one rank, which never communicate); real subgroups: methods_four_ranks
        "dssync groups=1": {"method": {"reducer": {"name": "none"}, "sync": {"name": "dssync", "groups": 1}}},
        # the negative control: the consistency check digests every parameter on the host each step
        # (ds_ext.deepspeed.attach.parameter_fingerprint: .cpu() and .numpy() per parameter), so it must be caught
        CONTROL: {"method": {"reducer": {"name": "allreduce"}}, "check_every": 1},
    }


def methods_four_ranks() -> dict:
    return {"dssync groups=2": {"method": {"reducer": {"name": "none"}, "sync": {"name": "dssync", "groups": 2}}}}


def _engine(world: int, gas: int, micro: int):
    import deepspeed

    from tests.dist.workers import tiny_model

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"train_batch_size": micro * gas * world, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": gas, "steps_per_print": 10**12, "zero_optimization": {"stage": 0},
           "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def measure(rank, world, methods, warmup=3, steps=4, ops_mode="torch", names=None):
    """For each method: a fresh engine, ``warmup`` optimizer steps, then ``steps`` steps inside a
    ``HostReadCounter``. Returns {name: {"reads", "foreign", "shaped", "steps", "skipped", "error"}}
    (``steps``: optimizer steps counted; ``skipped``: non-finite skips over the whole run, 0 expected).

    ``ops_mode`` sets ``DS_EXT_OPS`` (``torch``: the torch code of ``ds_ext.ops``, whose reads are visible
    in Python; the compiled kernels' internals are not). A method that fails is reported with its error."""
    import traceback

    from ds_ext.deepspeed.attach import attach
    from ds_ext.registry import ORDERS, load_builtin
    from tests.dist.workers import rank_batches

    os.environ["DS_EXT_OPS"] = ops_mode
    load_builtin()
    out = {}
    for name, spec in methods.items():
        if names is not None and name not in names:
            continue
        gas, micro = spec.get("gas", 1), spec.get("micro", 8)
        rec = {"reads": Counter(), "foreign": Counter(), "shaped": Counter(), "steps": 0, "skipped": 0, "error": None}
        counter = None
        try:
            engine = _engine(world, gas, micro)
            order = None
            if spec.get("order"):
                # a long epoch: every measured microbatch is mid-epoch (no sort at an epoch boundary)
                spe = 100
                order = ORDERS.build(spec["order"], {}, spe * gas * micro * world, rank, world, 0)
                order.plan(micro, gas, spe)
            att = attach(engine, spec["method"], order=order, check_every=spec.get("check_every", 0), nonfinite="skip")
            dtype = next(engine.module.parameters()).dtype
            batches = rank_batches(rank, (warmup + steps) * gas, micro, dtype)
            for i, (x, y) in enumerate(batches):
                if i == warmup * gas:
                    counter = HostReadCounter().__enter__()
                    done = att.steps
                engine.backward(F.cross_entropy(engine(x).float(), y))
                engine.step()
            counter.__exit__(None, None, None)
            counter, active = None, counter
            rec.update(reads=active.reads, foreign=active.foreign, shaped=active.shaped,
                       steps=att.steps - done, skipped=att.skipped_steps)
            att.detach()
        except Exception as e:  # reported per method, the others still run (every rank fails alike)
            rec["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
            if counter is not None:
                counter.__exit__(None, None, None)
        out[name] = rec
    return out
