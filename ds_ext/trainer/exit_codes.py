"""Every exit code of the trainer (``python -m ds_ext.train``, ``ds-ext train``), with its reason, in one place.

Every rank leaves with the same code, except ``PEER_LOST`` and the signal codes (a rank's own verdict).
``reason`` is the short text a rank gives its peers when it leaves on purpose (``faults.Watchdog.close``);
``meaning`` is the line of the exit-code table (``ExitCode.table()``, shown by ``ds-ext train --help``).
Standard library only: the watchdog and the signal handlers use it without torch.
"""
from __future__ import annotations

import signal
from enum import IntEnum
from typing import List


_AT_ONCE = "stopped at once by {} (on_signal: exit, a repeated signal, or reducer none)"


class ExitCode(IntEnum):
    """An exit code with ``reason`` (told to the peers) and ``meaning`` (the table line)."""

    def __new__(cls, value: int, reason: str, meaning: str):
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.reason = reason
        obj.meaning = meaning
        return obj

    OK = 0, "finished", "done"
    FAILED = 1, "exception", "an exception (its traceback is printed)"
    RECIPE = 2, "recipe error", ("recipe error (also a bad DS_EXT_OPS, a YAML alias bomb, train.seed outside "
                                 "0..2**31-1, train.collective_timeout_s outside 1 s..7 days, optimizer.lr over 1e6, "
                                 "a deepspeed_config that is not UTF-8 JSON, a model too large for the host's "
                                 "memory, a malformed DS_EXT_FAULT, a log.dir holding another run's records while this run starts "
                                 "afresh: another log.dir, checkpoint.resume=auto or log.overwrite=true)")
    DATA = 3, "data error", ("data error (also a label outside the model's classes, non-finite inputs in the "
                             "validation set)")
    PEER_LOST = 4, "peer lost", "another rank was lost or stopped, or a collective failed"
    CHECKPOINT = 5, "checkpoint error", ("checkpoint cannot be resumed from (mismatch, missing, damaged: the file is "
                                         "named)")
    BUSY = 6, "directory in use by another job", ("the run or checkpoint directory is in use by another job (the "
                                                   "holder is named)")
    SAVE = 7, "checkpoint save failed", ("a checkpoint save failed (the previous checkpoint is intact), or "
                                         "summary.json could not be written at the end")
    DIVERGED = 8, "training diverged", ("training diverged (train.max_consecutive_skips skipped steps in a "
                                        "row, or a non-finite validation loss)")
    PREEMPTED = 75, "saved and stopped on a signal", ("saved a checkpoint and stopped on a signal "
                                                      "(checkpoint.on_signal: save); resume with "
                                                      "checkpoint.resume=auto")
    SIGINT = 128 + signal.SIGINT, "stopped by SIGINT", _AT_ONCE.format("SIGINT")
    SIGUSR1 = 128 + signal.SIGUSR1, "stopped by SIGUSR1", _AT_ONCE.format("SIGUSR1")
    SIGTERM = 128 + signal.SIGTERM, "stopped by SIGTERM", _AT_ONCE.format("SIGTERM")

    @classmethod
    def reason_of(cls, code: int, otherwise: str) -> str:
        """What a rank leaving with ``code`` tells its peers: the code's ``reason``, or ``otherwise`` for an
        exception (``FAILED``: the caller knows which), a rank's own verdict or a code not listed here."""
        own = (cls.FAILED, cls.PEER_LOST, cls.SIGINT, cls.SIGUSR1, cls.SIGTERM)
        if code in own or code not in cls._value2member_map_:
            return otherwise
        return cls(code).reason

    @classmethod
    def table(cls) -> List[str]:
        """``code  meaning`` lines, for a help text."""
        return [f"{int(c):>3}  {c.meaning}" for c in cls]
