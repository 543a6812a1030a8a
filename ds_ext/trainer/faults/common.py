"""What the parts of ``ds_ext.trainer.faults`` share: the constants, where this rank is (``progress``,
``where``) and the one way they print (``_say``)."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import List, Optional

from ...stop_signals import STOP_SIGNALS
from ..exit_codes import ExitCode

# the codes these modules leave with (their reasons: ds_ext/trainer/exit_codes.py, the one table)
EXIT_PEER_LOST = ExitCode.PEER_LOST    # 4: another rank died or stopped, or a collective failed
EXIT_CHECKPOINT = ExitCode.CHECKPOINT  # 5: a checkpoint cannot be resumed from
EXIT_DIVERGED = ExitCode.DIVERGED      # 8: training diverged
EXIT_PREEMPTED = ExitCode.PREEMPTED    # 75: saved a checkpoint and stopped on a signal
EXIT_SIGINT = ExitCode.SIGINT          # 130
EXIT_SIGUSR1 = ExitCode.SIGUSR1        # 138
EXIT_SIGTERM = ExitCode.SIGTERM        # 143

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


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal_of_code(code: int) -> Optional[str]:
    """``SIGINT`` for 130 and so on (the exit codes of ``STOP_SIGNALS``), else None."""
    return _signame(code - 128) if code - 128 in STOP_SIGNALS else None



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



def _oneline(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

