"""Stop signals: SIGTERM (what the deepspeed launcher and Slurm's ``scancel`` send), SIGINT (Ctrl-C:
the terminal sends it to every process of the foreground group, the launcher and each rank) and
SIGUSR1 (Slurm's ``--signal=USR1@T`` before the time limit). Their Python handlers (installed by
``Watchdog.start``) never raise on the main thread, so no ``KeyboardInterrupt`` is ever raised inside
a collective; the signal number also reaches the watchdog thread through ``signal.set_wakeup_fd``,
which acts on it even while the main thread sits in a C++ call. For SIGTERM the watchdog first waits
up to ``SIGNAL_VERDICT_WAIT_S`` (3 s) for a peer verdict (the launcher's SIGTERM follows a peer's
death by up to a second: the peer-lost line and exit 4 win then); SIGUSR1 and SIGINT under ``save``
are recorded at once, by the main-thread handler, so the step the main thread is in already votes
with them (``exit`` still waits, as for SIGTERM). Then, by ``on_signal``:

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/stop-signals.md``.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from ...stop_signals import ignore_in_child
from .common import EXIT_PREEMPTED, ON_SIGNAL, REPEAT_S, STOP_SIGNALS, _default_rank, _say, _signame, where

if TYPE_CHECKING:
    from .watchdog import Watchdog

class _Signals:
    """What the stop signals have asked of this process so far (one instance: ``_signals``)."""

    def __init__(self):
        self.reset("exit", 0)

    def reset(self, mode: str, rank: int) -> None:
        if mode not in ON_SIGNAL:
            raise ValueError(f"on_signal={mode!r}: expected one of {', '.join(ON_SIGNAL)}")
        self.mode, self.rank = mode, rank
        self.first: Optional[Tuple[float, str]] = None  # (time.monotonic(), its name) of the first signal
        self.request: Optional[str] = None              # what stop_requested() returns

    def arrive(self, signum: int, now: float) -> str:
        """``first``, ``same`` (less than ``REPEAT_S`` after the first: ignore it) or ``repeat``."""
        if self.first is None:
            self.first = (now, _signame(signum))
            return "first"
        return "same" if now - self.first[0] < REPEAT_S else "repeat"

    def repeat_line(self, signum: int, now: float) -> str:
        t, first = self.first
        return (f"[ds_ext] rank {self.rank}: {_signame(signum)} {now - t:.0f} s after {first}, at {where()}; "
                f"stopped by {_signame(signum)} (exit {128 + signum})")

    def exit_line(self, signum: int) -> str:
        return f"[ds_ext] rank {self.rank}: at {where()}; stopped by {_signame(signum)} (exit {128 + signum})"

    def record(self, signum: int) -> None:
        """The ``save`` mode's answer to a first signal (silent when the ranks already agreed to stop)."""
        if self.request is not None:
            return
        self.request = _signame(signum)
        _say(f"[ds_ext] rank {self.rank}: {self.request} at {where()}: finishing this step, saving a checkpoint, "
             f"then stopping (exit {EXIT_PREEMPTED}); send it again to stop at once")


_signals = _Signals()
_saved_handlers: Dict[int, object] = {}  # the handlers ours replaced (restore_signal_handlers)
_saved_wakeup_fd: Optional[int] = None


def stop_requested() -> Optional[str]:
    """The name of the stop signal (``"SIGUSR1"``...) this rank was asked to save and stop on, or None.
    Only set under ``on_signal="save"``; the main thread polls it once per step (the ranks must then
    agree, e.g. with an all_reduce (max) of the flag, since a signal may reach only some of them)."""
    return _signals.request


def stop_code() -> int:
    """This rank's stop request as a number for the ranks' agreement: the signal's number, or 0. A
    loop of one's own all_reduces it (max) every step and, when the result is not 0, calls
    ``stop_agreed`` with it on every rank (the trainer votes through ``ds_ext.deepspeed.step_hooks.StopVote`` instead): a
    signal may reach only some ranks (Slurm's SIGUSR1 to one task, a ``kill``), and
    one rank's watchdog may record its request a little after another's."""
    name = _signals.request
    return int(signal.Signals[name]) if name else 0


def stop_agreed(code: int) -> str:
    """The ranks agreed to save and stop at this step on ``code`` (the all_reduce (max) of
    ``stop_code()``); returns the signal's name. A rank without a request of its own records one and
    prints ``[ds_ext] rank R: SIGUSR1 on another rank, at step S (what): finishing this step, saving a
    checkpoint, then stopping (exit 75); a signal to this rank stops it at once`` (its own signal
    arriving later prints nothing more; a second one from 2 s on stops it at once)."""
    name = _signame(code)
    if _signals.request is None:
        _signals.request = name
        if _signals.first is None:
            _signals.first = (time.monotonic(), f"{name} on another rank")
        _say(f"[ds_ext] rank {_signals.rank}: {name} on another rank, at {where()}: finishing this step, saving a "
             f"checkpoint, then stopping (exit {EXIT_PREEMPTED}); a signal to this rank stops it at once")
    return _signals.request


def _handle_in_main(signum: int, frame=None) -> None:
    """The main-thread handler without a watchdog thread: the same rules, without the verdict wait."""
    now = time.monotonic()
    kind = _signals.arrive(signum, now)
    if kind == "same":
        return
    if kind == "repeat":
        line = _signals.repeat_line(signum, now)
    elif _signals.mode == "exit":
        line = _signals.exit_line(signum)
    else:
        _signals.record(signum)
        return
    _say(line)
    os._exit(128 + signum)


def _install(handler, wakeup_fd: Optional[int] = None) -> bool:
    """Install ``handler`` for ``STOP_SIGNALS`` (and the wakeup fd); main thread only."""
    global _saved_wakeup_fd
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        for sig in STOP_SIGNALS:
            old = signal.signal(sig, handler)
            _saved_handlers.setdefault(sig, old)
        if wakeup_fd is not None:
            old_fd = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
            if _saved_wakeup_fd is None:
                _saved_wakeup_fd = old_fd
    except (ValueError, OSError):
        return False
    return True


def install_signal_handlers(on_signal: str, rank: Optional[int] = None) -> None:
    """For runs without a watchdog (``Watchdog.start`` returned None): main-thread handlers for
    SIGTERM, SIGINT and SIGUSR1 with the rules of the module docstring (``on_signal``: ``"exit"`` or
    ``"save"``; ``rank`` for the messages, default the process group's rank or ``$RANK``). Call it
    from the main thread; ``restore_signal_handlers()`` undoes it."""
    if rank is None:
        rank = _default_rank()
    _signals.reset(on_signal, rank)
    _install(_handle_in_main)


def restore_signal_handlers() -> None:
    """Put back the handlers (and wakeup fd) that ``install_signal_handlers`` / ``Watchdog.start``
    replaced. Main thread only; harmless when nothing is installed."""
    global _saved_wakeup_fd
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if _saved_wakeup_fd is not None:
            signal.set_wakeup_fd(_saved_wakeup_fd)
        for sig, old in _saved_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    _saved_wakeup_fd = None
    _saved_handlers.clear()


_active: Optional["Watchdog"] = None  # the running watchdog (the fork hook closes its descriptors)


def _set_active(wd: Optional["Watchdog"]) -> None:
    global _active
    _active = wd


def _after_fork_in_child() -> None:
    """In a process forked from a rank (a DataLoader worker): the Ctrl-C, the launcher's tree-wide
    SIGTERM or Slurm's SIGUSR1 that reach it must neither kill it while its rank finishes a step nor
    count as its rank's signal (the wakeup fd would write into the rank's pipe) nor print the rank's
    lines. So the stop signals get a do-nothing handler (a handled signal is reset to the default by
    exec, unlike an ignored one), the wakeup fd is dropped, and the child closes its copies of the
    watchdog's sockets (so that a rank's death still ends its connection while its workers live on;
    closing a copy sends nothing). The child ends with its rank (torch's workers check their parent)."""
    global _saved_wakeup_fd, _active
    wd, _active = _active, None
    if _saved_handlers:
        try:
            if _saved_wakeup_fd is not None:
                signal.set_wakeup_fd(-1)
            for sig in _saved_handlers:
                signal.signal(sig, ignore_in_child)
        except (ValueError, OSError):
            pass
        _saved_handlers.clear()
        _saved_wakeup_fd = None
    if wd is not None:
        wd._closing = True
        wd._close_fds()


os.register_at_fork(after_in_child=_after_fork_in_child)
