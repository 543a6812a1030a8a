"""One job per directory: the trainer's rank 0 holds an exclusive ``flock`` on ``<dir>/.ds_ext.lock``
(and on the run directory's) for the whole run; the kernel releases it when the process dies, however it
dies. A second job is refused before training starts (``EXIT_BUSY``, 6), naming the holder. On a shared
file system the lock needs working ``flock`` (NFSv4, Lustre with ``-o flock``, GPFS); where ``flock`` is
not supported the lock is skipped with a logged warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

from ..exit_codes import ExitCode

log = logging.getLogger(__name__)

LOCK = ".ds_ext.lock"
EXIT_BUSY = ExitCode.BUSY  # another job holds the run or checkpoint directory


class DirectoryBusy(RuntimeError):
    """Another job holds the run or checkpoint directory."""


class DirLock:
    """An exclusive ``flock`` on ``<dir>/.ds_ext.lock`` for the life of this object (see the module
    docstring). ``acquire`` raises ``DirectoryBusy`` naming the holder."""

    def __init__(self, directory: Path, fd: Optional[int]):
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory, job: dict) -> "DirLock":
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / LOCK
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise DirectoryBusy(f"{d} is in use by another job ({holder}; lock file {path}); wait for it to "
                                    f"end or give this run another log.dir / checkpoint.dir") from None
            os.close(fd)  # e.g. ENOLCK / EOPNOTSUPP: a file system without flock
            log.warning("cannot lock %s (%s): running without the one-job-per-directory lock", path,
                        os.strerror(e.errno or 0))
            return cls(d, None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(job, sort_keys=True) + "\n").encode(), 0)
        return cls(d, fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        h = json.loads(raw)
        return f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown: the lock file is empty or unreadable"


def job_identity() -> dict:
    """Who holds a lock: this process, its host and its start time (rank 0's, shared with every rank)."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": f"{socket.gethostname()}.{os.getpid()}"}


def lock_dirs(dirs, job: dict) -> List[DirLock]:
    """Rank 0: lock each directory (the run and the checkpoint directory), or raise ``DirectoryBusy``."""
    held: List[DirLock] = []
    try:
        seen = set()
        for d in dirs:
            key = os.path.realpath(str(d))
            if key in seen:
                continue
            seen.add(key)
            held.append(DirLock.acquire(d, job))
    except BaseException:
        for h in held:
            h.release()
        raise
    return held
