"""The one place that touches DeepSpeed engine internals.

``attach(engine, method)`` plugs a reducer / synchronizer / order into an existing
``DeepSpeedEngine``:

* ``engine.enable_backward_allreduce = False`` when the reducer replaces DeepSpeed's allreduce
  (the switch DeepSpeed's own 1-bit Adam uses);
* ``register_post_accumulate_grad_hook`` on every trainable parameter, forwarding to the reducer
  only when ``engine.is_gradient_accumulation_boundary()`` (the last micro-batch of the window);
* ``engine.step`` is wrapped on the instance: at a boundary the reducer's ``finish()`` writes the
  averaged gradients before DeepSpeed's step, and the synchronizer, the communication meter and the
  optional cross-rank consistency check run after it;
* for a gradient-driven order (``order.observes_gradients``: D-GraB / CD-GraB), ``Tensor.register_hook``
  on every trainable parameter copies each microbatch's gradient (as backward produces it, before
  accumulation into ``.grad``) into one flat fp32 buffer; the wrapped ``engine.step`` (called after
  every microbatch backward in the DeepSpeed loop) first hands that buffer to the order's
  ``observe_microbatch`` (or to the reducer's ``microbatch`` when the reducer consumes it, ``cdgrab``)
  and clears it.

So a user loop of ``loss = engine(x); engine.backward(loss); engine.step()`` is unchanged. The step hooks
live in ``step_hooks.py``, the ZeRO bridge in ``zero.py``; ``ds_ext.trainer.setup.initialize`` builds an
engine from a recipe and calls ``attach``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Union

import torch

from ..comm import Communicator
from ..meter import CommMeter
from ..registry import ORDERS, REDUCERS, SYNCS, MethodView, load_builtin
from ..spec import block_parts, near_miss_block
from .announce import announce, ensure_console
from .compat import quiet_all_gather
from .threads import apply_default
from .clipping import LocalClip
from .step_hooks import (ConsistencyCheck, DesyncError, NonFiniteGuard, StepInfo, StopVote, check_consistency,
                         split_rows)
from .zero import ZeroBridge, _node_partitioned_detached

log = logging.getLogger(__name__)


def _copy_into(view: torch.Tensor):
    def hook(grad: torch.Tensor) -> None:  # returns None: the gradient itself is left unchanged
        view.copy_(grad)

    return hook


class Attachment:
    """The methods attached to one engine; hold on to it (it owns the hooks). It only wires: gradient
    hooks to the reducer, microbatch gradients (screened by the non-finite guard) to a gradient-driven order,
    and ``engine.step`` to the step sequence: the step hooks' control vectors posted, the reducer's
    ``finish()`` (or, on a local step in hierarchical mode, the synchronizer's node exchange), the hooks'
    ``before_step``, the synchronizer's ``before_step``, DeepSpeed's step wrapped by the hooks, the
    synchronizer's ``after_step``, the hooks' ``after_step``, the meter's ``end_step``. The hooks
    (``step_hooks.StepHook``) run in the order of ``hooks``: ``NonFiniteGuard``, ``StopVote``, ``ZeroBridge``
    (ZeRO 1/2 only), ``ConsistencyCheck``. What a method can do is declared on its base class
    (``Reducer.observes_microbatches``, ``Reducer.uses_kernels``, ``Order.observes_gradients``).

    ``method``: the reducer's name in messages (default: its class name). ``topology``: the node layout
    (``topology.Topology``) in hierarchical mode, else None: ZeRO may then be partitioned within the node,
    and a local step's node exchange shares the non-finite verdict over the node's ranks."""

    def __init__(self, engine, reducer, sync, comm: Communicator, check_every: int = 0, order=None,
                 nonfinite: str = "skip", method: Optional[str] = None, topology=None, clip: str = "after"):
        self.engine, self.reducer, self.sync, self.comm = engine, reducer, sync, comm
        self.meter = comm.meter
        self.order = order
        if getattr(engine, "_ds_ext_attachment", None) is not None:
            raise ValueError("this engine already has a ds_ext attachment: detach() it first (two would each wrap "
                             "step, the gradient hooks and the reduction)")
        # every check that can refuse runs before anything of the engine is changed
        if reducer.observes_microbatches and not (order is not None and order.observes_gradients):
            raise ValueError(f"reducer {type(reducer).__name__} needs the matching gradient-driven order")
        if reducer.uses_kernels:  # compile or load the kernels now, with a message, not inside step 1
            from .. import ops

            ops.prepare(comm.device)
        self.guard = NonFiniteGuard(engine, reducer.params, comm, nonfinite, method or type(reducer).__name__,
                                    engine_reduces=not reducer.replaces_engine_allreduce,
                                    sharers=topology.node_members() if topology is not None else None,
                                    reducer=reducer)
        # ZeRO stage 1/2: the method's exchange replaces ZeRO's reduction (see ZeroBridge)
        self.zero = (ZeroBridge(engine, comm, replace=reducer.replaces_engine_allreduce, topology=topology)
                     if engine.zero_optimization_stage() in (1, 2) else None)
        if self.zero is not None and self.zero.node_partitioned:
            # DeepSpeed broadcast the initial parameters over its data-parallel group, i.e. inside each node
            # only: every node must start from the same parameters (collective; the same verdict everywhere)
            try:
                check_consistency(engine.module, comm)
            except DesyncError as e:
                self.zero.restore(keep_node_state=False)
                raise DesyncError(f"ZeRO partitioned within nodes: the nodes start from different parameters "
                                  f"(DeepSpeed broadcasts them inside a node only; seed the model alike on every "
                                  f"rank or broadcast it before deepspeed.initialize): {e}") from None
        self.check = ConsistencyCheck(engine.module, comm, check_every)
        # method.clip: before -> each rank's local gradient is clipped before the reducer sees it (clipping.py)
        self.clip = LocalClip.for_engine(engine, clip, reducer,
                                         REDUCERS.name_of(reducer) or method or type(reducer).__name__)
        self.vote = StopVote(comm)
        #: the step hooks, run in this order in every phase of ``step``
        self.hooks = [h for h in (self.guard, self.vote, self.zero, self.check) if h is not None]
        self.steps = 0
        self.last_step_communicated = False
        self._handles = []
        self._orig_step = engine.step
        if self._orig_step is _node_partitioned_detached:  # attached again after a detach: DeepSpeed's own step
            self._orig_step = type(engine).step.__get__(engine, type(engine))
        self._orig_allreduce_flag = engine.enable_backward_allreduce
        if reducer.replaces_engine_allreduce:
            engine.enable_backward_allreduce = False
        for p in reducer.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self._flat, self._feed = None, None
        if order is not None and order.observes_gradients:
            self._watch_microbatch_gradients(order, reducer)
        engine.step = self.step  # instance attribute shadows DeepSpeedEngine.step
        # DeepSpeed's checkpoint calls keep every rank's method state too (own loops, Hugging Face's Trainer)
        self._orig_save, self._orig_load = engine.save_checkpoint, engine.load_checkpoint
        engine.save_checkpoint, engine.load_checkpoint = self.save_checkpoint, self.load_checkpoint
        engine._ds_ext_attachment = self
        #: one line per method, as ``attach`` logged them on rank 0 (``announce.method_lines``)
        self.description: list = []

    def summary(self) -> str:
        """Readable: the methods, the bytes per rank in total and per step by kind (human units), skipped steps; at
        world size 1 "nothing communicated (world size 1)" (``ds_ext/deepspeed/announce.py``)."""
        from .announce import summary

        return summary(self)

    # what the trainer and tests read
    @property
    def group(self):
        return self.comm.group

    @property
    def nonfinite(self) -> str:
        return self.guard.mode

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped_steps

    @property
    def nonfinite_events(self) -> list:
        return self.guard.events

    def check_pending(self) -> None:
        """Collective: settle the non-finite result check of the last step (before a checkpoint, at the end)."""
        self.guard.check_pending()

    def vote_stop(self, source: Callable[[], bool]) -> None:
        """Ask, at every step that communicates gradients, whether ``source()`` is true on any rank;
        ``stop_agreed`` then says so on every rank at the same step (see ``StopVote``)."""
        self.vote.source = source

    @property
    def stop_agreed(self) -> bool:
        return self.vote.agreed

    def _watch_microbatch_gradients(self, order, reducer) -> None:
        params = reducer.params
        self._flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
        off = 0
        for p in params:
            view = self._flat[off:off + p.numel()].view_as(p)
            self._handles.append(p.register_hook(_copy_into(view)))
            off += p.numel()
        order.bind(comm=self.comm, numel=self._flat.numel(), device=self._flat.device)
        self.guard.microbatches = True  # the guard screens each flat microbatch gradient before the order
        if reducer.observes_microbatches:
            reducer.bind_order(order)
            self._feed = reducer.microbatch
        else:
            self._feed = order.observe_microbatch

    def _hook(self, p):  # nothing else runs here: the non-finite guard reads the reduced data after finish()
        if self.engine.is_gradient_accumulation_boundary() and self.sync.reduce_gradients_now():
            if self.clip is not None:
                self.clip.ready(p)
            else:
                self.reducer.grad_ready(p)

    def step(self, *args, **kwargs):
        if self._flat is not None:  # one microbatch backward has run: the order sees its gradient
            if self.guard.on:
                self.guard.screen(self._flat)
            self._feed(self._flat)
            self._flat.zero_()
        if not self.engine.is_gradient_accumulation_boundary():
            return self._orig_step(*args, **kwargs)
        reduced = self.sync.reduce_gradients_now()
        info = StepInfo(reduced=reduced, communicates=reduced and self.comm.distributed)
        posted = [h.control(info) for h in self.hooks]
        sent = [t for t in posted if t is not None]
        if sent:  # rides on the step's one control exchange (a method's own, or one all_gather)
            self.comm.post_control(torch.cat(sent) if len(sent) > 1 else sent[0])
        if reduced:
            if self.clip is not None:
                self.clip.flush(self.reducer)
            self.reducer.finish()
        late = self.guard.after_finish(info)  # the guard's reduced-data flag: aboard the exchange if one is to run
        aboard = late is not None and bool(sent) and self.comm.amend_posted(late)
        rows = self.comm.collect_control() if sent else None
        if aboard:
            self.guard.take_reduced(any(r[-1] for r in rows))
            rows = [r[:-1] for r in rows]
        if not reduced and self.sync.hierarchy is not None:  # the node's exact gradient mean, flag aboard
            info.shared = self.sync.local_gradient_exchange(self.guard.local_input_flag())
        for hook, mine in zip(self.hooks, split_rows(rows, posted)):
            info.skip = hook.before_step(info, mine) or info.skip
        if not info.skip:
            self.sync.before_step()
        run = self._orig_step
        for hook in reversed(self.hooks):  # the first hook's wrapper outermost
            run = hook.wrap(run, info)
        out = run(*args, **kwargs)
        self.last_step_communicated = bool(self.sync.after_step())
        self.steps += 1
        info.steps, info.synced_globally, info.global_step = (self.steps, self.sync.synced_globally,
                                                              self.engine.global_steps)
        for hook in self.hooks:
            hook.after_step(info)
        self.meter.end_step()
        return out

    def detach(self, restore_engine: bool = True) -> None:
        """Remove the hooks and restore ``engine.step`` (and, under ZeRO 1/2, ZeRO's own gradient hooks; with ZeRO
        partitioned within a node, ``engine.step`` raises instead, see ``ZeroBridge``). ``restore_engine=False``:
        the engine is gone or being replaced (its optimizer destroyed), so ZeRO's hooks are not registered
        again (they would land on parameters a new engine shares)."""
        if self.zero is not None and restore_engine:
            self.zero.restore()
        if getattr(self.engine, "_ds_ext_attachment", None) is self:
            self.engine._ds_ext_attachment = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.engine.enable_backward_allreduce = self._orig_allreduce_flag
        if self.clip is not None:
            self.clip.restore()
        self.engine.step = self._orig_step
        self.engine.save_checkpoint, self.engine.load_checkpoint = self._orig_save, self._orig_load
        if self.zero is not None and self.zero.node_partitioned:
            self.engine.step = _node_partitioned_detached

    # ---- DeepSpeed's checkpoint calls, with the methods' state ------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False):
        """``engine.save_checkpoint`` while attached (collective): DeepSpeed's files, every rank's method state and
        ``meta.json`` staged, renamed into place, then ``latest``; ``CheckpointSaveError`` on every rank when a
        write failed anywhere (``ds_ext/deepspeed/engine_checkpoint.py``). Returns what DeepSpeed's returns."""
        from .engine_checkpoint import save_checkpoint

        return save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """``engine.load_checkpoint`` while attached (collective): every file verified against ``meta.json`` by
        every rank, this rank's method state checked to be this rank's, this world size's and the step's, then
        DeepSpeed's files and the state loaded; with ``tag=None`` a damaged checkpoint falls back to an older
        intact one (a warning names both), else ``CheckpointError`` on every rank names the file
        (``ds_ext/deepspeed/engine_checkpoint.py``). Returns what DeepSpeed's returns."""
        from .engine_checkpoint import load_checkpoint

        return load_checkpoint(self, load_dir, tag=tag, **kwargs)

    def checkpoint_state(self) -> dict:
        """This rank's file of ``save_checkpoint``: the attachment's state, the order's, rank, world, step."""
        from .engine_checkpoint import checkpoint_state

        return checkpoint_state(self)

    def state_dict(self) -> dict:
        return {"reducer": self.reducer.state_dict(), "sync": self.sync.state_dict(),
                "meter": self.meter.state_dict(), "steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.reducer.load_state_dict(state["reducer"])
        self.sync.load_state_dict(state["sync"])
        self.meter.load_state_dict(state["meter"])
        self.steps = int(state["steps"])
        self.guard.skipped_steps = int(state.get("skipped_steps", 0))


def _torch_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (what holds ``state`` and ``param_groups``)."""
    opt = getattr(engine, "optimizer", None)
    if opt is not None and not hasattr(opt, "state") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _deepspeed_settings(engine) -> dict:
    """The engine's DeepSpeed configuration as a dict (what the methods' checks read)."""
    cfg = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(cfg, dict):
        return cfg
    return engine.config if isinstance(getattr(engine, "config", None), dict) else {}


_KIND_REGISTRIES = {"reducer": REDUCERS, "sync": SYNCS, "order": ORDERS}


def _typed_block(kind: str, block):
    """A method block given as a typed options object (``PowerSGDOptions(rank=2)``) or ``(name, options)``:
    the equivalent ``{name: ..., <option>: ...}`` dict, so that it is validated like any other block."""
    from ..registry import Options

    registry = _KIND_REGISTRIES.get(kind)
    if isinstance(block, tuple) and len(block) == 2 and isinstance(block[0], str) and isinstance(block[1], Options):
        return {"name": block[0], **block[1].model_dump()}
    if registry is None or not isinstance(block, Options):
        return block
    names = [n for n in registry.names() if registry.get(n).options is type(block)]
    if len(names) != 1:
        serves = f"serve {registry.kind}s {', '.join(names)}" if names else f"belong to no {registry.kind}"
        raise ValueError(f"method.{kind}: options of type {type(block).__name__} {serves}; pass "
                         f"('<name>', options) or {{'name': '<name>', ...}} (allowed names: "
                         f"{', '.join(registry.names())})")
    return {"name": names[0], **block.model_dump()}


def method_spec(engine, method=None):
    """What ``attach`` runs, as a validated ``spec.MethodSection``: ``method`` as given (a recipe's ``method``
    section; a dict of ``reducer`` / ``sync`` / ``order`` blocks, each a name, a ``{name: ..., <option>: ...}``
    dict, a typed options object such as ``PowerSGDOptions(rank=2)`` or ``(name, options)``), or, when
    ``method`` is None, the ``ds_ext`` block of the engine's DeepSpeed config (the same schema; absent:
    ``allreduce``, no sync, ``rr``). A bad block raises ``recipe.RecipeError`` (a ``ValueError``) naming the
    key and what is allowed, as the recipe check does."""
    from ..spec import MethodSection, method_section

    if isinstance(method, MethodSection):
        return method
    settings = _deepspeed_settings(engine)
    near_miss_block(settings)  # a misspelled "ds_ext" block would otherwise be ignored without a word
    if method is None:
        block = settings.get("ds_ext")
        if block is None:
            return MethodSection()
        return method_section(block, source="DeepSpeed config", prefix="ds_ext")
    if isinstance(method, dict):
        return method_section({k: v if k == "clip" else _typed_block(k, v) for k, v in method.items()},
                              source="ds_ext.attach",
                              prefix="method")
    if all(hasattr(method, k) for k in ("reducer", "sync", "order")):  # a recipe's method section (duck-typed)
        return method
    raise TypeError(f"ds_ext.attach: method must be a dict of reducer / sync / order blocks, a recipe's method "
                    f"section or None (the DeepSpeed config's ds_ext block); got {type(method).__name__}")


def attach(engine, method: Union[None, Dict[str, Any], Any] = None, meter: Optional[CommMeter] = None,
           group=None, check_every: int = 0, total_steps: Optional[int] = None, order=None,
           nonfinite: str = "skip", check: bool = True, steps_per_epoch: Optional[int] = None) -> Attachment:
    """Attach a reducer, a synchronizer and (optionally) a data order to a DeepSpeed engine.

    ``order`` (an ``ds_ext.order.Order``) is only wired in when it observes gradients (D-GraB,
    CD-GraB): it then sees every microbatch gradient through parameter hooks.

    ``method`` (``method_spec``): the recipe's ``method`` section; a dict such as
    ``{"reducer": {"name": "allreduce", "bucket_mb": 25}, "sync": "none"}`` whose blocks may also be typed
    options objects (``{"reducer": PowerSGDOptions(rank=4)}``) or ``(name, options)``; or None, which reads
    the ``ds_ext`` block of the engine's DeepSpeed config (the same schema). A bad block raises
    ``recipe.RecipeError`` (a ``ValueError``) naming the key and listing what is allowed. A gradient-driven
    order named there (``dgrab``) needs its ``order`` object (else ``ValueError``). ``total_steps`` (the
    run's optimizer steps) lets period schedules end their last round exactly at the last step;
    ``steps_per_epoch`` (default: the LR schedule's, when it has one) marks epoch boundaries for a
    synchronizer that needs them (``dssync`` with ``pattern_restart: epoch``).

    While attached, ``engine.save_checkpoint`` / ``engine.load_checkpoint`` also save and restore every
    rank's method state (``Attachment.save_checkpoint``).

    ``nonfinite`` (the recipe's ``train.nonfinite``) says what a NaN or inf in any rank's gradient does:
    ``skip`` (default) skips the optimizer update on every rank and resets the reducer's error-feedback state,
    read from what the method already produces (the reduced buckets, the all-reduced P / Q factors, the
    gathered sparse values or sign scales; ``step_hooks.NonFiniteGuard`` says how each method is covered),
    ``raise`` stops every rank with ``NonFiniteError``, ``off`` does neither (DeepSpeed's fp16 loss
    scaler still skips overflowing steps). Under ZeRO (reducer ``deepspeed``) it is always ``off``.

    ``check`` runs each method's ``check(view)`` on this engine (the same rules as the recipe check:
    ZeRO stage, precision, clipping, combinations, world size) and raises ``ValueError`` listing every
    problem; ``check=False`` skips them (deliberately broken setups in tests).
    """
    load_builtin()
    method = method_spec(engine, method)
    rname, ropts = block_parts(method.reducer, "allreduce")
    sname, sopts = block_parts(method.sync, "none")
    ropts, sopts = REDUCERS.validated(rname, ropts), SYNCS.validated(sname, sopts)
    oname_spec = block_parts(method.order, "rr")[0]
    if order is None and oname_spec in ORDERS and ORDERS.get(oname_spec).factory.observes_gradients:
        raise ValueError(f"method.order {oname_spec!r} sees every micro-batch gradient and orders the examples: pass "
                         f"the order object that drives your sampler (attach(..., order=ds_ext.ORDERS.build("
                         f"{oname_spec!r}, ...))), or use the ds_ext trainer")
    meter = meter or CommMeter()
    comm = Communicator(group, device=engine.device, meter=meter,
                        wire_dtype=getattr(engine, "communication_data_type", None))
    meter.world_size = None if comm.force_collectives else comm.world_size  # 1: nothing crosses a network
    quiet_all_gather()  # before the first collective of the attachment
    threads = apply_default()
    if threads and comm.global_rank == 0:
        ensure_console()
        log.info("%s", threads)
    if check:  # the methods' own rules, as the recipe check runs them
        oname = ORDERS.name_of(order) if order is not None else block_parts(method.order, "rr")[0]
        view = MethodView(names={"reducer": rname, "sync": sname, "order": oname or "rr"},
                          options={"reducer": ropts, "sync": sopts, "order": order.options if order else None},
                          deepspeed=_deepspeed_settings(engine), world=comm.world_size)
        problems = view.problems()
        if problems:
            raise ValueError("; ".join(f"{key}: {msg}" for key, msg in problems))
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    hier_reducer, hier_sync = bool(getattr(ropts, "hierarchical", False)), bool(getattr(sopts, "hierarchical", False))
    topology = hierarchy = None
    if hier_reducer or hier_sync:  # node layout from the launcher, checked by every rank (collective)
        from ..hierarchy import HierarchicalAveraging, build_hierarchical
        from ..topology import Topology

        topology = Topology.from_env(comm)
    if hier_reducer:
        reducer = build_hierarchical(rname, ropts, named, comm, topology, engine=engine)
    else:
        reducer = REDUCERS.build(rname, ropts, named, comm=comm, engine=engine)
    if hier_sync:
        hierarchy = HierarchicalAveraging(comm, topology)
    sched = engine.lr_scheduler
    sync = SYNCS.build(sname, sopts, named, comm=comm, module=engine.module, optimizer=_torch_optimizer(engine),
                       lr_at=getattr(sched, "lr_at", None), warmup_steps=getattr(sched, "warmup", None),
                       total_steps=total_steps, hierarchy=hierarchy,
                       steps_per_epoch=steps_per_epoch if steps_per_epoch is not None
                       else getattr(sched, "steps_per_epoch", None))
    att = Attachment(engine, reducer, sync, comm, check_every=check_every, order=order, nonfinite=nonfinite,
                     method=REDUCERS.get(rname).factory.__name__, topology=topology,
                     clip=getattr(method, "clip", "after"))
    att.description = announce(att, total_steps)
    return att
