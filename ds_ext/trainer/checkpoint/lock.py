"""One job per directory: the trainer's rank 0 locks the run directory and the checkpoint directory for the
whole run; a second job is refused before training starts (``EXIT_BUSY``, 6), naming the holder.

Two locks per directory, both ``fcntl.flock`` (the kernel releases them when the process dies, however it dies):

* **the directory itself**: an exclusive ``flock`` on a descriptor of the directory
  (``os.open(dir, O_RDONLY | O_DIRECTORY)``). The lock lives on the directory's inode, so no file can be
  deleted to sidestep it (issue 28, M2: the lock file below stays after every run and looks stale). Works on
  local file systems (ext4, xfs, btrfs, tmpfs, overlayfs; ``tests/e2e/test_reliability.py`` checks it across
  processes). The Linux NFS client emulates ``flock`` with a POSIX write lock, which needs a descriptor open
  for writing, and a directory cannot be: there the kernel refuses it (``EBADF``), and the file lock is the
  only lock (logged once as a warning).
* **the lock file** ``<dir>/.ds_ext.lock``: carries the holder (pid, host, start) for the refusal line, and is
  the lock where the directory cannot be locked. Its identity (device, inode) is checked at each save
  (``DirLock.verify``): a deleted or replaced file is re-created and locked again, with a warning. Where the
  directory lock is held nothing could have started meanwhile; without it a job started while the file was
  missing is named in an error line.

A refused job names the holder from the lock file, or, when that was deleted, from ``/proc/locks`` (the pid
holding the directory's lock on this host). A shared file system needs working ``flock`` (NFSv4, Lustre with
``-o flock``, GPFS); where neither lock is supported the run goes on without one, with a logged warning.
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
from typing import List, Optional, Tuple

from ..exit_codes import ExitCode

log = logging.getLogger(__name__)

LOCK = ".ds_ext.lock"
EXIT_BUSY = ExitCode.BUSY  # another job holds the run or checkpoint directory
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class DirectoryBusy(RuntimeError):
    """Another job holds the run or checkpoint directory."""


def _flock(fd: int) -> Optional[int]:
    """Try an exclusive ``flock`` on ``fd`` without waiting: None when taken, else the errno."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        return e.errno or errno.ENOLCK


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


class DirLock:
    """The locks on one directory (see the module docstring) for the life of this object. ``acquire``
    raises ``DirectoryBusy`` naming the holder; ``verify`` (at each save) puts back a deleted lock file."""

    def __init__(self, directory: Path, fd: Optional[int], dir_fd: Optional[int] = None, job: Optional[dict] = None):
        self.directory, self._fd, self._dir_fd, self.job = directory, fd, dir_fd, job or {}

    @property
    def path(self) -> Path:
        return self.directory / LOCK

    @classmethod
    def acquire(cls, directory, job: dict) -> "DirLock":
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dir_fd = _lock_directory(d)  # first: a refusal here creates no lock file
        try:
            fd = cls._lock_file(d, dir_fd)
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            raise
        held = cls(d, fd, dir_fd, job)
        if fd is not None:
            held._write_holder()
        return held

    @staticmethod
    def _lock_file(d: Path, dir_fd: Optional[int]) -> Optional[int]:
        path = d / LOCK
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
        err = _flock(fd)
        if err is None:
            return fd
        if err in _BUSY:  # a job of an older ds_ext (file lock only), or a file system without directory locks
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryBusy(_busy(d, holder))
        os.close(fd)  # e.g. ENOLCK / EOPNOTSUPP: a file system without flock
        if dir_fd is None:
            log.warning("cannot lock %s (%s): running without the one-job-per-directory lock", path,
                        os.strerror(err))
        return None

    def _write_holder(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(self.job, sort_keys=True) + "\n").encode(), 0)

    def verify(self) -> None:
        """At each save: the lock file is still the one this job locked (same device and inode). A deleted or
        replaced one is re-created and locked again with a warning; an error line names another job that took
        it meanwhile (possible only where the directory itself cannot be locked)."""
        if self._fd is None:
            return
        try:
            same = _identity(os.stat(self.path)) == _identity(os.fstat(self._fd))
        except FileNotFoundError:
            same = False
        except OSError as e:  # the directory went away or cannot be read: the save will say so
            log.warning("cannot check the lock file %s: %s", self.path, e)
            return
        if same:
            return
        guard = ("the directory lock was held throughout, so no other job started here" if self._dir_fd is not None
                 else "this file system cannot lock the directory itself, so another job may have started here "
                      "meanwhile")
        try:
            fd = self._lock_file(self.directory, self._dir_fd)
        except DirectoryBusy as e:
            log.error("the lock file %s was deleted while this job ran, and another job has locked %s since: %s; "
                      "two jobs are writing to %s", self.path, self.directory, e, self.directory)
            return
        except OSError as e:
            log.warning("the lock file %s was deleted while this job ran and cannot be re-created: %s", self.path, e)
            return
        os.close(self._fd)
        self._fd = fd
        if fd is not None:
            self._write_holder()
        log.warning("the lock file %s was deleted (or replaced) while this job ran; re-created it (%s). It is "
                    "released when the job ends: do not delete it", self.path, guard)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _lock_directory(d: Path) -> Optional[int]:
    """An exclusive ``flock`` on the directory ``d`` itself: its descriptor, or None where the file system
    cannot lock a directory (NFS: ``EBADF``; logged). Raises ``DirectoryBusy`` when another job holds it."""
    try:
        dir_fd = os.open(str(d), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        log.warning("cannot open the directory %s to lock it (%s): the lock file %s alone keeps a second job out",
                    d, e, d / LOCK)
        return None
    err = _flock(dir_fd)
    if err is None:
        return dir_fd
    st = os.fstat(dir_fd)
    os.close(dir_fd)
    if err in _BUSY:
        raise DirectoryBusy(_busy(d, _holder_of_directory(d, st)))
    log.warning("this file system cannot lock the directory %s itself (%s; NFS cannot): the lock file %s alone "
                "keeps a second job out, so do not delete it while a job runs", d, os.strerror(err), d / LOCK)
    return None


def _busy(d: Path, holder: str) -> str:
    return (f"{d} is in use by another job ({holder}; lock file {d / LOCK}); wait for it to end or give this run "
            f"another log.dir / checkpoint.dir")


def _holder_of_directory(d: Path, st: os.stat_result) -> str:
    """The holder of directory ``d``'s lock: from its lock file, else (the file was deleted) the pid that
    ``/proc/locks`` names for the directory's inode on this host."""
    try:
        fd = os.open(str(d / LOCK), os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            holder = _read_holder(fd)
        finally:
            os.close(fd)
        if not holder.startswith("holder unknown"):
            return holder
    pid = _flock_pid(st)
    if pid is None:
        return "holder unknown: its lock file was deleted"
    return f"pid {pid} on {socket.gethostname()}, {_cmdline(pid)}; its lock file was deleted"


def _flock_pid(st: os.stat_result) -> Optional[int]:
    """The pid holding a ``flock`` on the file with ``st``'s device and inode, read from ``/proc/locks``
    (lines ``1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF``, major and minor in hex)."""
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or "->" in f:
            continue
        try:
            major, minor, ino = f[5].split(":")
            if (int(major, 16), int(minor, 16), int(ino)) == want:
                return int(f[4])
        except ValueError:
            continue
    return None


def _cmdline(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "command unknown"
    return text[:100] + ("..." if len(text) > 100 else "")


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


def verify_all(locks: List[DirLock]) -> None:
    """``DirLock.verify`` on each held lock (rank 0, at each save)."""
    for lk in locks:
        lk.verify()
