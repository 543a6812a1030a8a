"""The stop signals (SIGTERM, SIGINT, SIGUSR1) and a DataLoader worker's answer to them.

Standard library only, so that a data reader (``ds_ext.data.base.make_loader``) and the trainer's signal
handling (``ds_ext.trainer.faults``) share it without the data layer importing the application layer.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_in_child(signum, frame) -> None:
    """A forked child's handler for ``STOP_SIGNALS``: nothing (its rank decides)."""


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
            signal.signal(sig, ignore_in_child)
        except (ValueError, OSError):
            pass
