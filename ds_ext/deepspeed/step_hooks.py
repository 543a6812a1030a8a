"""Step hooks: what runs around the optimizer step at an accumulation boundary.

One small protocol (``StepHook``) that ``Attachment.step`` runs in order over its hooks ``[NonFiniteGuard,
StopVote, ZeroBridge, ConsistencyCheck]`` (the bridge only under ZeRO 1/2, ``ds_ext/deepspeed/zero.py``):
``NonFiniteGuard`` (a NaN or inf in any rank's gradient skips the update on every rank), ``StopVote`` (every
rank stops after the same step when a signal asked one of them to) and ``ConsistencyCheck`` (every rank holds
the same parameters, by ``parameter_fingerprint``). Each hook gets what it needs when it is built; per step
it sees a ``StepInfo`` and its own slice of the step's control rows.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..comm import Communicator
from ..reducers.base import any_nonfinite

log = logging.getLogger(__name__)


class DesyncError(RuntimeError):
    """Ranks that must hold identical parameters do not."""


class NonFiniteError(FloatingPointError):
    """A non-finite gradient with ``nonfinite="raise"``, or a method that produced one from finite inputs."""


NONFINITE_MODES = ("skip", "raise", "off")


@dataclass
class StepInfo:
    """One optimizer step (an accumulation boundary) as the hooks see it; ``Attachment.step`` fills it in."""

    reduced: bool  #: the reducer ran this step (``Synchronizer.reduce_gradients_now``)
    communicates: bool  #: ... and exchanged gradients between ranks: the step's control exchange runs
    #: a local step in hierarchical mode: this rank's non-finite flag summed by the synchronizer's node exchange
    shared: Optional[torch.Tensor] = None
    skip: bool = False  #: a hook's ``before_step`` skipped the optimizer update
    steps: int = 0  #: the attachment's optimizer steps, this one included (set before ``after_step``)
    synced_globally: bool = False  #: every rank must now hold identical parameters (set before ``after_step``)
    global_step: int = 0  #: DeepSpeed's ``global_steps`` after the step (set before ``after_step``)


class StepHook:
    """What runs around the optimizer step at an accumulation boundary. ``Attachment.step`` runs each phase
    over its hooks in order (the defaults do nothing):

    1. ``control(info)``, before the reducer's ``finish()``: a 1-D int64 vector on ``comm.device`` to ride on
       the step's one control exchange, or None. The hooks' vectors are posted together, once
       (``Communicator.post_control``: a method's own exchange carries them, or one all_gather).
    2. ``before_step(info, rows)``, after ``finish()``: ``rows`` holds every rank's copy of this hook's own
       vector (one list of ints per rank; None when it posted none). True skips the optimizer update.
    3. ``wrap(step, info)``: the step function to run (DeepSpeed's, already wrapped by the later hooks):
       ``step`` itself or a function around it.
    4. ``after_step(info)``, after the step and the synchronizer's ``after_step``, before the meter closes
       the step."""

    def control(self, info: StepInfo) -> Optional[torch.Tensor]:
        return None

    def before_step(self, info: StepInfo, rows: Optional[List[List[int]]]) -> bool:
        return False

    def wrap(self, step: Callable, info: StepInfo) -> Callable:
        return step

    def after_step(self, info: StepInfo) -> None:
        pass


def split_rows(rows: Optional[List[List[int]]], posted: Sequence[Optional[torch.Tensor]]) -> list:
    """Each hook's slice of the control rows, in the order of ``posted`` (the hooks' ``control`` vectors,
    concatenated in that order on every rank): a list of rows per hook, None for a hook that posted none."""
    out, k = [], 0
    for t in posted:
        if t is None:
            out.append(None)
            continue
        n = t.numel()
        out.append([r[k:k + n] for r in rows])
        k += n
    return out


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


class NonFiniteGuard(StepHook):
    """Step hook: a NaN or inf in any rank's gradient skips the update on every rank (``mode``: ``skip``,
    ``raise`` or ``off``; see ``attach``), read from data the method already produces (``Reducer.nonfinite_view``):

    * ``reduced`` (allreduce, half, powersgd, acpsgd, topk, signsgd, deepspeed): after ``finish()`` one
      fused check of the buffers the reducer's collectives returned (the reduced buckets, the all-reduced
      P / Q factors, the gathered sparse values or sign scales). A non-finite value of any rank propagates
      into them and they are identical on every rank, so every rank reaches the same verdict with no
      collective of its own; the reduced data does not say which rank it came from (the event's ranks are
      None). Nothing runs inside the gradient hooks.
    * ``exchange`` (exdyna): each rank checks its own ``grad + e`` (one fused reduction) and the flag rides on
      the reducer's counts exchange; the event names the ranks.
    * ``local`` (hierarchical wrappers, cdgrab, a reducer that declares nothing): each rank checks its own
      gradients with one fused reduction before ``finish()`` and the flag rides on the step's control exchange.
    * A gradient-driven order (D-GraB, CD-GraB) consumes every microbatch gradient: the attachment screens that
      flat buffer (``screen``: one fused check, zeroed when non-finite, so the order's state stays finite) and
      its flags ride on the step's control exchange as well (they name the ranks).
    * A local step (Local SGD / DS-Sync between averagings): this rank's gradients, one fused check, read alone
      (or summed over the node by a hierarchical synchronizer's exchange).

    On a skipped step the reducer's ``reset_nonfinite()`` drops the state that absorbed the value (error
    feedback, warm-start factors) on every rank. Host reads per optimizer step: one (the control exchange's,
    with the reduced-data flag aboard when an exchange runs, else the flag's own)."""

    def __init__(self, engine, params, comm: Communicator, mode: str = "skip", method: str = "reducer",
                 engine_reduces: bool = False, sharers: Optional[Sequence[int]] = None, reducer=None):
        """``method``: the reducer's name in messages; ``sharers``: the ranks a synchronizer's node exchange
        sums this rank's flag over on a local step (hierarchical mode: this rank's node), else None;
        ``reducer``: whose ``nonfinite_view`` the guard reads (None: ``local``)."""
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        if mode != "off" and engine_reduces and engine.zero_optimization_stage() != 0:
            mode = "off"  # ZeRO reduces inside its own hooks (reducer deepspeed): DeepSpeed's overflow handling
        self.engine, self.params, self.comm, self.mode, self.method = engine, params, comm, mode, method
        self.sharers = None if sharers is None else list(sharers)
        self.reducer = reducer
        self.view = getattr(reducer, "nonfinite_view", "local")
        self.microbatches = False  # set by the attachment when it screens every microbatch gradient (orders)
        if self.on and reducer is not None:
            reducer.watch_nonfinite()
        self._bad = []  # 0-dim bool device flags of the current window's screened microbatch gradients
        self._posted = False  # this step's local flag rides on the control exchange
        self._late = None  # this step's reduced-data flag (device), None: none
        self._late_bad: Optional[bool] = None  # ... read from the control exchange it rode on
        self.skipped_steps = 0
        self.events = []  # (optimizer step, ranks or None when the reduced data cannot name them), newest last

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def screen(self, g: torch.Tensor) -> None:
        """A microbatch gradient (one flat buffer) for a gradient-driven order: flag it and zero it in place
        when non-finite, before the order sees it. One fused check (the ``inf``-norm: NaN and inf propagate,
        no finite gradient is flagged); nothing is read on the host here."""
        if g.numel() == 0:
            return
        bad = any_nonfinite([g])
        g.masked_fill_(bad, 0)
        self._bad.append(bad)

    def _local_flag(self, grads: bool) -> torch.Tensor:
        """This rank's flag of the window (0-dim bool, device): its screened microbatches, and with ``grads``
        its gradients (one fused check over every ``p.grad``)."""
        flags, self._bad = self._bad, []
        if grads:
            flags = flags + [any_nonfinite([p.grad for p in self.params if p.grad is not None], self.comm.device)]
        if not flags:
            return self.comm.zeros((), dtype=torch.bool)
        return (torch.stack(flags).any() if len(flags) > 1 else flags[0]).to(self.comm.device)

    def _needs_grads(self) -> bool:
        """Whether this rank's own gradients must be checked before ``finish``: the reducer cannot see them
        and no microbatch screen did."""
        return self.view == "local" and not self.microbatches

    def control(self, info: StepInfo) -> Optional[torch.Tensor]:
        """Before the reducer's ``finish``: this rank's local flag (int64 [1], device) to ride on the step's
        one control exchange, when the method's own data cannot show it (module docstring), else None."""
        self._posted, self._late, self._late_bad = False, None, None
        if not self.on or not info.communicates or not (self.microbatches or self._needs_grads()):
            return None
        self._posted = True
        return self._local_flag(self._needs_grads()).to(torch.int64).reshape(1)

    def after_finish(self, info: StepInfo) -> Optional[torch.Tensor]:
        """After the reducer's ``finish``: the reduced-data flag (0-dim, device, not read) that ``Attachment.step``
        puts aboard the step's control exchange when one is still to run (``take_reduced``), else None."""
        if not self.on or not info.reduced or self.view != "reduced":
            return None
        self._late = self.reducer.nonfinite_flag()
        return self._late

    def take_reduced(self, value: int) -> None:
        """The reduced-data flag as it came back from the control exchange it rode on (the same on every rank)."""
        self._late_bad = bool(value)

    def local_input_flag(self) -> torch.Tensor:
        """On a step where the reducer did not run: this rank's "non-finite input" flag (0-dim fp32, device, not
        read; one fused check), for a synchronizer's own gradient exchange to carry
        (``Synchronizer.local_gradient_exchange``). Zeros with the guard off."""
        if not self.on:
            return self.comm.zeros(())
        return self._local_flag(True).float()

    def before_step(self, info: StepInfo, rows) -> bool:
        return self.verdict(info, rows)

    def wrap(self, step: Callable, info: StepInfo) -> Callable:
        return functools.partial(self.skipped_step, step) if info.skip else step

    def verdict(self, info: StepInfo, rows=None) -> bool:
        """Whether this step's optimizer update is skipped. After a gradient reduction the verdict is the same
        on every rank (it comes from reduced data or from every rank's flags), so every rank skips or none
        does, and the reducer's state is reset on every rank; on a local step (no gradient communication) each
        rank decides alone, which is safe because ranks hold different parameters there anyway and the step
        counters that decide the next averaging still advance on every rank."""
        if not self.on:
            return False
        step = self.engine.global_steps + 1
        if info.shared is not None:  # a local step whose flag a synchronizer's exchange summed over ``sharers``
            inp = bool(info.shared > 0)  # the step's one host read
            if inp:
                self._skip_event(step, list(self.sharers), shared=False,
                                 report=self.comm.global_rank == min(self.sharers),
                                 where="on every rank of this node (local step)")
            return inp
        if not info.reduced:  # local step: this rank's gradients
            if bool(self._local_flag(True)):  # the step's one host read
                self._skip_event(step, [self.comm.global_rank], shared=False)
                return True
            return False
        ranks, named = self._named_ranks(info, rows)
        reduced_bad = self._reduced_bad()
        if ranks:
            self._skip_event(step, ranks, shared=True)
        elif reduced_bad:
            if named:  # every rank's inputs were checked and finite: the method itself failed
                raise NonFiniteError(f"step {step}: reducer {self.method} produced a non-finite gradient from "
                                     f"finite inputs on every rank")
            self._skip_event(step, None, shared=True)
        else:
            return False
        if self.reducer is not None:
            self.reducer.reset_nonfinite()
        return True

    def _named_ranks(self, info: StepInfo, rows):
        """``(ranks whose own check found a non-finite value, whether every rank's inputs were checked)``."""
        if self.view == "exchange":
            got = self.reducer.nonfinite_ranks()
            if got is not None:
                return got, True
        if self._posted:  # every rank's flag came back from the control exchange
            return [r for r, f in enumerate(rows) if f[0]], True
        if info.communicates or not (self.microbatches or self._needs_grads()):
            return [], False
        # one rank (nothing exchanged): its own flag, read together with the reduced one (one host read)
        flag = self._local_flag(self._needs_grads())
        if self._late is not None and self._late_bad is None:
            flag, self._late_bad = (bool(x) for x in torch.stack([flag, self._late.to(flag.device)]).tolist())
        return ([self.comm.global_rank] if bool(flag) else []), True

    def _reduced_bad(self) -> bool:
        if self._late is None:
            return False
        if self._late_bad is None:
            self._late_bad = bool(self._late)  # the step's one host read (no control exchange ran)
        bad, self._late, self._late_bad = self._late_bad, None, None
        return bad

    def check_pending(self) -> None:
        """Kept for callers (the trainer before every checkpoint and at the end): a non-finite result is now
        seen on the step that made it (reduced-data check), so nothing is pending."""

    def _skip_event(self, step: int, ranks, shared: bool, report: Optional[bool] = None,
                    where: Optional[str] = None) -> None:
        """``ranks``: the ranks that had it, or None when only the reduced data showed it (every rank's)."""
        where = where or ("on all ranks" if shared else "on this rank only (local step)")
        who = (f"rank(s) {list(ranks)}" if ranks is not None else
               f"a rank (seen in the reduced data of {self.method}, which does not say which)")
        if self.mode == "raise":
            raise NonFiniteError(f"step {step}: non-finite gradient on {who} (train.nonfinite=raise)")
        self.skipped_steps += 1
        self.events.append((step, None if ranks is None else list(ranks)))
        show = report if report is not None else (not shared or self.comm.global_rank == 0)  # local: its own rank
        if show:
            log.warning("step %d: non-finite gradient on %s; optimizer step skipped %s (error-feedback state "
                        "reset, order state saw zeros)", step, who, where)

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


class StopVote(StepHook):
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

    def control(self, info: StepInfo) -> Optional[torch.Tensor]:
        if self.source is None or not info.communicates:
            return None
        # fill_ with a host scalar is a kernel argument; torch.tensor([v], device=cuda) would be a pageable
        # host-to-device copy, which synchronises the stream (one hidden sync per step: issue 27 N3)
        return self.comm.zeros(1, dtype=torch.int64).fill_(1 if self.source() else 0)

    def before_step(self, info: StepInfo, rows) -> bool:
        self.settle(info.communicates, rows)
        return False

    def settle(self, communicates: bool, rows) -> None:
        if self.source is None:
            return
        if not self.comm.distributed:
            self.agreed = bool(self.source())
        elif communicates and rows is not None:
            self.agreed = any(r[0] for r in rows)


class ConsistencyCheck(StepHook):
    """Step hook: every ``every`` optimizer steps (at the next step where ranks must agree: local methods
    only agree right after a global averaging), ``check_consistency`` on the module. 0: off."""

    def __init__(self, module, comm: Communicator, every: int = 0):
        self.module, self.comm, self.every = module, comm, every
        self._due = False

    def after_step(self, info: StepInfo) -> None:
        if self.every and info.steps % self.every == 0:
            self._due = True
        if self._due and info.synced_globally:
            check_consistency(self.module, self.comm, info.global_step)
            self._due = False
