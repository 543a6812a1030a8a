"""JIT build locks: a start-up that waits on one says so, and ds_ext's own op never stays locked.

torch's ``cpp_extension.load`` serialises builds of one extension with a lock file,
``$TORCH_EXTENSIONS_DIR/<name>/lock`` (``torch.utils.file_baton.FileBaton``): the builder creates it, every
other process polls until it is gone. A build killed mid-way leaves the file behind and every later load of
that extension waits forever, silently. Two answers here (design notes: ``docs/dev/notes/build-lock.md``):

* ``watch(what)``: a context manager around anything ds_ext runs that may JIT-build (``ds_ext/ops.py``
  loading its kernels, ``ds_ext/comm.py`` ``init_distributed``, where DeepSpeed builds its CPU comm op). When
  the block has not finished after ``DS_EXT_BUILD_LOCK_WARN_S`` seconds (default 30; 0: off) a daemon thread
  logs one WARNING on the ``ds_ext.build_lock`` logger saying what the block waits for -- the lock file, its
  age, which process holds it open, and ``rm <path>`` when none does; or, in torch.distributed's rendezvous,
  MASTER_ADDR:MASTER_PORT, the world size and the ranks seen waiting there (``rendezvous_wait``) -- again every
  minute, and at once when the wait changes. It stops the moment the block ends.
* ``install_wait_notice()`` (done when this module is imported, i.e. by ``import ds_ext``): every wait on a
  torch build lock in this process says so, wherever it happens, from the earliest point -- DeepSpeed building or
  loading its ``deepspeed_shm_comm`` op inside ``deepspeed.initialize`` / ``deepspeed.init_distributed`` (own
  loops, the Hugging Face Trainer, Accelerate), before ds_ext's own ``watch`` exists. ``FileBaton.wait``, torch's
  poll loop, is replaced by the same loop plus a WARNING after ``DS_EXT_BUILD_LOCK_WARN_S`` naming the lock file
  and the fix (``describe``), again every minute; a wait inside ``watch`` is left to the watch's lines.
* ``owned_build(build_dir)``: around a JIT build of ds_ext's own op (``ds_ext/op_builder/__init__.py``). It
  takes an ``fcntl.flock`` on ``<build_dir>/ds_ext_build.flock`` for the build; the kernel drops that lock
  when its holder dies, however it dies. Holding it, a torch ``lock`` file that no process on this host holds
  open can only be left by a killed build: it is removed, with a WARNING naming it.

Standard library and torch only (ground floor: ``tests/unit/test_architecture.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

log = logging.getLogger("ds_ext.build_lock")

ENV_WARN_S = "DS_EXT_BUILD_LOCK_WARN_S"
DEFAULT_WARN_S = 30.0
REPEAT_S = 60.0
LOCK_NAME = "lock"                   # torch's FileBaton file in each extension's build directory
FLOCK_NAME = "ds_ext_build.flock"    # ours, beside it; never removed (an flock lives on the open file)

# thread ident -> the flock file that thread is blocked on (owned_build), for watch's message
_flock_waits: Dict[int, Path] = {}
# thread ident -> how many watch blocks that thread is inside (their lines cover a baton wait there)
_watched: Dict[int, int] = {}


def warn_after_s() -> float:
    """``$DS_EXT_BUILD_LOCK_WARN_S`` (seconds before the first waiting line; 0 turns the lines off)."""
    raw = os.environ.get(ENV_WARN_S, "").strip()
    if not raw:
        return DEFAULT_WARN_S
    try:
        return max(float(raw), 0.0)
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", ENV_WARN_S, raw, DEFAULT_WARN_S)
        return DEFAULT_WARN_S


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``$TORCH_EXTENSIONS_DIR``, else torch's default root plus its
    ``py<ver>_<accelerator>`` folder (the rule of ``torch.utils.cpp_extension._get_build_directory``,
    without creating anything)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        acc = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        acc = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        acc = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}"


def find_locks(root: Optional[Path] = None) -> List[Path]:
    """Every torch build lock under ``root`` (default ``extensions_root()``): ``<root>/<name>/lock``."""
    root = extensions_root() if root is None else Path(root)
    try:
        return sorted(p for p in root.glob(f"*/{LOCK_NAME}") if p.is_file())
    except OSError:
        return []


def holders(path: Path) -> Optional[List[int]]:
    """Pids of the processes on this host that hold ``path`` open (torch's builder keeps its lock file open
    for the whole build), read from ``/proc/<pid>/fd``; None when this cannot be told (no ``/proc``).
    Processes of other users are not readable and never listed."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    try:
        target = os.path.realpath(path)
    except OSError:
        return []
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:  # another user's process, or it just ended
            continue
        for fd in fds:
            try:
                if os.readlink(entry / "fd" / fd) == target:
                    out.append(int(entry.name))
                    break
            except OSError:
                continue
    return out


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text[:100] + ("..." if len(text) > 100 else "")


def _age(path: Path) -> str:
    try:
        s = max(time.time() - path.stat().st_mtime, 0.0)
    except OSError:
        return "age unknown"
    if s < 120:
        return f"{s:.0f} s old"
    if s < 7200:
        return f"{s / 60:.0f} min old"
    return f"{s / 3600:.1f} h old"


def describe(path: Path) -> str:
    """One sentence on a torch build lock: its age, who holds it, and how to clear it when nobody does."""
    path = Path(path)
    pids = holders(path)
    head = f"torch's JIT build lock {path} ({_age(path)})"
    if pids is None:
        return (f"{head}, whose holder cannot be told here (no /proc). If no build of {path.parent.name} is "
                f"running, delete it: rm {path}")
    if os.getpid() in pids:
        return f"{head}, held by this process, which is compiling {path.parent.name}"
    if pids:
        who = ", ".join(f"pid {p} ({_cmdline(p)})" for p in pids)
        return f"{head}, held by {who}, which is compiling {path.parent.name}: waiting for that build"
    return (f"{head}, which no process on this host holds open: probably left by a build killed mid-way. If "
            f"no build of {path.parent.name} is running (on any host sharing {path.parent.parent}), delete it: "
            f"rm {path} (or give each virtual environment its own directory: export TORCH_EXTENSIONS_DIR=...)")


def _thread_state(ident: int) -> Tuple[str, Optional[Path]]:
    """What thread ``ident`` is doing: ("baton", lock) waiting in torch's FileBaton.wait, ("building", lock)
    inside torch's ``_jit_compile`` holding the lock, ("flock", file) waiting in ``owned_build``,
    ("rendezvous", None) inside torch.distributed's rendezvous or process-group start-up, or ("other", None)."""
    if ident in _flock_waits:
        return "flock", _flock_waits[ident]
    frame = sys._current_frames().get(ident)
    building, rendezvous = None, False
    while frame is not None:
        code = frame.f_code
        if code.co_name in _RDZV_FUNCS and code.co_filename.endswith(_RDZV_FILES):
            rendezvous = True
        if code.co_name == "wait" and code.co_filename.endswith("file_baton.py"):
            baton = frame.f_locals.get("self")
            if baton is not None and getattr(baton, "lock_file_path", None):
                return "baton", Path(baton.lock_file_path)
        if code.co_name == "_jit_compile" and code.co_filename.endswith("cpp_extension.py") and building is None:
            baton = frame.f_locals.get("baton")  # the builder's baton keeps its file open (fd set)
            if getattr(baton, "fd", None) is not None and getattr(baton, "lock_file_path", None):
                building = Path(baton.lock_file_path)
        frame = frame.f_back
    if building is not None:
        return "building", building
    return ("rendezvous", None) if rendezvous else ("other", None)


def _flock_owner(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


# ---- the rendezvous ------------------------------------------------------------------------------------------
# torch.distributed's env:// rendezvous (``rendezvous.py`` ``_create_c10d_store``: rank 0 hosts a TCPStore at
# MASTER_ADDR:MASTER_PORT, every rank connects, and the store waits until all have) and the process group's own
# start-up (``distributed_c10d.py``: the backend connects the ranks through that store) wait for the other ranks.
_RDZV_FILES = tuple(os.path.join("torch", "distributed", f) for f in ("rendezvous.py", "distributed_c10d.py"))
_RDZV_FUNCS = {"_create_c10d_store", "_env_rendezvous_handler", "_tcp_rendezvous_handler", "init_process_group",
               "_new_process_group_helper", "_store_based_barrier"}
LIST_UP_TO = 64  # ranks named one by one up to this world size; a count beyond
_announced: set = set()


def _store_prefix() -> str:
    """ds_ext's keys in the rendezvous store, per torchelastic run and restart (an agent's store outlives a
    restart; the store rank 0 hosts lives as long as the job)."""
    return (f"ds_ext/startup/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def _ranks(rs: List[int]) -> str:
    return ", ".join(str(r) for r in rs) if rs else "none"


def _arrivals(addr: str, port: int, world: str, timeout_s: float) -> str:
    """Connect to the rendezvous store from the side (a client that does not count as a worker: torch's store
    counts those that join with ``wait_for_workers``), say that this rank is waiting (``<prefix>/rank<R>`` and a
    counter, once per process), and read which ranks have said so."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(addr, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    key = _store_prefix()
    if key not in _announced:
        store.set(f"{key}/rank{os.environ.get('RANK', '?')}", f"pid {os.getpid()} on {socket.gethostname()}")
        store.add(f"{key}/count", 1)
        _announced.add(key)
    n = store.add(f"{key}/count", 0)
    if not world.isdigit() or int(world) > LIST_UP_TO:
        return f"; {n} of {world} ranks seen waiting there"
    here = [r for r in range(int(world)) if store.check([f"{key}/rank{r}"])]
    missing = [r for r in range(int(world)) if r not in here]
    if not missing:
        return (f"; all {world} ranks have reached it: waiting while the process group connects them (a rank whose "
                f"network interface or port is unreachable from the others, or a firewall)")
    return (f"; ranks seen waiting there: {_ranks(here)} ({len(here)} of {world}); not seen: {_ranks(missing)} "
            f"(not started, still starting, or arrived less than {warn_after_s():g} s ago)")


def rendezvous_wait(timeout_s: float = 3.0) -> str:
    """What a rank waiting in the rendezvous waits for, ``for the other ranks at ADDR:PORT (world N); ...``: the
    address (MASTER_ADDR:MASTER_PORT), the world size and, when the store there answers, the ranks seen waiting
    there (each rank's watch says so through the store when its own wait has lasted ``warn_after_s``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    world = os.environ.get("WORLD_SIZE", "?")
    where = f"{addr or '?'}:{port or '?'}"
    head = f"for the other ranks at {where} (world {world})"
    if not addr or not port.isdigit():
        return f"{head}; MASTER_ADDR / MASTER_PORT are not set in this process's environment"
    try:
        with socket.create_connection((addr, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        return (f"{head}; nothing answers at {where} yet ({e.strerror or e}): rank 0 hosts the rendezvous store "
                f"there, and it has not started, is still starting, or MASTER_ADDR / MASTER_PORT is wrong")
    try:
        return head + _arrivals(addr, int(port), world, timeout_s)
    except Exception as e:  # noqa: BLE001 - a store error: say what is known
        return f"{head}; the store there answers, but the ranks that arrived cannot be read ({type(e).__name__}: {e})"


def report(what: str, ident: int, waited_s: float) -> str:
    """The waiting line for thread ``ident`` inside ``watch(what)`` after ``waited_s`` seconds."""
    kind, path = _thread_state(ident)
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
    head = (f"rank {rank}: " if rank else "") + f"{what}: waiting for {waited_s:.0f} s"
    if kind == "baton":
        return f"{head} on {describe(path)}"
    if kind == "building":
        return f"{head}: this process is compiling {path.parent.name} (it holds {path})"
    if kind == "flock":
        return (f"{head} for ds_ext's build lock {path}, held by {_flock_owner(path)} while it builds or "
                f"loads {path.parent.name} (the lock goes when that process ends)")
    if kind == "rendezvous":
        return f"{head} {rendezvous_wait()}"
    stale = [p for p in find_locks() if holders(p) == []]
    extra = "; ".join(describe(p) for p in stale)
    return f"{head}; not on a JIT build lock" + (f" (but {extra})" if extra else "")


class _Watch:
    def __init__(self, what: str, delay_s: float, repeat_s: float):
        self.what, self.delay_s, self.repeat_s = what, delay_s, repeat_s
        self.ident = threading.get_ident()
        self.done = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="ds_ext-build-lock-watch", daemon=True)

    def _run(self) -> None:
        """A line after ``delay_s``, then every ``repeat_s``, and (looked at every ``delay_s``) as soon as the wait
        has changed (e.g. from DeepSpeed's op build to the rendezvous), so a new wait is named within ``delay_s``."""
        last, said_at = None, 0.0
        while not self.done.wait(self.delay_s if last is None else min(self.delay_s, self.repeat_s)):
            try:
                state = _thread_state(self.ident)
            except Exception:  # noqa: BLE001 - report() says what went wrong
                state = None
            now = time.monotonic()
            if last is not None and state == last and now - said_at < self.repeat_s * 0.99:
                continue
            try:
                line = report(self.what, self.ident, now - self.t0)
            except Exception as e:  # noqa: BLE001 - a message must never break the start-up it describes
                line = f"{self.what}: waiting for {now - self.t0:.0f} s ({type(e).__name__}: {e})"
            if not self.done.is_set():
                log.warning("%s", line)
            last, said_at = state or ("?", None), now


@contextlib.contextmanager
def watch(what: str, delay_s: Optional[float] = None, repeat_s: float = REPEAT_S) -> Iterator[None]:
    """Run the block; if it is still running after ``delay_s`` seconds (default ``warn_after_s()``; 0: no
    watch) log what it waits for (``report``) on ``ds_ext.build_lock``, and again every ``repeat_s``. The
    watching thread is stopped and joined when the block ends, so no line follows it."""
    delay = warn_after_s() if delay_s is None else delay_s
    if delay <= 0:
        yield
        return
    w = _Watch(what, delay, repeat_s)
    _watched[w.ident] = _watched.get(w.ident, 0) + 1
    w.thread.start()
    try:
        yield
    finally:
        w.done.set()
        w.thread.join(timeout=10.0)
        if _watched.get(w.ident, 0) <= 1:
            _watched.pop(w.ident, None)
        else:
            _watched[w.ident] -= 1


# ---- every baton wait of the process -------------------------------------------------------------------------

def wait_line(path: Path, waited_s: float) -> str:
    """The line of a baton wait outside ``watch``: who waits (the rank, under a launcher), for which JIT
    extension, and ``describe(path)``."""
    path = Path(path)
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
    return ((f"rank {rank}: " if rank else "") + f"loading the JIT extension {path.parent.name} (torch.utils."
            f"cpp_extension, e.g. DeepSpeed's op at process-group start): waiting for {waited_s:.0f} s on "
            f"{describe(path)}")


def _noticed_wait(self) -> None:
    """``torch.utils.file_baton.FileBaton.wait`` with notices: the same poll (every ``wait_seconds`` until the lock
    file is gone; torch's own ``warn_after_seconds`` warning kept), plus a WARNING on ``ds_ext.build_lock`` after
    ``warn_after_s()`` seconds and every ``REPEAT_S`` after (``wait_line``). Inside ``watch``, or with the
    notices off (0), torch's own loop runs."""
    delay = warn_after_s()
    if delay <= 0 or threading.get_ident() in _watched:
        return self._ds_ext_original_wait()
    import warnings

    t0 = time.monotonic()
    next_at, torch_warn = t0 + delay, getattr(self, "warn_after_seconds", None)
    while os.path.exists(self.lock_file_path):
        time.sleep(self.wait_seconds)
        now = time.monotonic()
        if torch_warn is not None and now - t0 > torch_warn:
            warnings.warn(f'Waited on lock file "{self.lock_file_path}" for {torch_warn} seconds.', stacklevel=2)
            torch_warn = None
        if now >= next_at:
            try:
                line = wait_line(Path(self.lock_file_path), now - t0)
            except Exception as e:  # noqa: BLE001 - a message must never break the start-up it describes
                line = f"waiting for {now - t0:.0f} s on torch's JIT build lock {self.lock_file_path} ({e})"
            log.warning("%s", line)
            next_at = now + REPEAT_S


def install_wait_notice() -> bool:
    """Replace ``FileBaton.wait`` by ``_noticed_wait`` (True when it is in place). Called when this module is
    imported; torch's own function is kept on the class as ``_ds_ext_original_wait`` (once per process, so a
    reloaded module never wraps its own wrapper), and the class keeps working as before for every caller."""
    try:
        from torch.utils.file_baton import FileBaton
    except ImportError:  # no torch: nothing waits on its batons
        return False
    if not hasattr(FileBaton, "_ds_ext_original_wait"):
        FileBaton._ds_ext_original_wait = FileBaton.wait
    _noticed_wait._ds_ext_notice = True
    FileBaton.wait = _noticed_wait
    return True


def clear_stale(lock: Path) -> bool:
    """Remove torch's build lock ``lock`` when no process on this host holds it open, with a WARNING naming
    it; True when removed. Call only while holding ``owned_build``'s flock: then no ds_ext build of that
    extension runs anywhere that shares the flock, and an unheld lock file is a killed build's."""
    lock = Path(lock)
    if not lock.exists():
        return False
    pids = holders(lock)
    if pids:  # an open lock file is a running build (of something else than ds_ext): torch will wait for it
        return False
    age = _age(lock)
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    log.warning("removed a stale JIT build lock %s (%s): the build of %s that made it was killed (no process "
                "on this host holds it open, and ds_ext's build lock %s is free); loading or building again",
                lock, age, lock.parent.name, lock.parent / FLOCK_NAME)
    return True


@contextlib.contextmanager
def owned_build(build_dir: Path) -> Iterator[None]:
    """Hold ds_ext's build lock for ``build_dir`` (an ``fcntl.flock`` on ``<build_dir>/ds_ext_build.flock``,
    released by the kernel when this process ends however it ends) around a JIT build into it, after
    clearing a stale torch ``lock`` there (``clear_stale``). Another process building the same op makes this
    wait (``watch`` names it). Without ``fcntl`` (not POSIX) the block just runs."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / FLOCK_NAME
    with open(path, "a+") as f:
        ident = threading.get_ident()
        _flock_waits[ident] = path
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        finally:
            _flock_waits.pop(ident, None)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            clear_stale(build_dir / LOCK_NAME)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


install_wait_notice()
