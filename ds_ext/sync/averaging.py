"""Parameter averaging: the machinery every averaging synchronizer shares (``_Averaging``: the period, what
is averaged, evaluation of the average model, state) and ``local`` (Local SGD / Local AdamW, constant H,
QSR or post-local). A period (``schedules.py``) decides *when* to average, the synchronizer *with whom*
(``local``: everybody; ``dssync.py``: shuffled groups).

``local`` -- Local SGD / Local AdamW as in the QSR paper (Gu et al., ICLR 2024, Algorithm 1 with the
synchronisation period of eq. 3) and its reference (hmgxr128/QSR ``localopt.py: LocalOptimizer``):
every rank steps its own optimizer on its own gradient (the gradient reducer is ``none``, the engine's
allreduce is off); after H optimizer steps the parameters are averaged over the data-parallel group
with one fused flat allreduce (optionally Adam's first / second moments: ``avg_m`` / ``avg_v``; for
SGD ``avg_m`` averages the momentum buffer). BatchNorm buffers are not touched at a sync (as the
reference); with ``bn_batches > 0`` they are re-estimated before each evaluation on that many training
batches in total (``bn_batches / world`` per rank, cumulative average, then averaged over ranks), as
the reference's ``estimate_BN_params``.

Deliberate deviations from the reference code, named (Local SGD / QSR):
* The last round: with a constant H the last round is shortened to end, with an averaging, on the last
  step (``schedules.Period._clamp``), so a run always ends on averaged parameters; the reference
  (``localopt.py``) clamps H to the remaining steps only in its QSR branch, so with a constant H its
  trailing ``total % H`` local steps are never averaged.
* (Not a deviation: the first QSR round is the reference's, the rule at the first step's learning rate
  unless step 0 is in the LR warm-up, ``schedules.QSR``; ``init_h`` is the warm-up's H.)
* ``power`` defaults to 2 (eq. 3; the reference's command-line default is 1.0, its scripts pass 2) and
  ``init_h`` to ``h_base`` (the reference's: 1); an LR <= 0 gives H = the remaining steps (the reference
  divides by 0); every trainable parameter is averaged (the reference: those with a gradient).
* ``avg_m`` / ``avg_v`` name the moments from the optimizer's parameter groups, and a rank without state
  yet (its first step skipped for a non-finite gradient) sends zeros for them (``_Averaging._tensors``):
  the reference has no skipped steps, and an average over whatever state each rank holds would be a
  collective of different sizes on different ranks.

* Evaluation between syncs (when local parameters differ) scores the *average* model: parameters are
  averaged into the module for the evaluation (not counted as training traffic) and the local ones
  restored afterwards. The reference only evaluates at sync points.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Literal, Optional, Tuple

import torch
from pydantic import Field, model_validator

from ..registry import SYNCS, Options
from .base import Synchronizer

_PERIOD_FIELDS = {"constant": {"h"}, "qsr": {"alpha", "h_base", "power", "init_h", "warmup_steps"},
                  "postlocal": {"switch_step", "h"}}


class AveragingOptions(Options):
    period: Literal["constant", "qsr", "postlocal"] = Field(
        "constant", description="constant H, the QSR rule, or post-local SGD")
    h: int = Field(4, ge=1, description="local steps per round (constant; post-local after the switch)")
    alpha: Optional[float] = Field(None, ge=0, description="QSR alpha: H = max(h_base, floor((alpha/lr)^power))")
    h_base: int = Field(4, ge=1, description="QSR minimum H")
    power: float = Field(2.0, gt=0, description="QSR exponent (the paper's rule: 2)")
    init_h: Optional[int] = Field(None, ge=1, description="QSR H during LR warm-up (default h_base)")
    warmup_steps: Optional[int] = Field(None, ge=0, description="QSR warm-up length (default: the LR schedule's)")
    switch_step: int = Field(0, ge=0, description="post-local: data-parallel before this optimizer step")
    avg_m: bool = Field(False, description="also average Adam exp_avg (SGD: momentum_buffer)")
    avg_v: bool = Field(False, description="also average Adam exp_avg_sq")
    avg_buffers: bool = Field(False, description="also average BatchNorm running statistics at each sync")
    bn_batches: int = Field(0, ge=0, description="re-estimate BatchNorm statistics on this many training "
                                                  "batches (in total) before each evaluation; 0: off")
    clip_grad_norm: Optional[float] = Field(None, gt=0, description="clip each rank's local gradient to this "
                                                                    "L2 norm before its step (no communication)")

    @model_validator(mode="after")
    def _period_fields(self):
        given = self.model_fields_set
        other = set().union(*_PERIOD_FIELDS.values()) - _PERIOD_FIELDS[self.period]
        stray = sorted(given & other)
        if stray:
            raise ValueError(f"{', '.join(stray)} do(es) not apply to period {self.period!r} (it uses: "
                             f"{', '.join(sorted(_PERIOD_FIELDS[self.period]))})")
        if self.period == "qsr" and self.alpha is None:
            raise ValueError("period 'qsr' needs alpha (e.g. 0.0175 for the QSR paper's ViT-B recipe)")
        if self.period == "postlocal" and "switch_step" not in given:
            raise ValueError("period 'postlocal' needs switch_step (the optimizer step where local rounds start)")
        return self


class LocalOptions(AveragingOptions):
    hierarchical: bool = Field(False, description="average gradients exactly inside each node every step and "
                                                  "parameters across nodes on the period (ds_ext/hierarchy.py)")


def _check_common(view, name: str) -> list:
    """The rules every parameter-averaging synchronizer shares (reducer, clipping, precision)."""
    problems = []
    red = view.names["reducer"]
    o = view.options.get("sync")
    period = getattr(o, "period", "constant")
    if red == "deepspeed":
        problems.append(f"sync {name!r} needs our reducers (the engine's own allreduce cannot be switched off per "
                        f"step): use reducer 'none'" + (" or 'allreduce'" if period == "postlocal" else ""))
    elif period == "postlocal" and red == "none":
        problems.append("period 'postlocal' averages gradients before switch_step: set method.reducer to "
                        "'allreduce' (or another gradient reducer)")
    elif period != "postlocal" and red != "none":
        problems.append(f"sync {name!r} with period {period!r} takes local steps: method.reducer must be 'none' "
                        f"(got {red!r}, which would communicate gradients every step)")
    if float(view.deepspeed.get("gradient_clipping", 0) or 0) > 0:
        problems.append(f"sync {name!r}: deepspeed.gradient_clipping clips with a gradient norm averaged over all "
                        f"ranks (one allreduce every step); use method.sync.clip_grad_norm, which clips each rank's "
                        f"local gradient without communicating")
    prec = view.precision()
    if prec in ("bf16", "fp16"):
        problems.append(f"sync {name!r} averages the module's parameters, but DeepSpeed {prec} keeps separate fp32 "
                        f"master weights that would overwrite them: use fp32 parameters with mixed-precision "
                        f"compute instead, deepspeed.torch_autocast: {{enabled: true, dtype: "
                        f"{'bfloat16' if prec == 'bf16' else 'float16'}}}")
    out = [("method.sync", m) for m in problems]
    stage = view.zero_stage()
    if stage != 0:
        out.append(("deepspeed.zero_optimization.stage",
                    f"sync {name!r} needs ZeRO stage 0 (got {stage}): after every optimizer step ZeRO all-gathers each "
                    f"rank's updated partition of the parameters, so every rank would hold the same parameters "
                    f"after every step (no local step could exist) and each partition would be stepped from its "
                    f"owner's gradient alone; set deepspeed.zero_optimization.stage=0"))
    return out


def _averaging_collectives(shapes, group: int, options: AveragingOptions, lr: float) -> list:
    from ..comm import Collective
    from ..reducers.buckets import numel_of
    from .schedules import make_period

    numel = sum(numel_of(s) for s in shapes)
    period = make_period(options)
    h = period.next_h(1, lr) if options.period == "qsr" and lr > 0 else options.h if options.period != "qsr" \
        else period.first_h()
    return [Collective("all_reduce", 4 * numel, group, 1.0 / h)]


def average(tensors: List[torch.Tensor], comm, size: int, count: bool = True) -> None:
    """The averager: ``tensors`` averaged over ``comm``'s ranks (``size`` of them) in place, with one fused
    fp32 all_reduce; ``count=False``: evaluation-only traffic, not metered as training communication."""
    if not tensors or comm is None or (size == 1 and not comm.distributed):  # forced: the GPU check
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    comm.all_reduce(flat, "param_allreduce" if count else None)
    flat.div_(size)
    views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    torch._foreach_copy_(tensors, views)


def bn_buffers(module: Optional[torch.nn.Module]) -> List[torch.Tensor]:
    """BatchNorm running statistics of a module (empty without one)."""
    if module is None:
        return []
    return [b for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))]


class EvalView:
    """The evaluation view of a local method: evaluate the average model (parameters averaged in when
    ranks differ, local ones restored afterwards) and, with ``bn_batches > 0``, BatchNorm statistics
    re-estimated on that many training batches in total (the QSR seed's ``estimate_BN_params``)."""

    def __init__(self, params: List[torch.nn.Parameter], module, comm, bn_batches: int):
        self.params, self.module, self.comm, self.bn_batches = params, module, comm, bn_batches

    @contextlib.contextmanager
    def __call__(self, module: torch.nn.Module, in_sync: bool, train_batches=None):
        saved = None
        if not in_sync and self.comm.world_size > 1:
            saved = [p.detach().clone() for p in self.params] + [b.clone() for b in bn_buffers(self.module)]
            average([p.data for p in self.params], self.comm, self.comm.world_size, count=False)
        if self.bn_batches > 0 and train_batches is not None:
            self._reestimate_bn(module, train_batches)
        try:
            yield
        finally:
            if saved is not None:
                torch._foreach_copy_([p.data for p in self.params] + bn_buffers(self.module), saved)

    def _reestimate_bn(self, module, train_batches) -> None:
        bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        if not bns:
            return
        world = self.comm.world_size
        per_rank = max(1, self.bn_batches // world)
        momenta = [m.momentum for m in bns]
        was_training = module.training
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average, the reference's momentum 1/(1+i)
        module.train()
        p0 = self.params[0]
        with torch.no_grad():
            for i, (x, _) in enumerate(train_batches()):
                if i >= per_rank:
                    break
                module(x.to(p0.device, dtype=p0.dtype if x.is_floating_point() else x.dtype))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        module.train(was_training)
        stats = [t for m in bns for t in (m.running_mean, m.running_var)]
        average(stats, self.comm, world, count=False)


class _Averaging(Synchronizer):
    """Round bookkeeping of a parameter-averaging synchronizer: the period (``schedules.make_period``)
    says when, ``average`` does it, ``EvalView`` evaluates; the subclass says with whom."""

    def __init__(self, named_params, options: AveragingOptions, **kw):
        super().__init__(named_params, options, **kw)
        self.params = [p for _, p in named_params]
        self.world_size = self.comm.world_size
        warmup = options.warmup_steps if options.warmup_steps is not None else (self.warmup_steps or 0)
        from .schedules import make_period  # not at import: `python -m ds_ext.sync.schedules` runs that module

        self.period = make_period(options, warmup, self.total_steps)
        self.view = EvalView(self.params, self.module, self.comm, options.bn_batches)
        # the first round: QSR applies its rule at step 0's learning rate (init_h inside the warm-up), as the
        # reference's adjust_h() before training; None (no schedule, no optimizer): init_h
        lr0 = self._lr(0) if (self.lr_at is not None or self.optimizer is not None) else None
        self.h = self.period.first_h(lr0)
        self.step_ctr = 0  # optimizer steps done
        self.local_steps = 0  # steps since the last averaging
        self.rounds = 0  # averagings done
        self.comm_steps = 0  # steps that communicated (averaging or data-parallel gradient steps)
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"{type(self).__name__} averages fp32 parameters; got {p.dtype} (use "
                                 "deepspeed.torch_autocast for mixed precision)")
        self._moment_keys()  # an optimizer whose moments avg_m / avg_v cannot name is refused at attach

    # -- what attach says --------------------------------------------------------------------------
    def partners(self) -> str:
        """With whom an averaging happens, for ``describe`` (the subclass's grouping)."""
        return f"over all {self.world_size} ranks"

    def describe(self) -> Optional[str]:
        """Attach's line: what is averaged, with whom, on which period, and the first round's H."""
        from ..meter import human_bytes

        o = self.options
        name = SYNCS.name_of(self) or type(self).__name__
        extra = [w for w, on in (("Adam exp_avg / momentum", o.avg_m), ("exp_avg_sq", o.avg_v),
                                 ("BatchNorm statistics", o.avg_buffers)) if on]
        what = f"parameters ({human_bytes(4 * sum(p.numel() for p in self.params))}" + \
            (f" + {', '.join(extra)})" if extra else ")")
        line = f"{name}: {what} averaged {self.partners()}; period {self.period.describe()}, first round H={self.h}"
        if self.hierarchy is not None:
            line += "; hierarchical: the exact gradient mean inside each node every step"
        return line

    # -- what the engine asks ---------------------------------------------------------------------
    def reduce_gradients_now(self) -> bool:
        return self.period.data_parallel(self.step_ctr)

    def before_step(self) -> None:
        c = self.options.clip_grad_norm
        if c is not None:
            grads = [p for p in self.params if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, c)

    def after_step(self) -> bool:
        data_parallel = self.period.data_parallel(self.step_ctr)
        self.step_ctr += 1
        self.local_steps += 1
        if data_parallel:  # gradients were averaged: parameters are already identical
            self.comm_steps += 1
            self.local_steps = 0
            self.h = self.period.next_h(self.step_ctr, self._lr(self.step_ctr))
            return True
        if self.local_steps < self.h:
            return False
        self._average_now()
        self.rounds += 1
        self.comm_steps += 1
        self.local_steps = 0
        self.h = self.period.next_h(self.step_ctr, self._lr(self.step_ctr))
        return True

    def _lr(self, step: int) -> float:
        if self.lr_at is not None:
            return float(self.lr_at(step))
        opt = self.optimizer
        return float(opt.param_groups[0]["lr"]) if opt is not None else 0.0

    # -- what is averaged ---------------------------------------------------------------------------
    def _moment_keys(self) -> List[Tuple[torch.nn.Parameter, str]]:
        """``(parameter, state key)`` of every optimizer moment ``avg_m`` / ``avg_v`` averages, from the
        optimizer's parameter groups only (never from its state: a rank whose first step was skipped has no
        state yet while its peers do, and every rank must send the same list; issue 27 N2): Adam-family
        groups (``betas``) ``exp_avg`` / ``exp_avg_sq``, SGD groups with ``momentum > 0`` ``momentum_buffer``."""
        o, opt = self.options, self.optimizer
        if opt is None or not (o.avg_m or o.avg_v):
            return []
        group_of = {id(q): g for g in opt.param_groups for q in g["params"]}
        out = []
        for p in self.params:
            g = group_of.get(id(p))
            if g is None:
                continue
            if "betas" in g:
                out += [(p, k) for k, on in (("exp_avg", o.avg_m), ("exp_avg_sq", o.avg_v)) if on]
            elif "momentum" in g:
                if o.avg_v:
                    raise ValueError(f"sync: avg_v averages Adam's exp_avg_sq; {type(opt).__name__} has none "
                                     "(use avg_m for SGD's momentum buffer)")
                if o.avg_m and g["momentum"]:
                    out.append((p, "momentum_buffer"))
            else:
                raise ValueError(f"sync: avg_m / avg_v average Adam's exp_avg / exp_avg_sq or SGD's momentum_buffer; "
                                 f"the parameter groups of {type(opt).__name__} have neither 'betas' nor 'momentum'")
        return out

    def _tensors(self) -> List[torch.Tensor]:
        """What one averaging sends: the parameters, the optimizer moments (``_moment_keys``), BatchNorm
        buffers. The list is the same on every rank: a moment this rank has no state for yet (its first
        step was skipped for a non-finite gradient) is sent as zeros, the value Adam and SGD start from,
        into a scratch tensor that is dropped afterwards (the state stays absent and starts at this rank's
        next step)."""
        ts = [p.data for p in self.params]
        opt = self.optimizer
        for p, key in self._moment_keys():
            t = opt.state.get(p, {}).get(key)
            ts.append(t if isinstance(t, torch.Tensor) else torch.zeros_like(p.data))
        if self.options.avg_buffers:
            ts += bn_buffers(self.module)
        return ts

    def _average_now(self) -> None:
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        return self.local_steps == 0

    @property
    def synced_globally(self) -> bool:
        return self.in_sync

    def eval_view(self, module: torch.nn.Module, train_batches: Optional[Callable[[], Iterable]] = None):
        """Evaluate the averaged model (``EvalView``). Collective: every rank enters it."""
        return self.view(module, self.in_sync, train_batches)

    # -- state ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"H": self.h, "rounds": self.rounds, "comm_fraction": self.comm_steps / max(self.step_ctr, 1)}

    def state_dict(self) -> dict:
        """What exact resume needs beyond DeepSpeed's checkpoint (which keeps rank 0's module and
        optimizer only): the counters and H; this rank's parameters unless every rank holds the same ones
        (right after a global averaging: then rank 0's are everyone's); this rank's buffers (BatchNorm
        statistics are computed on this rank's data); this rank's optimizer state (moments follow the
        local gradients)."""
        module = self.module
        params = None if self.synced_globally else [p.detach().cpu().clone() for p in self.params]
        buffers = {n: b.detach().cpu().clone() for n, b in module.named_buffers()} if module is not None else None
        return {"h": self.h, "step_ctr": self.step_ctr, "local_steps": self.local_steps, "rounds": self.rounds,
                "comm_steps": self.comm_steps, "parameters": params, "buffers": buffers,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.h, self.step_ctr = int(state["h"]), int(state["step_ctr"])
        self.local_steps, self.rounds = int(state["local_steps"]), int(state["rounds"])
        self.comm_steps = int(state["comm_steps"])
        if "module" in state:  # checkpoints written before the named state: a whole-module snapshot
            if self.module is not None and state["module"] is not None:
                self.module.load_state_dict(state["module"])
        else:
            if state.get("parameters") is not None:
                if len(state["parameters"]) != len(self.params):
                    raise ValueError(f"{type(self).__name__} state holds {len(state['parameters'])} parameters, "
                                     f"this model {len(self.params)}")
                with torch.no_grad():
                    torch._foreach_copy_([p.data for p in self.params],
                                         [t.to(p.device) for t, p in zip(state["parameters"], self.params)])
            if self.module is not None and state.get("buffers") is not None:
                own = dict(self.module.named_buffers())
                if set(own) != set(state["buffers"]):
                    raise ValueError(f"{type(self).__name__} state buffers do not match this model's")
                with torch.no_grad():
                    for n, b in state["buffers"].items():
                        own[n].copy_(b)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])


@SYNCS.register("local", LocalOptions)
class LocalSync(_Averaging):
    """Local SGD / Local AdamW: average over the whole data-parallel group every H steps (constant, QSR
    or post-local)."""

    def partners(self) -> str:
        return (f"across the {self.hierarchy.topology.n_nodes} nodes" if self.hierarchy is not None
                else f"over all {self.world_size} ranks")

    def _average_now(self) -> None:
        if self.hierarchy is not None:  # sharded over the node's ranks, across nodes, then gathered in the node
            # parameters and moments agree inside a node (its gradient mean); BatchNorm statistics follow each
            # rank's own data, so those are averaged over every rank
            bufs = {id(b) for b in bn_buffers(self.module)} if self.options.avg_buffers else set()
            tensors = self._tensors()
            self.hierarchy.average_across_nodes([t for t in tensors if id(t) not in bufs])
            average([t for t in tensors if id(t) in bufs], self.comm, self.world_size)
        else:
            average(self._tensors(), self.comm, self.world_size)

    @classmethod
    def collectives(cls, shapes, world: int, options: LocalOptions, lr: float = 0.0, **_) -> list:
        """One fp32 all_reduce of the parameters every H steps (H of the period at learning rate ``lr``;
        optimizer moments and BatchNorm buffers, when averaged, are not counted here)."""
        return _averaging_collectives(shapes, world, options, lr)

    @classmethod
    def check(cls, view) -> list:
        return _check_common(view, "local")
