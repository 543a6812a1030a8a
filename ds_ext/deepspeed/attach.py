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

So a user loop of ``loss = engine(x); engine.backward(loss); engine.step()`` is unchanged.
``initialize(recipe, model, ...)`` builds the optimizer, schedule and DeepSpeed config from a recipe,
calls ``deepspeed.initialize`` and attaches the recipe's methods.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any, Callable, Dict, Optional, Union

import torch

from ..comm import Communicator
from ..meter import CommMeter
from ..registry import OPTIMIZERS, ORDERS, REDUCERS, SYNCS, MethodView, load_builtin

log = logging.getLogger(__name__)


class DesyncError(RuntimeError):
    """Ranks that must hold identical parameters do not."""


class NonFiniteError(FloatingPointError):
    """A non-finite gradient with ``nonfinite="raise"``, or a method that produced one from finite inputs."""


NONFINITE_MODES = ("skip", "raise", "off")


def parameter_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """One 64-bit BLAKE2b digest of every parameter's bytes, ``[n_params]`` int64 on the CPU.

    Two ranks agree iff their parameters are bit-identical (up to a 2**-64 collision chance): unlike
    sums or norms, a digest also tells apart swapped elements and sign flips that cancel. Costs a
    device-to-host copy and one hash pass over the parameters, which is why the check is optional
    and periodic (``train.check_consistency_every``)."""
    digests = []
    for p in module.parameters():
        raw = p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy()
        digests.append(int.from_bytes(hashlib.blake2b(raw.data, digest_size=8).digest(), "little", signed=True))
    return torch.tensor(digests, dtype=torch.int64)


def check_consistency(module: torch.nn.Module, comm: Optional[Communicator] = None,
                      step: Optional[int] = None) -> None:
    """Collective. Raise ``DesyncError`` on every rank, naming the first parameter (in
    ``named_parameters`` order) whose bytes differ between rank 0 and some rank. The digests travel
    on the communication device (``comm.device``) and are read back once."""
    comm = comm if comm is not None else Communicator()
    if comm.world_size == 1:
        return
    fp = parameter_fingerprint(module).to(comm.device)
    gathered = comm.all_gather(fp).cpu()  # [world, n_params]
    names = [n for n, _ in module.named_parameters()]
    for r, other in enumerate(gathered[1:], start=1):
        if not torch.equal(other, gathered[0]):
            bad = (other != gathered[0]).nonzero()[0].item()
            raise DesyncError(f"parameters differ between rank 0 and rank {r} at step {step}: first at "
                              f"{names[bad]!r} (digest {gathered[0][bad].item() & (2**64 - 1):016x} vs "
                              f"{other[bad].item() & (2**64 - 1):016x})")


def _block(spec, default: str):
    """(name, options dict or Options) from a recipe NamedBlock, a dict or a plain name."""
    if spec is None:
        return default, {}
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        spec = dict(spec)
        return spec.pop("name", default), spec
    opts = spec.checked if spec.checked is not None else spec.params
    return spec.name, opts


def _copy_into(view: torch.Tensor):
    def hook(grad: torch.Tensor) -> None:  # returns None: the gradient itself is left unchanged
        view.copy_(grad)

    return hook


class NonFiniteGuard:
    """Step hook: a NaN or inf in any rank's gradient never reaches a method's state, and the update is
    skipped on every rank (``mode``: ``skip``, ``raise`` or ``off``; see ``attach``).

    Host reads per optimizer step: at most one. The screen keeps its flags on the device; on a step that
    communicates gradients every rank's flags are posted to the communicator and ride on the step's one
    control exchange (a method's own, e.g. ExDyna's counts, or a two-element all_gather of the guard's);
    on a local step (Local SGD / DS-Sync between averagings) this rank's flag is read alone."""

    def __init__(self, engine, params, comm: Communicator, mode: str = "skip", method: str = "reducer",
                 engine_reduces: bool = False):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        if mode != "off" and engine_reduces and engine.zero_optimization_stage() != 0:
            mode = "off"  # ZeRO reduces inside its own hooks (reducer deepspeed): DeepSpeed's overflow handling
        self.engine, self.params, self.comm, self.mode, self.method = engine, params, comm, mode, method
        self._bad = []  # 0-dim bool device flags of the current window's screened gradients
        self._out_bad = None  # the last communicating step's "non-finite result" flag (device), checked next step
        self._out_step = 0
        self.skipped_steps = 0
        self.events = []  # (optimizer step, ranks) of every skipped step, newest last

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def screen(self, g: torch.Tensor) -> None:
        """Flag a non-finite ``g`` and zero it in place, before any reducer, order or error-feedback
        buffer sees it. The test is the largest magnitude (``inf``-norm, exact: NaN and inf propagate,
        no finite gradient is flagged). Device operations only: nothing is read on the host here."""
        if g.numel() == 0:
            return
        bad = ~torch.isfinite(torch.linalg.vector_norm(g, float("inf")))
        g.masked_fill_(bad, 0)
        self._bad.append(bad)

    def _local_flag(self) -> torch.Tensor:
        """This rank's "non-finite input" flag of the window, 0-dim bool on the device."""
        flag = torch.stack(self._bad).any() if self._bad else self.comm.zeros((), dtype=torch.bool)
        self._bad = []
        return flag.to(self.comm.device)

    def _result_flag(self) -> torch.Tensor:
        """Whether a reduced gradient is non-finite (0-dim bool, device): finite inputs everywhere but
        a non-finite result means the method itself failed."""
        grads = [p.grad for p in self.params if p.grad is not None and p.grad.numel()]
        if not grads:
            return self.comm.zeros((), dtype=torch.bool)
        return ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))).float()).all().to(self.comm.device)

    def control(self, communicates: bool) -> Optional[torch.Tensor]:
        """Before the reducer's ``finish``: this rank's two flags (int64, device) to ride on the step's one
        control exchange (``Attachment.step`` posts them), or None when there is nothing to send."""
        if not self.on or not communicates:
            return None
        out = self._out_bad if self._out_bad is not None else self.comm.zeros((), dtype=torch.bool)
        return torch.stack([self._local_flag(), out]).to(torch.int64)

    def local_input_flag(self) -> torch.Tensor:
        """On a step where the reducer did not run: screen this rank's gradients now and return its
        "non-finite input" flag (0-dim fp32, device, not read), for a synchronizer's own gradient exchange
        to carry (``Synchronizer.local_gradient_exchange``). Zeros with the guard off."""
        if not self.on:
            return self.comm.zeros(())
        for p in self.params:
            if p.grad is not None:
                self.screen(p.grad)
        return self._local_flag().float()

    def verdict(self, reduced: bool, communicates: bool, rows=None, shared=None, sharers=None) -> bool:
        """Whether this step's optimizer update is skipped. After a gradient reduction the verdict is
        shared (every rank's flags come back from the step's control exchange), so every rank skips or
        none does; on a local step (no gradient communication) each rank decides alone, which is safe
        because ranks hold different parameters there anyway and the step counters that decide the next
        averaging still advance on every rank. A non-finite result from finite inputs (a method failure)
        is detected one communicating step later, or at ``check_pending()`` (the trainer calls it before
        every checkpoint and at the end)."""
        if not self.on:
            return False
        step = self.engine.global_steps + 1
        if shared is not None:  # a local step whose flag a synchronizer's exchange summed over ``sharers``
            inp = bool(shared > 0)  # the step's one host read
            if inp:
                self._skip_event(step, list(sharers), shared=False, report=self.comm.global_rank == min(sharers),
                                 where="on every rank of this node (local step)")
            return inp
        if not communicates:
            if not reduced:  # local step: screen the local gradient now
                for p in self.params:
                    if p.grad is not None:
                        self.screen(p.grad)
            inp = bool(self._local_flag())  # the step's one host read
            if inp:
                self._skip_event(step, [self.comm.global_rank], shared=False)
            return inp
        # rows: every rank's [input bad, last result bad], from the step's control exchange
        self._raise_if_method_failed(rows)
        self._out_bad, self._out_step = self._result_flag(), step
        bad_in = [r for r, f in enumerate(rows) if f[0]]
        if bad_in:
            self._skip_event(step, bad_in, shared=True)
            return True
        return False

    def _raise_if_method_failed(self, rows) -> None:
        bad_out = [r for r, f in enumerate(rows) if f[1]]
        if bad_out:
            raise NonFiniteError(f"step {self._out_step}: reducer {self.method} produced a non-finite "
                                 f"gradient on rank(s) {bad_out} from finite inputs on every rank")

    def check_pending(self) -> None:
        """Collective. Settle the last communicating step's "non-finite result" check now."""
        if not self.on or self._out_bad is None or not self.comm.distributed:
            return
        rows = self.comm.exchange_control(torch.stack([self.comm.zeros((), dtype=torch.bool), self._out_bad])
                                          .to(torch.int64))
        self._out_bad = None
        self._raise_if_method_failed(rows)

    def _skip_event(self, step: int, ranks, shared: bool, report: Optional[bool] = None,
                    where: Optional[str] = None) -> None:
        where = where or ("on all ranks" if shared else "on this rank only (local step)")
        if self.mode == "raise":
            raise NonFiniteError(f"step {step}: non-finite gradient on rank(s) {ranks} (train.nonfinite=raise)")
        self.skipped_steps += 1
        self.events.append((step, list(ranks)))
        show = report if report is not None else (not shared or self.comm.global_rank == 0)  # local: its own rank
        if show:
            log.warning("step %d: non-finite gradient on rank(s) %s; optimizer step skipped %s (error-feedback and "
                        "order state saw zeros instead)", step, list(ranks), where)

    def skipped_step(self, orig_step, *args, **kwargs):
        """Run DeepSpeed's step (counters, LR schedule, zeroing of gradients, loss-scale bookkeeping)
        with the parameter update itself made a no-op."""
        if self.engine.fp16_enabled():
            # FP16_Optimizer: an inf makes it skip and lower the loss scale, as it does for an overflow
            for p in self.params:
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("inf")
                    break
            return orig_step(*args, **kwargs)
        inner = getattr(self.engine, "basic_optimizer", None) or self.engine.optimizer
        inner.step = lambda *a, **k: None  # instance attribute shadows the class's step for this call
        # ZeRO links its parameters to the torch optimizer's state after the first real step; a skipped first
        # step would link the still-empty state for good
        outer = self.engine.optimizer
        linked = getattr(outer, "_hp_optimizer_states_linked", None)
        try:
            return orig_step(*args, **kwargs)
        finally:
            del inner.step
            if linked is not None:
                outer._hp_optimizer_states_linked = linked


#: the DeepSpeed releases whose ZeRO stage 1/2 optimizer ``ZeroBridge`` was written against: [from, to)
ZERO_BRIDGE_DEEPSPEED = ((0, 19), (0, 20))


def _deepspeed_version() -> str:
    import deepspeed

    return str(getattr(deepspeed, "__version__", "unknown"))


def zero_bridge_version_problem(version: str) -> Optional[str]:
    """Why ``ZeroBridge`` cannot be trusted with this DeepSpeed version, or None."""
    lo, hi = ZERO_BRIDGE_DEEPSPEED
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor is not None and lo <= major_minor < hi:
        return None
    return (f"a replacing reducer under ZeRO stage 1/2 reaches into DeepSpeed's ZeRO optimizer, written against "
            f"deepspeed>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}; this is deepspeed {version}. Install a supported "
            f"DeepSpeed (pip install 'deepspeed>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'), or use ZeRO stage 0 or "
            f"reducer 'deepspeed'")


class ZeroBridge:
    """ZeRO stage 1 and 2 under a replacing reducer (every method but ``deepspeed``).

    DeepSpeed's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) reduces gradients itself, from gradient
    hooks registered on every parameter, into the partition each rank owns. Here the method's exchange
    takes that job: the ZeRO optimizer's gradient hooks are removed (so nothing reduces, partitions or
    frees a gradient during backward; ``p.grad`` accumulates over the micro-batches as at stage 0), the
    reducer's ``finish()`` writes the whole averaged gradient into every ``p.grad`` as at stage 0, and
    ``fill()`` then hands ZeRO this rank's partition of it (``averaged_gradients``), which is what ZeRO's
    ``step()`` consumes: it clips, steps its fp32 partition of the optimizer state, and all-gathers the
    updated parameter partitions (counted by ``record()`` as kind ``zero_allgather``). No uncompressed
    gradient collective is left on the wire. The optimizer state stays partitioned; the gradients are
    whole on every rank (a compressor needs the whole local gradient), so stage 2 saves no gradient
    memory over stage 1 here. ZeRO's separate accumulation attribute (fp16 at stage 1) is switched off:
    gradients accumulate in ``p.grad`` in the parameters' dtype, as at stage 0. The reducer must average
    over ZeRO's data-parallel group (checked); MoE expert groups, ZenFlow and unmanaged gradient
    accumulation are refused. ``restore()`` (``Attachment.detach``) puts ZeRO's hooks back.

    **Node-partitioned** (hierarchical mode, ``hierarchical: true`` with ZeRO 1/2 through ``initialize``, or an
    own ``deepspeed.initialize(..., mpu=node_mpu())``): ZeRO's data-parallel group is this rank's node, so the
    optimizer state is partitioned over the node's ranks (each node holds one full copy) and ZeRO's parameter
    all-gather stays inside the node (metered as ``node_zero_allgather``, which ``hierarchy.intra_node_bytes``
    counts). This is sound because the hierarchical reducer hands every rank of every node the same averaged
    gradient, so every node steps the same partitions to the same values. DeepSpeed's checkpoint files are
    named by the rank within the node, so only the first node writes them (the others' save flags are off
    while attached) and every node loads them; the checkpoint directory must be shared by the nodes, as
    DeepSpeed's multi-node checkpoints already need. ZeRO's own reduction would average over one node only,
    so a node-partitioned engine cannot train without the attachment: after ``detach`` its ``step`` raises.

    Written against DeepSpeed 0.19's ``stage_1_and_2.py`` (``ZERO_BRIDGE_DEEPSPEED``, checked here):
    ``_grad_acc_hooks``, ``use_grad_accum_attribute``, ``bit16_groups`` / ``bit16_groups_flat`` (every
    parameter's data is a view into its group's flat buffer), ``partition_size``, ``real_dp_process_group``,
    ``averaged_gradients``, ``single_partition_of_fp32_groups``, ``overflow``."""

    _NEEDS = ("_grad_acc_hooks", "use_grad_accum_attribute", "bit16_groups", "bit16_groups_flat", "partition_size",
              "averaged_gradients", "single_partition_of_fp32_groups", "real_dp_process_group", "cpu_offload")

    def __init__(self, engine, comm: Communicator, replace: bool = True, topology=None):
        """``replace=False`` (reducer ``deepspeed``): ZeRO keeps its own reduction; only ``record()`` is used.
        ``topology`` (a hierarchical reducer's ``hierarchy.Topology``): ZeRO's group may also be this rank's
        node (``node_mpu``), which makes the bridge node-partitioned (class docstring)."""
        self.engine, self.opt, self.comm, self.replace = engine, engine.optimizer, comm, replace
        self.node_partitioned, self.kind, self._save_flags = False, "zero_allgather", None
        flats = getattr(self.opt, "bit16_groups_flat", None) or []
        self.allgather_bytes = sum(int(size) * flat.element_size()
                                   for size, flat in zip(getattr(self.opt, "partition_size", []), flats))
        if not replace:
            import torch.distributed as dist

            groups = getattr(self.opt, "real_dp_process_group", None) or []
            if comm.distributed and any(dist.get_world_size(group=pg) != comm.world_size for pg in groups):
                raise ValueError("reducer 'deepspeed' averages over ZeRO's data-parallel group, which here is not "
                                 f"every rank ({dist.get_world_size(group=groups[0])} of {comm.world_size}, e.g. one "
                                 "node: ds_ext.deepspeed.attach.node_mpu); nodes would drift apart. Use a ds_ext reducer "
                                 "with hierarchical: true, or build the engine without that mpu")
            return
        version = _deepspeed_version()
        problem = zero_bridge_version_problem(version)
        if problem:
            raise ValueError(problem)
        opt = engine.optimizer
        missing = [a for a in self._NEEDS if not hasattr(opt, a)]
        if missing:
            raise ValueError(f"ZeRO stage {engine.zero_optimization_stage()}: DeepSpeed {version}'s ZeRO optimizer "
                             f"({type(opt).__name__}) lacks {', '.join(missing)}, which the replacing reducer needs; "
                             "use ZeRO stage 0 or reducer 'deepspeed'")
        if opt.cpu_offload:
            raise ValueError("ZeRO-Offload (zero_optimization.offload_optimizer) is not supported with a replacing "
                             "reducer: remove it, or use reducer 'deepspeed'")
        unsupported = [what for what, on in (
            ("MoE expert parameter groups", getattr(opt, "has_moe_layers", False)),
            ("ZenFlow", getattr(opt, "zenflow", False)),
            ("managed_gradient_accumulation=false",
             not getattr(engine, "managed_gradient_accumulation", lambda: True)()),
        ) if on]
        if unsupported:
            raise ValueError(f"ZeRO stage {engine.zero_optimization_stage()} with a replacing reducer does not support "
                             f"{', '.join(unsupported)}; use reducer 'deepspeed'")
        import torch.distributed as dist

        node = None
        if topology is not None and topology.n_nodes > 1 and topology.local_size > 1:
            node = [dist.get_global_rank(comm.group, r) if comm.group is not None else r
                    for r in topology.node_members()]
        for i, pg in enumerate(opt.real_dp_process_group):
            size, rank = dist.get_world_size(group=pg), dist.get_rank(group=pg)
            if (size, rank) == (comm.world_size, comm.rank):
                continue
            if node is not None and list(dist.get_process_group_ranks(pg)) == node:
                self.node_partitioned = True
                continue
            within = (f" or this rank's node (ranks {node[0]}-{node[-1]}, ds_ext.deepspeed.attach.node_mpu)"
                      if node is not None else "")
            raise ValueError(f"ZeRO's data-parallel group of parameter group {i} (rank {rank} of {size}) is not "
                             f"the reducer's (rank {comm.rank} of {comm.world_size}){within}: attach over ZeRO's "
                             f"data-parallel group")
        if self.node_partitioned:
            if any(list(dist.get_process_group_ranks(pg)) != node for pg in opt.real_dp_process_group):
                raise ValueError("ZeRO's parameter groups are partitioned over different groups (some over the "
                                 "node, some not); build the engine with one data-parallel group")
            self.kind = "node_zero_allgather"
            # every node holds the same partitions (identical gradients, identical steps): only the first
            # node writes DeepSpeed's checkpoint files, whose names count ranks within the node and would
            # otherwise be written by every node at once; every node reads them back on load
            self._save_flags = (engine.save_non_zero_checkpoint, engine.save_zero_checkpoint)
            if topology.node > 0:
                engine.save_non_zero_checkpoint = engine.save_zero_checkpoint = False
        self._had_hooks = bool(opt._grad_acc_hooks)
        self._accum_attribute = opt.use_grad_accum_attribute
        for h in opt._grad_acc_hooks:
            h.remove()
        opt._grad_acc_hooks = []
        opt.use_grad_accum_attribute = False
        # where this rank's partition of each group lies: (param, first element in it, first element in the
        # partition, count), from the parameters' offsets in the group's flat buffer
        self.segments = []
        for i, flat in enumerate(opt.bit16_groups_flat):
            size = int(opt.partition_size[i])
            start = dist.get_rank(group=opt.real_dp_process_group[i]) * size
            segs = []
            for p in opt.bit16_groups[i]:
                if p.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                    raise ValueError(f"ZeRO group {i}: a parameter is not a view into ZeRO's flat buffer (DeepSpeed "
                                     f"{version}); use ZeRO stage 0 or reducer 'deepspeed'")
                off = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                lo, hi = max(off, start), min(off + p.numel(), start + size)
                if lo < hi:
                    segs.append((p, lo - off, lo - start, hi - lo))
            self.segments.append((size, segs))

    def fill(self) -> None:
        """After the reducer's ``finish()``, before ZeRO's ``step()``: this rank's partition of the averaged
        gradients, one flat buffer per group, in the fp32 partition's dtype (padding stays zero)."""
        opt = self.opt
        for i, (size, segs) in enumerate(self.segments):
            part = torch.zeros(size, dtype=opt.single_partition_of_fp32_groups[i].dtype, device=self.comm.device)
            for p, src, dst, n in segs:
                if p.grad is not None:
                    part.narrow(0, dst, n).copy_(p.grad.reshape(-1).narrow(0, src, n))
            opt.averaged_gradients[i] = [part]

    def restore(self, keep_node_state: bool = True) -> None:
        """Give ZeRO back its own gradient reduction (``Attachment.detach``). Node-partitioned, there is none
        to give back: ZeRO's own reduction would average over one node only, so its hooks stay removed,
        only the first node keeps writing DeepSpeed's checkpoint files, and ``Attachment.detach`` makes the
        engine's ``step`` refuse to run (``keep_node_state=False``: an attach that failed puts the flags back)."""
        if self.node_partitioned and keep_node_state:  # still partitioned within nodes: the flags stay off
            return
        if self._save_flags is not None:
            self.engine.save_non_zero_checkpoint, self.engine.save_zero_checkpoint = self._save_flags
        if self.replace and not self.opt._grad_acc_hooks:
            self.opt.use_grad_accum_attribute = self._accum_attribute
            if self._had_hooks:
                self.opt.create_gradient_handling_hooks()

    def record(self, meter) -> None:
        """ZeRO's all-gather of the updated parameter partitions (skipped by DeepSpeed on an overflow step):
        the partition this rank sends, as the meter counts an all_gather."""
        if meter is not None and self.comm.distributed and not getattr(self.opt, "overflow", False):
            meter.add(self.kind, self.allgather_bytes)


class StopVote:
    """Step hook: whether every rank stops after this step because a signal asked one of them to
    (``checkpoint.on_signal: save``, preemption). ``source`` says whether this rank was asked. On a step
    that communicates gradients each rank's answer rides on the step's one control exchange (one int64
    per rank, after the ``NonFiniteGuard``'s flags), so every rank reads the same verdict at the same step,
    with no extra collective or host read. A step without gradient communication carries no vote (ranks
    meet only in a synchronizer's collectives there): a request waits for the next communicating step,
    and a method that never communicates gradients (``Reducer.communicates_gradients`` false: reducer
    ``none``) cannot vote at all (the trainer then stops on a signal without saving). On one rank the
    request is its own verdict."""

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.source: Optional[Callable[[], bool]] = None
        self.agreed = False

    def control(self, communicates: bool) -> Optional[torch.Tensor]:
        if self.source is None or not communicates:
            return None
        return self.comm.tensor([1 if self.source() else 0], dtype=torch.int64)

    def settle(self, communicates: bool, rows) -> None:
        if self.source is None:
            return
        if not self.comm.distributed:
            self.agreed = bool(self.source())
        elif communicates and rows is not None:
            self.agreed = any(r[0] for r in rows)


class ConsistencyCheck:
    """Step hook: every ``every`` optimizer steps (at the next step where ranks must agree: local methods
    only agree right after a global averaging), ``check_consistency`` on the module. 0: off."""

    def __init__(self, module, comm: Communicator, every: int = 0):
        self.module, self.comm, self.every = module, comm, every
        self._due = False

    def after_step(self, steps: int, synced_globally: bool, global_step: int) -> None:
        if self.every and steps % self.every == 0:
            self._due = True
        if self._due and synced_globally:
            check_consistency(self.module, self.comm, global_step)
            self._due = False


def _node_partitioned_detached(*args, **kwargs):
    raise RuntimeError("this engine's ZeRO optimizer is partitioned within a node (hierarchical mode): without "
                       "the ds_ext attachment its own gradient reduction would average over one node only; "
                       "attach the hierarchical reducer again or build a new engine")


class Attachment:
    """The methods attached to one engine; hold on to it (it owns the hooks). It only wires: gradient
    hooks to the reducer (and the non-finite screen), microbatch gradients to a gradient-driven order,
    and ``engine.step`` to the step sequence reducer -> ``NonFiniteGuard`` -> synchronizer ->
    DeepSpeed's step -> synchronizer -> meter -> ``ConsistencyCheck``. What a method can do is declared on
    its base class (``Reducer.observes_microbatches``, ``Reducer.uses_kernels``, ``Order.observes_gradients``)."""

    def __init__(self, engine, reducer, sync, comm: Communicator, check_every: int = 0, order=None,
                 nonfinite: str = "skip"):
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
        self.guard = NonFiniteGuard(engine, reducer.params, comm, nonfinite,
                                    getattr(reducer, "inner_cls", type(reducer)).__name__,
                                    engine_reduces=not reducer.replaces_engine_allreduce)
        # ZeRO stage 1/2: the method's exchange replaces ZeRO's reduction (see ZeroBridge)
        self.zero = (ZeroBridge(engine, comm, replace=reducer.replaces_engine_allreduce,
                                topology=getattr(reducer, "topology", None))
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
        self.vote = StopVote(comm)
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
        if reducer.observes_microbatches:
            reducer.bind_order(order)
            self._feed = reducer.microbatch
        else:
            self._feed = order.observe_microbatch

    def _hook(self, p):
        if self.engine.is_gradient_accumulation_boundary() and self.sync.reduce_gradients_now():
            if self.guard.on and p.grad is not None:
                self.guard.screen(p.grad)
            self.reducer.grad_ready(p)

    def step(self, *args, **kwargs):
        if self._flat is not None:  # one microbatch backward has run: the order sees its gradient
            if self.guard.on:
                self.guard.screen(self._flat)
            self._feed(self._flat)
            self._flat.zero_()
        boundary = self.engine.is_gradient_accumulation_boundary()
        skip = False
        if boundary:
            reduced = self.sync.reduce_gradients_now()
            communicates = reduced and self.comm.distributed
            flags, vote = self.guard.control(communicates), self.vote.control(communicates)
            posted = [t for t in (flags, vote) if t is not None]
            if posted:  # rides on the step's one control exchange (a method's own, or one all_gather)
                self.comm.post_control(torch.cat(posted) if len(posted) > 1 else posted[0])
            if reduced:
                self.reducer.finish()
            rows = self.comm.collect_control() if posted else None
            shared = sharers = None
            if not reduced and self.sync.hierarchy is not None:  # the node's exact gradient mean, flag aboard
                shared = self.sync.local_gradient_exchange(self.guard.local_input_flag())
                sharers = self.sync.hierarchy.topology.node_members()
            k = 0 if flags is None else flags.numel()
            skip = self.guard.verdict(reduced, communicates, [r[:k] for r in rows] if flags is not None else None,
                                      shared=shared, sharers=sharers)
            self.vote.settle(communicates, [r[k:] for r in rows] if vote is not None else None)
            if not skip:
                self.sync.before_step()
        orig = self._orig_step
        if boundary and self.zero is not None and self.zero.replace:
            def orig(*a, **k):  # ZeRO's step reads this rank's partition of the reduced gradients
                self.zero.fill()
                return self._orig_step(*a, **k)
        out = self.guard.skipped_step(orig, *args, **kwargs) if skip else orig(*args, **kwargs)
        if boundary:
            self.last_step_communicated = bool(self.sync.after_step())
            if self.zero is not None:
                self.zero.record(self.meter)
            self.meter.end_step()
            self.steps += 1
            self.check.after_step(self.steps, self.sync.synced_globally, self.engine.global_steps)
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
        self.engine.step = self._orig_step
        self.engine.save_checkpoint, self.engine.load_checkpoint = self._orig_save, self._orig_load
        if self.zero is not None and self.zero.node_partitioned:
            self.engine.step = _node_partitioned_detached

    # ---- DeepSpeed's checkpoint calls, with the methods' state ------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False):
        """``engine.save_checkpoint`` while attached (collective): DeepSpeed's files, every rank's method state,
        ``meta.json``, then ``latest``; ``CheckpointSaveError`` on every rank when a write failed anywhere
        (``ds_ext/deepspeed/checkpoint.py``: ``save_checkpoint``). Returns what DeepSpeed's returns."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """``engine.load_checkpoint`` while attached (collective): DeepSpeed's files, then this rank's method
        state, checked to be this rank's, this world size's and DeepSpeed's step; ``CheckpointError`` on every
        rank otherwise (``ds_ext/deepspeed/checkpoint.py``: ``load_checkpoint``). Returns what DeepSpeed's returns."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(self, load_dir, tag=tag, **kwargs)

    def checkpoint_state(self) -> dict:
        """This rank's file of ``save_checkpoint``: the attachment's state, the order's, rank, world, step."""
        from .checkpoint import checkpoint_state

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
    """What ``attach`` runs, as a validated ``recipe.MethodSection``: ``method`` as given (a recipe's ``method``
    section; a dict of ``reducer`` / ``sync`` / ``order`` blocks, each a name, a ``{name: ..., <option>: ...}``
    dict, a typed options object such as ``PowerSGDOptions(rank=2)`` or ``(name, options)``), or, when
    ``method`` is None, the ``ds_ext`` block of the engine's DeepSpeed config (the same schema; absent:
    ``allreduce``, no sync, ``rr``). A bad block raises ``recipe.RecipeError`` (a ``ValueError``) naming the
    key and what is allowed, as the recipe check does."""
    from ..trainer.recipe import MethodSection, method_section

    if isinstance(method, MethodSection):
        return method
    if method is None:
        block = _deepspeed_settings(engine).get("ds_ext")
        if block is None:
            return MethodSection()
        return method_section(block, source="DeepSpeed config", prefix="ds_ext")
    if isinstance(method, dict):
        return method_section({k: _typed_block(k, v) for k, v in method.items()}, source="ds_ext.attach",
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
    ``skip`` (default) zeroes it before any reducer, order or error-feedback buffer sees it and skips the
    optimizer update on every rank (two int64 flags per rank on the step's control all_gather),
    ``raise`` stops every rank with ``NonFiniteError``, ``off`` does neither (DeepSpeed's fp16 loss
    scaler still skips overflowing steps). Under ZeRO (reducer ``deepspeed``) it is always ``off``.

    ``check`` runs each method's ``check(view)`` on this engine (the same rules as the recipe check:
    ZeRO stage, precision, clipping, combinations, world size) and raises ``ValueError`` listing every
    problem; ``check=False`` skips them (deliberately broken setups in tests).
    """
    load_builtin()
    method = method_spec(engine, method)
    rname, ropts = _block(method.reducer, "allreduce")
    sname, sopts = _block(method.sync, "none")
    ropts, sopts = REDUCERS.validated(rname, ropts), SYNCS.validated(sname, sopts)
    oname_spec = _block(method.order, "rr")[0]
    if order is None and oname_spec in ORDERS and getattr(ORDERS.get(oname_spec).factory, "observes_gradients", False):
        raise ValueError(f"method.order {oname_spec!r} sees every micro-batch gradient and orders the examples: pass "
                         f"the order object that drives your sampler (attach(..., order=ds_ext.ORDERS.build("
                         f"{oname_spec!r}, ...))), or use the ds_ext trainer")
    meter = meter or CommMeter()
    comm = Communicator(group, device=engine.device, meter=meter,
                        wire_dtype=getattr(engine, "communication_data_type", None))
    if check:  # the methods' own rules, as the recipe check runs them
        oname = ORDERS.name_of(order) if order is not None else _block(method.order, "rr")[0]
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
        from ..hierarchy import HierarchicalAveraging, Topology, build_hierarchical

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
    return Attachment(engine, reducer, sync, comm, check_every=check_every, order=order, nonfinite=nonfinite)


class NodeMPU:
    """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` takes, describing no model parallelism and one
    node's ranks as the data-parallel group: ZeRO 1/2 then partitions its optimizer state within the node
    (``ZeroBridge``, node-partitioned). DeepSpeed's batch arithmetic counts the data-parallel ranks, so a
    config built for it gives ``train_batch_size`` = micro-batch x accumulation x ranks per node
    (``deepspeed_config(..., data_parallel=...)``); the run's global batch is still that times the nodes."""

    def __init__(self, topology, group):
        self.topology, self.group = topology, group

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.local_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.local_rank

    def get_data_parallel_group_ranks(self):
        return self.topology.node_members()

    def get_model_parallel_group(self):
        return None  # no model parallelism (DeepSpeed skips collectives over a None group)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def node_mpu(comm: Optional[Communicator] = None) -> Optional[NodeMPU]:
    """Collective (every rank, before ``deepspeed.initialize``): a ``NodeMPU`` over this rank's node, from
    the launcher's ``LOCAL_RANK`` / ``LOCAL_SIZE`` (``hierarchy.Topology.from_env``, checked on every rank).
    None where node partitioning means nothing: one node (ZeRO's default group is the node already) or one
    rank per node (no partition at all; ZeRO then partitions over every rank, as without hierarchical mode).
    For an own loop: ``deepspeed.initialize(..., mpu=node_mpu(), config=cfg)`` with ``cfg``'s
    ``train_batch_size`` counting one node's ranks, then ``ds_ext.attach`` with ``hierarchical: true``. Two
    things DeepSpeed then does per node only: it broadcasts the initial parameters inside each node (attach
    checks that every node starts alike; seed the model alike on every rank), and the sampler of its
    ``training_data=`` loader splits the data over one node's ranks (every node would read the same shard:
    build your own loader over all ranks, as the ds_ext trainer does)."""
    from ..hierarchy import Topology

    comm = comm or Communicator()
    topo = Topology.from_env(comm)
    if topo.n_nodes == 1 or topo.local_size == 1:
        log.info("hierarchical ZeRO: %s, so ZeRO partitions over all %d ranks", "one node" if topo.n_nodes == 1
                 else "one rank per node", topo.world)
        return None
    log.info("hierarchical ZeRO: the optimizer state is partitioned within each node (%d ranks), one copy per "
             "node (%d nodes); ZeRO's parameter all-gather stays inside the node", topo.local_size, topo.n_nodes)
    groups = [comm.subgroup(topo.node_members(k)) for k in range(topo.n_nodes)]  # collective, same order
    return NodeMPU(topo, groups[topo.node].group)


@contextlib.contextmanager
def _scoped_mpu():
    """``deepspeed.initialize(mpu=...)`` stores the mpu in ``deepspeed.utils.groups``, a process-wide
    registry every later engine would read; the engine keeps its groups in attributes, so the registry is
    put back as it was once the engine is built."""
    from deepspeed.utils import groups

    before = groups.mpu
    try:
        yield
    finally:
        groups.mpu = before


def hierarchical_zero(recipe) -> bool:
    """Whether a recipe runs a hierarchical reducer under ZeRO 1/2 (``initialize`` then partitions within nodes)."""
    from ..registry import zero_stage_of

    load_builtin()
    method = recipe.method
    spec = method.get("reducer") if isinstance(method, dict) else getattr(method, "reducer", None)
    rname, ropts = _block(spec, "allreduce")
    ropts = REDUCERS.validated(rname, ropts)
    return bool(getattr(ropts, "hierarchical", False)) and zero_stage_of(recipe.deepspeed) in (1, 2)


def deepspeed_config(recipe, world_size: int, data_parallel: Optional[int] = None) -> dict:
    """The engine's DeepSpeed config for ``world_size`` ranks. ``data_parallel``: the ranks DeepSpeed's
    data-parallel group holds (``NodeMPU``: one node's), which its batch arithmetic counts."""
    micro, gas = recipe.batch_plan(world_size)
    # DeepSpeed clips at norm 1.0 unless told otherwise (GRADIENT_CLIPPING_DEFAULT), with one extra
    # allreduce per step; a recipe clips only when its deepspeed block sets gradient_clipping.
    cfg = {"steps_per_print": 10**12, "wall_clock_breakdown": False, "gradient_clipping": 0.0}
    cfg.update(recipe.deepspeed)
    if int((cfg.get("zero_optimization") or {}).get("stage", 0) or 0) >= 1:
        # our optimizers are torch's (SGD, AdamW, ...), which ZeRO steps like any other on its fp32 partition;
        # DeepSpeed otherwise refuses any optimizer it has not listed as tested (tests/test_zero.py runs them)
        cfg.setdefault("zero_allow_untested_optimizer", True)
    batch = recipe.train.global_batch_size if data_parallel is None else micro * gas * data_parallel
    cfg.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
    return cfg


def initialize(recipe, model: torch.nn.Module, steps_per_epoch: int, meter: Optional[CommMeter] = None,
               order=None):
    """Build optimizer + LR schedule + DeepSpeed engine from a recipe and attach its methods.

    Returns ``(engine, attachment, schedule)``. ``torch.distributed`` must already be initialised
    (``deepspeed.init_distributed``)."""
    import deepspeed

    from ..trainer.optim import LRSchedule

    import torch.distributed as dist

    load_builtin()
    world = dist.get_world_size()
    opt_entry = OPTIMIZERS.get(recipe.optimizer.name)
    optimizer = opt_entry.factory(model.parameters(), recipe.optimizer.options)
    schedule = LRSchedule(optimizer, recipe.schedule, recipe.optimizer.options.lr, steps_per_epoch,
                          recipe.train.epochs)
    mpu = node_mpu() if hierarchical_zero(recipe) else None  # ZeRO partitions within the node
    config = deepspeed_config(recipe, world, None if mpu is None else mpu.get_data_parallel_world_size())
    with _scoped_mpu():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=config, mpu=mpu)
    total = steps_per_epoch * recipe.train.epochs
    attachment = attach(engine, recipe.method, meter=meter, check_every=recipe.train.check_consistency_every,
                        total_steps=total, order=order, nonfinite=getattr(recipe.train, "nonfinite", "skip"),
                        steps_per_epoch=steps_per_epoch)
    return engine, attachment, schedule
