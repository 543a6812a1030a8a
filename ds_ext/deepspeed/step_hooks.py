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
    """Step hook: a NaN or inf in any rank's gradient never reaches a method's state, and the update is
    skipped on every rank (``mode``: ``skip``, ``raise`` or ``off``; see ``attach``).

    Host reads per optimizer step: at most one. The screen keeps its flags on the device; on a step that
    communicates gradients every rank's flags are posted to the communicator and ride on the step's one
    control exchange (a method's own, e.g. ExDyna's counts, or a two-element all_gather of the guard's);
    on a local step (Local SGD / DS-Sync between averagings) this rank's flag is read alone."""

    def __init__(self, engine, params, comm: Communicator, mode: str = "skip", method: str = "reducer",
                 engine_reduces: bool = False, sharers: Optional[Sequence[int]] = None):
        """``method``: the reducer's name in messages; ``sharers``: the ranks a synchronizer's node exchange
        sums this rank's flag over on a local step (hierarchical mode: this rank's node), else None."""
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        if mode != "off" and engine_reduces and engine.zero_optimization_stage() != 0:
            mode = "off"  # ZeRO reduces inside its own hooks (reducer deepspeed): DeepSpeed's overflow handling
        self.engine, self.params, self.comm, self.mode, self.method = engine, params, comm, mode, method
        self.sharers = None if sharers is None else list(sharers)
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

    def control(self, info: StepInfo) -> Optional[torch.Tensor]:
        """Before the reducer's ``finish``: this rank's two flags (int64, device) to ride on the step's one
        control exchange (``Attachment.step`` posts them), or None when there is nothing to send."""
        if not self.on or not info.communicates:
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

    def before_step(self, info: StepInfo, rows) -> bool:
        return self.verdict(info.reduced, info.communicates, rows, shared=info.shared, sharers=self.sharers)

    def wrap(self, step: Callable, info: StepInfo) -> Callable:
        return functools.partial(self.skipped_step, step) if info.skip else step

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
