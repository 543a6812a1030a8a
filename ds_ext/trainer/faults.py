"""A dying rank, a stop signal, a stuck rank: the peer watchdog, the messages, the test-only fault hook.

What happens without this module (measured with gloo through DeepSpeed's launcher, 3 ranks, one
SIGKILLed in an allreduce): the survivors' next collective raises ``RuntimeError: [.../pair.cc:553]
Connection closed by peer [127.0.0.1]:5021`` (or ``Read error ... Connection reset by peer``) within
milliseconds, each with a Python traceback. The address names a socket, not a rank (every local rank
is ``127.0.0.1``), a survivor that is computing rather than communicating learns nothing until its
next collective, and with NCCL nothing is raised at all until the collective timeout. DeepSpeed's
local launcher (``deepspeed/launcher/launch.py``) polls its children once a second; when one exits
non-zero it sends SIGTERM to all the others (SIGKILL 30 s later), logs ``... exits with return code
= -9`` naming the command line of the *last* child it started rather than the one that died, and
exits with that code (-9 becomes 247). So the run does stop, but nobody says which rank was lost.

The watchdog (``Watchdog.start``, one daemon thread per rank) says it. Rank 0 listens on a TCP port
(an ephemeral one, published through the c10d TCPStore that rank 0 already hosts for the
rendezvous); every other rank connects once, says ``hello <rank> <pid> <host>`` and keeps the
connection open for the life of the run. The operating system closes a process's sockets when it
dies for any reason (SIGKILL, segfault, the OOM killer), so:

* rank 0 sees end-of-file on rank r's connection. If rank r had said goodbye first (``left <rank>
  <exit code> <reason>``, sent by ``Watchdog.close`` whenever ``train()`` returns or raises), it left
  on purpose; otherwise it was lost. Rank 0 relays ``lost r`` / ``left r ...`` to every other rank.
* every other rank sees end-of-file on its connection to rank 0 without rank 0's goodbye: rank 0
  was lost (the store went with it, which is itself the evidence).

No heartbeat-based verdicts and no timing guesses: a rank that is merely slow (a long checkpoint
write, a long ``torch.save`` holding the GIL) keeps its connection and is never declared lost. A
rank that is alive but stuck is not declared anything; the collective timeout
(``train.collective_timeout_s``, given to ``deepspeed.init_distributed``) bounds that case, and the
message then says that every rank is still connected.

On a verdict a survivor prints one line naming the lost rank (pid, host), the step it was at and
what it was doing, and leaves with ``os._exit(EXIT_PEER_LOST)`` from the watchdog thread: no
traceback, no hang in gloo/NCCL destructors, and it works even when the main thread is blocked in a
collective that will never return (NCCL). A peer that left on purpose with a non-zero code (a
recipe, data or checkpoint error, or an exception) gets ``GRACE_S`` seconds for this rank to reach
the same verdict itself before it is stopped too; a peer that left with 0 or ``EXIT_PREEMPTED``
starts no countdown (every rank leaves by itself at the same step then; ``EXIT_DIVERGED`` does start
it: a skip on a local step of Local SGD / DS-Sync is one rank's own). When the
main thread's collective fails first (gloo), ``explain_failure`` waits briefly for the watchdog's
verdict and prints the same line. ``DS_EXT_WATCHDOG=0`` turns the watchdog off (a firewall that only
opens MASTER_PORT); failures are then reported from the main thread without the rank.

Stop signals: SIGTERM (what the deepspeed launcher and Slurm's ``scancel`` send), SIGINT (Ctrl-C:
the terminal sends it to every process of the foreground group, the launcher and each rank) and
SIGUSR1 (Slurm's ``--signal=USR1@T`` before the time limit). Their Python handlers (installed by
``Watchdog.start``) never raise on the main thread, so no ``KeyboardInterrupt`` is ever raised inside
a collective; the signal number also reaches the watchdog thread through ``signal.set_wakeup_fd``,
which acts on it even while the main thread sits in a C++ call. For SIGTERM the watchdog first waits
up to ``SIGNAL_VERDICT_WAIT_S`` (3 s) for a peer verdict (the launcher's SIGTERM follows a peer's
death by up to a second: the peer-lost line and exit 4 win then); SIGUSR1 and SIGINT under ``save``
are recorded at once, by the main-thread handler, so the step the main thread is in already votes
with them (``exit`` still waits, as for SIGTERM). Then, by ``on_signal``:

* ``"exit"``: one line ``[ds_ext] rank R: at step S (what); stopped by SIGINT (exit 130)`` and exit
  ``128 + signum`` (``EXIT_SIGTERM`` 143, ``EXIT_SIGINT`` 130, ``EXIT_SIGUSR1`` 138).
* ``"save"``: the first signal records a stop request that the main thread polls with
  ``stop_requested()`` (the signal's name, or None) and prints ``... SIGUSR1 at step S (what):
  finishing this step, saving a checkpoint, then stopping (exit 75); send it again to stop at
  once``. The ranks must agree on the request (a signal may reach only some): the trainer does it
  with ``engine.StopVote`` (each rank's request rides on the step's gradient control exchange); a
  loop of one's own can all_reduce (max) ``stop_code()`` and call ``stop_agreed(code)``, which
  prints the line on ranks without a request of their own (``tests/e2e/workers_signals.py``). Then every
  rank saves and leaves with ``EXIT_PREEMPTED`` (75; resume with ``checkpoint.resume=auto``).

In both modes a second signal less than ``REPEAT_S`` (2 s) after the first is the same request (the
deepspeed launcher answers a Ctrl-C by sending SIGTERM to rank 0's process tree right after the
SIGINT every rank received from the terminal; it then waits up to 30 s for that rank to exit before
it does the same to the next rank, SIGKILLs what is left after 30 s, and exits 1 itself) and is
ignored; one at least 2 s after the first stops the rank at once with the exit line (``... SIGTERM
5 s after SIGINT, at step S (what); stopped by SIGTERM (exit 143)``). Without a watchdog (one rank,
``DS_EXT_WATCHDOG=0``, or a failed set-up: ``Watchdog.start`` returned None)
``install_signal_handlers(on_signal)`` gives the same behaviour from main-thread handlers, which then
run only between Python bytecodes (not inside a C++ collective), without the verdict wait.
``restore_signal_handlers()`` (and ``Watchdog.close``) put back the previous handlers.

Forked children (DataLoader workers under the default ``fork`` start method) are in the rank's
process group, so a Ctrl-C or Slurm's signals reach them too. A fork hook gives them do-nothing
handlers for the three signals (their rank decides; they end with it), drops the inherited wakeup fd
(their signals would otherwise be written into the rank's pipe and counted as the rank's) and closes
their copies of the watchdog's sockets (a dead rank's connection would otherwise stay open for as
long as its workers live). torch installs its own C-level SIGTERM handler in each worker, which
kills it: ``ignore_stop_signals`` (as or inside the DataLoader's ``worker_init_fn``) undoes that, so
that the launcher's tree-wide SIGTERM or ``scancel`` does not take the workers away from a rank
that is finishing its step to save (its next batch would raise "DataLoader worker ... is killed by
signal: Terminated").

Waiting lines (``Watchdog``): every rank other than 0 sends ``at <step> <what>`` (its ``progress``)
to rank 0 every ``REPORT_S`` seconds (``DS_EXT_WAIT_REPORT_S``) from its watchdog thread; rank 0
notes when each report arrived. When a rank's own ``progress`` record has not changed for ``WAIT_S``
seconds (``DS_EXT_WAIT_S``; 0 turns the lines and the reports off) its watchdog prints
``[ds_ext] rank R: waiting at step S (what) for N s``, on rank 0 followed by ``; rank K last
reported N s ago at step S' (what')`` for each rank whose last report is older than ``WAIT_S`` (a
SIGSTOPped rank stops reporting) or ``; every rank reported within the last N s``, and again every
``WAIT_S`` while it stays there. These lines only inform; they never stop anything.

Fault injection (tests only): ``DS_EXT_FAULT=<phase>:<rank>:<step>`` makes that rank send itself
SIGKILL (a real kill of the real process, after one line on stderr with the time) when it reaches
``point(phase, step)``; ``<phase>:<rank>:<step>:stop`` sends SIGSTOP instead (a rank that is alive
but stuck: its sockets stay open). Phases:

* ``data``: fetching the first micro-batch of optimizer step ``step``;
* ``collective``: after the backward of the last micro-batch of step ``step``, with the reducer's
  gradient collectives launched, before ``engine.step()`` waits for them;
* ``checkpoint.save`` for the checkpoint taken after step ``step``: ``ckpt_start`` (staging
  directory made), ``ckpt_deepspeed`` (DeepSpeed's files written), ``ckpt_rankfile`` (this rank's
  ds_ext file written), ``ckpt_meta`` (rank 0: ``meta.json`` written in staging), ``ckpt_replace``
  (rank 0, only when the tag exists already: the old copy moved aside, the new one not yet in
  place), ``ckpt_rename`` (rank 0: renamed into place, ``latest`` not yet replaced), ``ckpt_latest``
  (rank 0: ``latest`` replaced, nothing pruned), ``ckpt_prune`` (rank 0: an old checkpoint renamed
  away, not yet deleted), ``ckpt_end`` (after the final barrier).
"""
from __future__ import annotations

import math
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

EXIT_PEER_LOST = 4    # another rank died or stopped, or a collective failed
EXIT_CHECKPOINT = 5   # a checkpoint cannot be resumed from (mismatch, missing or damaged files)
EXIT_DIVERGED = 8     # training diverged (train.max_consecutive_skips skipped steps in a row)
EXIT_PREEMPTED = 75   # saved a checkpoint and stopped on a signal; resume with checkpoint.resume=auto
EXIT_SIGINT = 128 + signal.SIGINT     # 130
EXIT_SIGUSR1 = 128 + signal.SIGUSR1   # 138
EXIT_SIGTERM = 128 + signal.SIGTERM   # 143

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
ON_SIGNAL = ("exit", "save")
# a peer leaving with one of these is not a verdict: every rank leaves by itself at the same step
# codes every rank leaves with by itself at the same step: no countdown for the others. Not
# EXIT_DIVERGED: a skip on a Local SGD / DS-Sync local step is one rank's, so its streak is too.
LEAVING_TOGETHER = (0, EXIT_PREEMPTED)

GRACE_S = 10.0          # how long a peer's deliberate non-zero exit waits for this rank to leave by itself
VERDICT_WAIT_S = 5.0    # how long a failed collective in the main thread waits for the watchdog's verdict
SIGNAL_VERDICT_WAIT_S = 3.0  # how long a stop signal waits for a peer verdict before it is acted on
REPEAT_S = 2.0          # a second stop signal sooner than this after the first is the same request
REPORT_S = 15.0         # progress reports to rank 0 (DS_EXT_WAIT_REPORT_S)
WAIT_S = 60.0           # a rank whose progress is unchanged this long says so (DS_EXT_WAIT_S)
CONNECT_TIMEOUT_S = 60.0
STORE_KEY = "ds_ext/watchdog/address"

PHASES = ("data", "collective", "ckpt_start", "ckpt_deepspeed", "ckpt_rankfile", "ckpt_meta", "ckpt_replace",
          "ckpt_rename", "ckpt_latest", "ckpt_prune", "ckpt_end")
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def _say(line: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass
    data = line.rstrip("\n") + "\n"
    try:
        sys.stderr.write(data)
        sys.stderr.flush()
    except Exception:  # e.g. a signal handler interrupting a write to stderr: write around the buffer
        try:
            os.write(2, data.encode(errors="replace"))
        except OSError:
            pass


# ---- where this rank is (read by the messages) ------------------------------------------------

_progress: List = [0, "start-up", time.monotonic()]  # step, what, when it was recorded


def progress(step: int, what: str) -> None:
    """Record the optimizer step this rank is working on (or has just finished) and what it does."""
    _progress[0] = step
    _progress[1] = what
    _progress[2] = time.monotonic()


def where() -> str:
    """``step N (what)`` for the messages."""
    return f"step {_progress[0]} ({_progress[1]})"


# ---- fault injection (tests) ------------------------------------------------------------------

class FaultSpecError(ValueError):
    """A malformed ``DS_EXT_FAULT`` value."""


_fault: Optional[Tuple[str, int, int, str, str]] = None  # (phase, rank, step, action, raw) for this rank
_fault_rank = -1


def load_fault_plan(rank: int, env: Optional[Dict[str, str]] = None) -> None:
    """Read ``DS_EXT_FAULT`` for this rank; raise ``FaultSpecError`` naming the variable and value."""
    global _fault, _fault_rank
    raw = (env if env is not None else os.environ).get("DS_EXT_FAULT", "").strip()
    _fault, _fault_rank = None, rank
    if not raw:
        return
    parts = raw.split(":")
    if len(parts) == 3:
        parts.append("kill")
    if (len(parts) != 4 or parts[0] not in PHASES or not parts[1].isdigit() or not parts[2].isdigit()
            or parts[3] not in ACTIONS):
        raise FaultSpecError(f"DS_EXT_FAULT={raw!r}: expected <phase>:<rank>:<step>[:kill|stop] with phase one of "
                             f"{', '.join(PHASES)} and non-negative integers")
    if int(parts[1]) == rank:
        _fault = (parts[0], int(parts[1]), int(parts[2]), parts[3], raw)


def point(phase: str, step: int) -> None:
    """A fault-injection point: SIGKILL (or SIGSTOP) this process if ``DS_EXT_FAULT`` names this phase,
    rank and step. It fires once (``data`` is reached once per micro-batch: a stopped rank that is
    continued must not stop again at the next micro-batch of the same step)."""
    global _fault
    f = _fault
    if f is None or f[0] != phase or f[2] != step:
        return
    _fault = None
    sig = ACTIONS[f[3]]
    _say(f"[ds_ext] fault injection DS_EXT_FAULT={f[4]}: {signal.Signals(sig).name} rank {_fault_rank} "
         f"(pid {os.getpid()}) in {phase} at step {step} t={time.time():.3f}")
    os.kill(os.getpid(), sig)


# ---- stop signals ---------------------------------------------------------------------------------

def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal_of_code(code: int) -> Optional[str]:
    """``SIGINT`` for 130 and so on (the exit codes of ``STOP_SIGNALS``), else None."""
    return _signame(code - 128) if code - 128 in STOP_SIGNALS else None


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
    ``stop_agreed`` with it on every rank (the trainer votes through ``engine.StopVote`` instead): a
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


def _ignore_in_child(signum, frame) -> None:
    """A forked child's handler for ``STOP_SIGNALS``: nothing (its rank decides)."""


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
                signal.signal(sig, _ignore_in_child)
        except (ValueError, OSError):
            pass
        _saved_handlers.clear()
        _saved_wakeup_fd = None
    if wd is not None:
        wd._closing = True
        wd._close_fds()


os.register_at_fork(after_in_child=_after_fork_in_child)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For a DataLoader's ``worker_init_fn`` (pass it, or call it from yours): make SIGTERM, SIGINT and
    SIGUSR1 do nothing in the worker. torch installs a C-level SIGTERM handler in each worker (before
    ``worker_init_fn`` runs) that kills it; the deepspeed launcher's answer to a Ctrl-C (SIGTERM to
    each rank's whole process tree) and Slurm's ``scancel`` would then take the workers away from a
    rank that is finishing its step to save (``on_signal="save"``): its next batch raises "DataLoader
    worker ... is killed by signal: Terminated". The workers still end with their rank (torch's
    workers check their parent every 5 s). The cost: torch's last-resort ``terminate()`` of a worker
    that does not answer its shutdown request no longer works (it ends when the rank ends)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, _ignore_in_child)
        except (ValueError, OSError):
            pass


def _default_rank() -> int:
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        _say(f"[ds_ext] {name}={raw!r} is not a number of seconds; using {default:g}")
        return default
    return value if math.isfinite(value) else default


# ---- the watchdog -----------------------------------------------------------------------------

def _default_store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it there is no watchdog, nothing else changes
        return None


def _oneline(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Return(Exception):
    """Ends the watchdog thread's loop (the trainer is closing the watchdog)."""


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.rank: Optional[int] = None
        self.pid = "?"
        self.host = "?"
        self.left = False
        self.reported_at = time.monotonic()  # rank 0: when this rank last reported (or said hello)
        self.reported = "(its watchdog hello)"  # rank 0: where it said it was


class Watchdog:
    """One per rank; see the module docstring. ``start`` returns None when turned off or impossible."""

    def __init__(self, rank: int, world: int, on_signal: str = "exit"):
        if on_signal not in ON_SIGNAL:
            raise ValueError(f"on_signal={on_signal!r}: expected one of {', '.join(ON_SIGNAL)}")
        self.rank, self.world, self.on_signal = rank, world, on_signal
        self.verdict: Optional[str] = None      # what happened to a peer, once something did
        self._lost = False                      # the verdict is a lost peer (not one that left on purpose)
        self._verdict_event = threading.Event()
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._never = threading.Event()
        self._closing = False
        self._stopping = False
        self._grace_deadline: Optional[float] = None
        self._signal_pending: Optional[Tuple[int, float]] = None  # (signum, deadline of the verdict wait)
        wait_s = _env_seconds("DS_EXT_WAIT_S", WAIT_S)
        self.wait_s: Optional[float] = wait_s if wait_s > 0 else None  # None: no waiting lines, no reports
        report_s = _env_seconds("DS_EXT_WAIT_REPORT_S", REPORT_S)
        self.report_s = report_s if report_s > 0 else REPORT_S
        self._next_report: Optional[float] = None
        self._wait_base: Optional[float] = None   # the progress time the waiting lines count from
        self._next_wait: Optional[float] = None
        self._sel = selectors.DefaultSelector()
        self._listen: Optional[socket.socket] = None
        self._server: Optional[_Conn] = None      # a client's connection to rank 0
        self._clients: Dict[socket.socket, _Conn] = {}  # rank 0's connections
        self._ctl_r, self._ctl_w = os.pipe()      # wakes the thread (close, signals)
        os.set_blocking(self._ctl_r, False)
        os.set_blocking(self._ctl_w, False)
        self._sel.register(self._ctl_r, selectors.EVENT_READ, "ctl")
        self._thread: Optional[threading.Thread] = None

    # -- set-up ----------------------------------------------------------------------------
    @classmethod
    def start(cls, rank: int, world: int, on_signal: str = "exit") -> Optional["Watchdog"]:
        """Collective (every rank calls it after the process group exists). Rank 0 always publishes
        something under ``STORE_KEY`` (its address, or ``none`` when it runs without a watchdog), so
        the others never wait for an address that will not come. ``on_signal`` (``"exit"`` or
        ``"save"``): what SIGTERM / SIGINT / SIGUSR1 do (module docstring). On None (one rank,
        ``DS_EXT_WATCHDOG=0``, set-up failed) call ``install_signal_handlers(on_signal)``."""
        _signals.reset(on_signal, rank)
        if world < 2:
            return None
        off = os.environ.get("DS_EXT_WATCHDOG", "1").strip().lower() in ("0", "off", "false", "no")
        store = _default_store()
        if store is None:
            _say(f"[ds_ext] rank {rank}: no c10d store to publish the watchdog address; running without the "
                 f"watchdog (a lost rank is then reported without its number)")
            return None
        wd = cls(rank, world, on_signal)
        try:
            if rank == 0:
                if off:
                    store.set(STORE_KEY, "none")
                    wd._close_fds()
                    return None
                try:
                    wd._listen_and_publish(store)
                except (OSError, RuntimeError):
                    store.set(STORE_KEY, "none")
                    raise
            else:
                address = store.get(STORE_KEY).decode()
                if off or address == "none":
                    wd._close_fds()
                    return None
                wd._connect(address)
        except (OSError, RuntimeError) as e:
            _say(f"[ds_ext] rank {rank}: watchdog set-up failed ({_oneline(e)}); running without it "
                 f"(set DS_EXT_WATCHDOG=0 on every rank to silence this)")
            wd._close_fds()
            return None
        wd._thread = threading.Thread(target=wd._loop, name="ds_ext-watchdog", daemon=True)
        wd._thread.start()
        # after the thread runs, so that the main-thread handler can always leave the signal to it
        _install(wd._on_signal_main, wd._ctl_w)
        _set_active(wd)
        return wd

    def _listen_and_publish(self, store) -> None:
        if socket.has_dualstack_ipv6():
            srv = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024)
        else:
            srv = socket.create_server(("", 0), backlog=1024)
        srv.setblocking(False)
        self._listen = srv
        self._sel.register(srv, selectors.EVENT_READ, "accept")
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        store.set(STORE_KEY, f"{host} {srv.getsockname()[1]}")

    def _connect(self, address: str) -> None:
        host, port = address.rsplit(" ", 1)
        sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        sock.sendall(f"hello {self.rank} {os.getpid()} {socket.gethostname()}\n".encode())
        # wait for the welcome, so rank 0 knows this rank before training starts
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("rank 0 closed the watchdog connection during set-up")
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        words = line.decode(errors="replace").split(" ")
        if words[0] != "welcome" or len(words) != 3:
            raise OSError(f"unexpected watchdog reply {line[:80]!r}")
        sock.setblocking(False)
        self._server = _Conn(sock)
        self._server.rank, self._server.buf, self._server.pid, self._server.host = 0, rest, words[1], words[2]
        self._sel.register(sock, selectors.EVENT_READ, "server")

    # -- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._server is not None and self.wait_s is not None:
            self._next_report = time.monotonic()  # report at once, then every report_s
        while True:
            try:
                events = self._sel.select(self._timeout(time.monotonic()))
            except (OSError, ValueError):
                return  # closed under us
            for key, _ in events:
                try:
                    self._event(key.data, key.fileobj)
                except _Return:
                    return
                except Exception as e:  # never let a bug here kill the thread silently
                    _say(f"[ds_ext] rank {self.rank}: watchdog: unexpected {type(e).__name__}: {_oneline(e)}")
            if self._closing:
                return
            try:
                self._timers(time.monotonic())
            except Exception as e:  # turn the periodic lines off rather than fail again at every wake-up
                self.wait_s, self._next_report = None, None
                _say(f"[ds_ext] rank {self.rank}: watchdog: unexpected {type(e).__name__}: {_oneline(e)}; "
                     f"no more waiting lines")

    def _timeout(self, now: float) -> float:
        """Seconds until the next timed duty (grace, signal verdict wait, report, waiting line)."""
        due = [t for t in (self._grace_deadline, self._signal_pending and self._signal_pending[1],
                           self._next_report) if t is not None]
        if self.wait_s is not None:
            base = _progress[2]
            due.append(self._next_wait if base == self._wait_base and self._next_wait is not None
                       else base + self.wait_s)
        return max(0.0, min(due) - now) if due else 3600.0

    def _timers(self, now: float) -> None:
        if self._grace_deadline is not None and now >= self._grace_deadline:
            self._stop(EXIT_PEER_LOST, self.message(EXIT_PEER_LOST))
        if self._signal_pending is not None and now >= self._signal_pending[1]:
            signum = self._signal_pending[0]
            self._signal_pending = None
            if self.on_signal == "exit":
                self._stop(128 + signum, _signals.exit_line(signum))
            else:
                _signals.record(signum)
        if self._next_report is not None and now >= self._next_report:
            self._next_report = now + self.report_s
            self._send(self._server, f"at {_progress[0]} {_oneline(_progress[1], 120)}")
        if self.wait_s is not None:
            base = _progress[2]
            if base != self._wait_base or self._next_wait is None:
                self._wait_base, self._next_wait = base, base + self.wait_s
            if now >= self._next_wait:
                self._next_wait += self.wait_s
                if self._next_wait <= now:
                    self._next_wait = now + self.wait_s
                _say(self._waiting_line(now - base, now))

    def _waiting_line(self, stuck: float, now: float) -> str:
        line = f"[ds_ext] rank {self.rank}: waiting at {where()} for {stuck:.0f} s"
        if self._listen is None:
            return line
        peers = sorted((c for c in self._clients.values() if c.rank is not None and not c.left),
                       key=lambda c: c.rank)
        if not peers:
            return line
        late = [f"rank {c.rank} last reported {now - c.reported_at:.0f} s ago at {c.reported}"
                for c in peers if now - c.reported_at > self.wait_s]
        if late:
            return line + "; " + "; ".join(late)
        oldest = max(now - c.reported_at for c in peers)
        return line + f"; every rank reported within the last {max(1, math.ceil(oldest))} s"

    def _event(self, tag: str, fileobj) -> None:
        if tag == "ctl":
            try:
                data = os.read(self._ctl_r, 512)
            except (BlockingIOError, OSError):
                data = b""
            if self._closing:
                raise _Return()
            for signum in data:  # the wakeup fd writes each signal's number; close writes b"x"
                if signum in STOP_SIGNALS:
                    self._on_signal(signum)
        elif tag == "accept":
            self._accept()
        elif tag == "server":
            self._read(self._server, from_server=True)
        else:
            self._read(self._clients.get(fileobj), from_server=False)

    def _accept(self) -> None:
        try:
            sock, _ = self._listen.accept()
        except (BlockingIOError, OSError):
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self._clients[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ, "client")

    def _read(self, conn: Optional[_Conn], from_server: bool) -> None:
        if conn is None:
            return
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            conn.buf += chunk
            while b"\n" in conn.buf:
                line, conn.buf = conn.buf.split(b"\n", 1)
                self._message(conn, line.decode(errors="replace"), from_server)
            return
        # end of file: the peer process is gone (or left after saying so)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if not from_server:
            self._clients.pop(conn.sock, None)
        if self._closing or conn.left:
            return
        if from_server:
            self._peer_lost(0, conn.pid, conn.host)
        elif conn.rank is not None:
            self._peer_lost(conn.rank, conn.pid, conn.host)
        # a connection that never said hello (died during set-up) is reported by the collectives

    def _message(self, conn: _Conn, line: str, from_server: bool) -> None:
        kind, _, rest = line.partition(" ")
        try:
            if kind == "at" and not from_server:  # a progress report
                step, _, what = rest.partition(" ")
                conn.reported_at, conn.reported = time.monotonic(), f"step {step} ({what})"
            elif kind == "hello" and not from_server:
                r, conn.pid, conn.host = rest.split(" ", 2)
                conn.rank = int(r)
                conn.reported_at = time.monotonic()
                self._send(conn, f"welcome {os.getpid()} {socket.gethostname()}")
            elif kind == "left":
                r, code, reason = (rest.split(" ", 2) + [""])[:3]
                r, code = int(r), int(code)
                if not from_server:  # a client says goodbye: tell everybody else
                    conn.left = True
                    self._relay(f"left {r} {code} {reason}", skip=conn)
                elif r == 0:  # rank 0 itself is leaving: its end-of-file is expected
                    conn.left = True
                self._peer_left(r, code, reason)
            elif kind == "lost" and from_server:  # relayed by rank 0
                r, pid, host = rest.split(" ", 2)
                self._peer_lost(int(r), pid, host)
        except ValueError:
            pass  # not ours: ignore

    def _send(self, conn: _Conn, line: str) -> None:
        """Send one line on a non-blocking socket (at most 5 s; a peer that does not read is dropped)."""
        data = (line + "\n").encode()
        deadline = time.monotonic() + 5.0
        with self._send_lock:
            while data:
                try:
                    data = data[conn.sock.send(data):]
                except BlockingIOError:
                    pass
                except OSError:
                    return
                if data:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    try:
                        select.select([], [conn.sock], [], min(left, 0.5))
                    except (OSError, ValueError):
                        return

    def _relay(self, line: str, skip: Optional[_Conn] = None) -> None:
        for conn in list(self._clients.values()):
            if conn is not skip and conn.rank is not None:
                self._send(conn, line)

    # -- verdicts ----------------------------------------------------------------------------
    def _peer_lost(self, r: int, pid: str, host: str) -> None:
        extra = " (it hosted the rendezvous store and the watchdog)" if r == 0 else ""
        core = (f"lost rank {r} (pid {pid} on {host}){extra} at {where()} on this rank: its process ended "
                f"without a word (killed, crashed or out of memory)")
        if self._listen is not None:
            self._relay(f"lost {r} {pid} {host}")
        if self._set_verdict(core):
            self._lost = True
        self._stop(EXIT_PEER_LOST, self.message(EXIT_PEER_LOST))

    def _peer_left(self, r: int, code: int, reason: str) -> None:
        if code in LEAVING_TOGETHER or r == self.rank:
            return
        core = f"rank {r} stopped with exit code {code} ({reason or 'no reason given'}) at {where()} on this rank"
        if not self._set_verdict(core):
            return
        if self._signal_pending is not None:  # the signal that is waiting for a verdict has one: act on it now
            code = 128 + self._signal_pending[0]
            self._stop(code, self.message(code))
        elif self._grace_deadline is None:
            self._grace_deadline = time.monotonic() + GRACE_S

    def _set_verdict(self, core: str) -> bool:
        with self._lock:
            if self.verdict is not None:
                return False
            self.verdict = core
        self._verdict_event.set()
        return True

    def message(self, code: int, core: Optional[str] = None) -> str:
        core = core or self.verdict or f"at {where()}"
        name = _signal_of_code(code)
        how = f"stopped by {name}" if name else "stopping this rank"
        return f"[ds_ext] rank {self.rank}: {core}; {how} (exit {code})"

    def _stop(self, code: int, msg: str, reason: Optional[str] = None) -> None:
        """Print ``msg`` and end the process now (any thread). If another thread is already doing
        so, wait for it (so the main thread never goes on to print a traceback)."""
        with self._lock:
            if self._closing:
                return
            if self._stopping:
                other = True
            else:
                other, self._stopping = False, True
        if other:
            self._never.wait()
        _say(msg)
        if reason is None:
            name = _signal_of_code(code)
            before = (self.verdict or "").split(" at step ")[0]  # e.g. "lost rank 1 (pid ... on host)"
            if name:
                reason = f"stopped by {name}" + (f" after: {before}" if before else "")
            else:
                reason = before or f"stopped (exit {code})"
        self._goodbye(code, reason)
        os._exit(code)

    def _goodbye(self, code: int, reason: str) -> None:
        line = f"left {self.rank} {code} {_oneline(reason, 200)}"
        if self._server is not None:
            self._send(self._server, line)
        elif self._listen is not None:
            self._relay(line)

    # -- stop signals -------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        """The watchdog thread's answer to SIGTERM / SIGINT / SIGUSR1 (read from the wakeup fd)."""
        now = time.monotonic()
        kind = _signals.arrive(signum, now)
        if kind == "same":
            return
        code = 128 + signum
        if kind == "repeat":
            self._stop(code, _signals.repeat_line(signum, now))
        elif self.verdict is not None:  # a peer already stopped: that is what this signal is about
            self._stop(code, self.message(code))
        elif self.on_signal == "save" and signum != signal.SIGTERM:
            _signals.record(signum)  # SIGUSR1 / SIGINT never come from the launcher after a death
        else:  # wait for a verdict (the launcher's SIGTERM follows a peer's death by up to a second)
            self._signal_pending = (signum, now + SIGNAL_VERDICT_WAIT_S)

    def _on_signal_main(self, signum, frame) -> None:
        """The Python-level handler (main thread, between bytecodes): the same delivery also wrote
        ``signum`` to the wakeup fd, so the watchdog thread acts on it; never raise here. Without a
        running thread (closing), act here."""
        t = self._thread
        if t is not None and t.is_alive() and not self._closing:
            if self.on_signal == "save" and signum != signal.SIGTERM and _signals.first is None:
                # record before the main thread runs on: the step it is in votes with this request
                # (the thread would record it too, but perhaps only after that step's vote)
                _signals.arrive(signum, time.monotonic())
                _signals.record(signum)
            return
        _handle_in_main(signum)

    def signal_code(self) -> Optional[int]:
        """``128 + signum`` while a stop signal is waiting for a peer verdict and no peer was lost."""
        pending = self._signal_pending
        return 128 + pending[0] if pending is not None and not self._lost else None

    # -- main-thread API ---------------------------------------------------------------------
    def wait_verdict(self, timeout: float) -> Optional[str]:
        self._verdict_event.wait(timeout)
        return self.verdict

    def close(self, code: int, reason: str = "") -> None:
        """Leave on purpose: tell the peers (``code`` 0: finished; ``EXIT_PREEMPTED``: every rank is
        leaving at this step), stop the thread, restore the signal handlers."""
        with self._lock:
            if self._closing or self._stopping:
                return
            self._closing = True
        self._goodbye(code, reason or ("finished" if code == 0 else f"exit {code}"))
        try:
            os.write(self._ctl_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if threading.current_thread() is threading.main_thread():
            restore_signal_handlers()
        if _active is self:
            _set_active(None)
        self._close_fds()

    def _close_fds(self) -> None:
        for conn in list(self._clients.values()) + ([self._server] if self._server else []):
            try:
                conn.sock.close()
            except OSError:
                pass
        if self._listen is not None:
            self._listen.close()
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._ctl_r, self._ctl_w):
            try:
                os.close(fd)
            except OSError:
                pass


# ---- failures seen by the main thread -----------------------------------------------------------

_DIST_MARKERS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "broken pipe",
                 "timed out waiting", "processgroup", "c10d", "distbackenderror", "distnetworkerror")


def looks_distributed(exc: BaseException) -> bool:
    """Whether an exception comes from a failed collective: torch's ``DistError`` family, or a
    RuntimeError/OSError whose text carries gloo's / NCCL's / c10d's wording (gloo raises plain
    ``RuntimeError``: ``Connection closed by peer``, ``Timed out waiting ...ms``)."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except Exception:
        pass
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (RuntimeError, OSError, ConnectionError)) and any(m in text for m in _DIST_MARKERS)


def explain_failure(exc: BaseException, wd: Optional[Watchdog], rank: int) -> None:
    """Called by the trainer for an exception on the main thread. If it is a distributed failure,
    print one line (the lost rank when the watchdog knows it) and end the process with
    ``EXIT_PEER_LOST`` (or ``128 + signum`` when a stop signal was waiting for exactly this: peers
    that left on a signal, e.g. after a Ctrl-C to every rank); otherwise return and let the caller
    handle or re-raise it."""
    if not looks_distributed(exc):
        return
    if wd is not None:
        if wd.wait_verdict(VERDICT_WAIT_S):
            code = wd.signal_code() or EXIT_PEER_LOST
            wd._stop(code, wd.message(code))
            return  # closing normally: the caller re-raises
        core = (f"a collective failed at {where()}: {_oneline(exc, 240)}; every rank is still connected to the "
                f"watchdog, so none has died: one may be stuck (train.collective_timeout_s) or the network failed")
        wd._stop(EXIT_PEER_LOST, wd.message(EXIT_PEER_LOST, core),
                 reason=f"a collective failed ({_oneline(exc, 120)})")
        return
    _say(f"[ds_ext] rank {rank}: a collective failed at {where()}: {_oneline(exc, 240)}; another rank probably "
         f"died (the watchdog is off, DS_EXT_WATCHDOG=0, so its number is unknown); stopping this rank "
         f"(exit {EXIT_PEER_LOST})")
    os._exit(EXIT_PEER_LOST)
