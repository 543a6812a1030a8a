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

The parts: ``watchdog.py`` (the peer watchdog, the waiting lines, ``explain_failure`` for a failed
collective on the main thread), ``signals.py`` (SIGTERM / SIGINT / SIGUSR1: ``on_signal`` exit or save, the
stop request and its agreement, forked children), ``failpoints.py`` (the test-only ``DS_EXT_FAULT`` hook,
``point``), ``common.py`` (constants, ``progress`` / ``where``, the one way they print). Each module's
docstring tells its part. ``ignore_stop_signals`` (for a DataLoader's ``worker_init_fn``) lives in
``ds_ext/stop_signals.py``, below the data readers that use it.
"""
from ...stop_signals import ignore_stop_signals
from .common import (
    EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGUSR1,
    GRACE_S, LEAVING_TOGETHER, ON_SIGNAL, REPEAT_S, REPORT_S, SIGNAL_VERDICT_WAIT_S, STOP_SIGNALS,
    VERDICT_WAIT_S, WAIT_S, progress, where)
from .failpoints import ACTIONS, PHASES, FaultSpecError, load_fault_plan, point
from .signals import (
    _Signals, _signals, install_signal_handlers, restore_signal_handlers, stop_agreed, stop_code, stop_requested)
from .watchdog import Watchdog, explain_failure, looks_distributed

__all__ = ["ACTIONS", "EXIT_CHECKPOINT", "EXIT_DIVERGED", "EXIT_PEER_LOST", "EXIT_PREEMPTED", "EXIT_SIGINT",
           "EXIT_SIGTERM", "EXIT_SIGUSR1", "GRACE_S", "LEAVING_TOGETHER", "ON_SIGNAL", "PHASES", "REPEAT_S",
           "REPORT_S", "SIGNAL_VERDICT_WAIT_S", "STOP_SIGNALS", "VERDICT_WAIT_S", "WAIT_S", "FaultSpecError",
           "Watchdog", "_Signals", "_signals", "explain_failure", "ignore_stop_signals", "install_signal_handlers",
           "load_fault_plan", "looks_distributed", "point", "progress", "restore_signal_handlers", "stop_agreed",
           "stop_code", "stop_requested", "where"]
