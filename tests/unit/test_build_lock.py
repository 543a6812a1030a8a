"""JIT build locks (ds_ext/build_lock.py): a start-up waiting on torch's build lock says so, naming the file and
the fix; a killed build of ds_ext's own op never leaves it locked for the next run (issue 27, N7).

Nothing sleeps: the waiting lines are awaited on a condition with a deadline, child processes on their pipes.
The end-to-end case loads the CPU op in a fresh process from a copy of this session's JIT build (ninja finds it
up to date), so it costs a build only when nothing else in the session built the op (as ``test_ops.py``)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from ds_ext import build_lock
from ds_ext.build_lock import FLOCK_NAME, LOCK_NAME, owned_build, watch

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 30.0
needs_proc = pytest.mark.skipif(build_lock.holders(Path(__file__)) is None, reason="no /proc: holders unknown")


class Lines(logging.Handler):
    """The ``ds_ext.build_lock`` records, awaitable from the test thread."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.msgs = []
        self.cond = threading.Condition()

    def emit(self, record):
        with self.cond:
            self.msgs.append(record.getMessage())
            self.cond.notify_all()

    def wait_for(self, pred, start=0, timeout=DEADLINE_S):
        """The first message from index ``start`` on that satisfies ``pred``, awaited up to ``timeout``."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(m) for m in self.msgs[start:]), timeout), self.msgs
            return next(m for m in self.msgs[start:] if pred(m))


@pytest.fixture
def lines():
    lg = logging.getLogger("ds_ext.build_lock")
    h, level = Lines(), lg.level
    lg.addHandler(h)
    lg.setLevel(logging.WARNING)
    yield h
    lg.removeHandler(h)
    lg.setLevel(level)


@pytest.fixture
def ext_root(tmp_path, monkeypatch):
    root = tmp_path / "torch_extensions"
    root.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def _watchers():
    return [t for t in threading.enumerate() if t.name == "ds_ext-build-lock-watch"]


def _guarded_wait(lock: Path, **kw) -> threading.Thread:
    """A thread that waits on ``lock`` through torch's own FileBaton.wait inside ``watch``."""
    t = threading.Thread(target=lambda: _run_guarded(lock, kw), daemon=True)
    t.start()
    return t


def _run_guarded(lock, kw):
    with watch("test start-up", **kw):
        FileBaton(str(lock), wait_seconds=0.01).wait()


def _child(code: str) -> subprocess.Popen:
    """A Python child that prints ``ready`` once set up, then waits for its stdin to close."""
    p = subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\nsys.stdin.read()\n"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "ready"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=DEADLINE_S) == -signal.SIGKILL


def test_a_wait_on_a_leftover_lock_names_it_and_the_fix(ext_root, lines):
    lock = ext_root / "deepspeed_shm_comm" / LOCK_NAME
    lock.parent.mkdir()
    lock.touch()
    t0 = time.monotonic()
    t = _guarded_wait(lock, delay_s=0.2, repeat_s=0.2)
    first = lines.wait_for(lambda m: str(lock) in m)
    assert time.monotonic() - t0 < DEADLINE_S
    assert first.startswith("test start-up: waiting for ")
    assert f"rm {lock}" in first and "deepspeed_shm_comm" in first
    if build_lock.holders(lock) is not None:
        assert "which no process on this host holds open" in first
    with lines.cond:  # it repeats while the wait lasts
        assert lines.cond.wait_for(lambda: len(lines.msgs) >= 2, DEADLINE_S), lines.msgs
    lock.unlink()  # the fix the line gives
    t.join(DEADLINE_S)
    assert not t.is_alive() and not _watchers()


def test_a_quick_block_says_nothing(ext_root, lines):
    with watch("quick", delay_s=0.5):
        assert len(_watchers()) == 1  # the watch runs while the block does...
    assert not _watchers()  # ...and is joined when it ends: no line can follow
    assert lines.msgs == []
    with watch("off", delay_s=0):
        assert not _watchers()


def test_delay_from_the_environment(monkeypatch, lines):
    monkeypatch.setenv(build_lock.ENV_WARN_S, "2.5")
    assert build_lock.warn_after_s() == 2.5
    monkeypatch.setenv(build_lock.ENV_WARN_S, "0")
    assert build_lock.warn_after_s() == 0.0
    monkeypatch.delenv(build_lock.ENV_WARN_S)
    assert build_lock.warn_after_s() == build_lock.DEFAULT_WARN_S <= 60
    monkeypatch.setenv(build_lock.ENV_WARN_S, "soon")
    assert build_lock.warn_after_s() == build_lock.DEFAULT_WARN_S
    assert "soon" in lines.msgs[0]


def test_a_build_in_this_process_and_a_wait_on_no_lock(ext_root, lines):
    """Inside torch's ``_jit_compile`` holding the lock (a stand-in compiled under torch's file name, waiting on an
    event instead of ninja): "this process is compiling". Any other wait: "not on a JIT build lock", naming a
    leftover lock when there is one."""
    lock = ext_root / "my_op" / LOCK_NAME
    lock.parent.mkdir()
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    scope: dict = {}
    exec(compile("def _jit_compile(ev, baton):\n    ev.wait(60)\n", "torch/utils/cpp_extension.py", "exec"), scope)
    release = threading.Event()

    def build():
        with watch("loading", delay_s=0.2, repeat_s=0.2):
            scope["_jit_compile"](release, baton)

    t = threading.Thread(target=build, daemon=True)
    t.start()
    try:
        line = lines.wait_for(lambda m: m.startswith("loading: "))
        assert line.endswith(f"this process is compiling my_op (it holds {lock})"), line
    finally:
        release.set()
        t.join(DEADLINE_S)
    os.close(baton.fd)  # the file stays, held by nobody: a killed build's leftover
    n = len(lines.msgs)
    with watch("rendezvous", delay_s=0.2, repeat_s=0.2):
        line = lines.wait_for(lambda m: m.startswith("rendezvous: "), start=n)
    assert "not on a JIT build lock" in line
    if build_lock.holders(lock) is not None:
        assert f"rm {lock}" in line


@needs_proc
def test_a_lock_held_by_a_live_builder_names_it_then_its_death(ext_root, lines):
    """torch's builder keeps its lock file open: the line names its pid; once it is SIGKILLed the lock file stays
    and the next line says that nobody holds it, with the fix."""
    lock = ext_root / "some_op" / LOCK_NAME
    lock.parent.mkdir()
    child = _child(f"import sys\nfrom torch.utils.file_baton import FileBaton\n"
                   f"assert FileBaton({str(lock)!r}).try_acquire()")
    try:
        t = _guarded_wait(lock, delay_s=0.2, repeat_s=0.2)
        held = lines.wait_for(lambda m: str(lock) in m)
        assert f"held by pid {child.pid} (" in held and "rm " not in held
    finally:
        _kill(child)
    assert lock.exists()  # a killed builder leaves torch's lock behind
    n = len(lines.msgs)
    stale = lines.wait_for(lambda m: str(lock) in m, start=n)
    assert "which no process on this host holds open" in stale and f"rm {lock}" in stale
    lock.unlink()
    t.join(DEADLINE_S)
    assert not t.is_alive()


@needs_proc
def test_a_killed_build_of_our_op_does_not_lock_the_next(ext_root, lines):
    """A child takes ds_ext's build lock and torch's lock (a build in progress) and is SIGKILLed. Until then
    another load waits, and its line names the child; after, the kernel has released the flock, the load
    proceeds and torch's lock is gone, with a warning naming it."""
    d = ext_root / "ds_ext_comm_cpu_test"
    lock, flock = d / LOCK_NAME, d / FLOCK_NAME
    child = _child("import sys\nfrom torch.utils.file_baton import FileBaton\n"
                   "from ds_ext.build_lock import owned_build\n"
                   f"held = owned_build({str(d)!r})\nheld.__enter__()\n"
                   f"assert FileBaton({str(lock)!r}).try_acquire()")
    entered = threading.Event()

    def load():
        with watch("loading ds_ext's cpu kernels", delay_s=0.2, repeat_s=0.2), owned_build(d):
            entered.set()
            assert not lock.exists()

    try:
        with open(flock) as f, pytest.raises(BlockingIOError):  # the child holds the flock
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not build_lock.clear_stale(lock) and lock.exists()  # open in a live process: never removed
        t = threading.Thread(target=load, daemon=True)
        t.start()
        waiting = lines.wait_for(lambda m: str(flock) in m)
        assert f"pid {child.pid} on " in waiting and not entered.is_set()
    finally:
        _kill(child)  # the waiting load may clear the lock at once: nothing to assert in between
    assert entered.wait(DEADLINE_S)
    t.join(DEADLINE_S)
    assert not t.is_alive() and not lock.exists()
    assert lines.wait_for(lambda m: m.startswith(f"removed a stale JIT build lock {lock} "))


@pytest.fixture(scope="module")
def built_cpu_op():
    from ds_ext.op_builder import CommCPUBuilder

    b = CommCPUBuilder()
    if not b.is_compatible():
        pytest.skip(f"{b.NAME} cannot be built here: {b.error_log}")
    try:
        b.load(verbose=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{b.NAME} failed to build: {e}")
    return b.jit_build_dir()  # module scope: set up before ext_root moves TORCH_EXTENSIONS_DIR


def test_prepare_after_a_killed_build_does_not_hang(built_cpu_op, ext_root):
    """``ops.prepare("cpu")`` in a fresh process, on a build directory with a killed build's ``lock`` in it
    (a copy of this session's build, so ninja has nothing to do): it loads the compiled op, removes the lock and
    logs a warning naming it, well within the deadline (torch alone would wait forever)."""
    src = built_cpu_op
    d = ext_root / src.name
    shutil.copytree(src, d, ignore=shutil.ignore_patterns(LOCK_NAME, FLOCK_NAME))
    lock = d / LOCK_NAME
    lock.touch()
    code = ("import json, logging\nlogging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
            "from ds_ext import ops\nprint(json.dumps(ops.prepare('cpu')))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_EXT_OPS": "compiled", build_lock.ENV_WARN_S: "20"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert st["in_use"] == "compiled" and st["how"] == "jit", st
    assert f"WARNING ds_ext.build_lock: removed a stale JIT build lock {lock} " in r.stderr, r.stderr[-3000:]
    assert not lock.exists()
    print(f"\n[test_build_lock] prepare with a stale lock: {took:.1f} s ({st['seconds']} s in prepare)")


def test_a_rank_waiting_for_the_others_names_the_rendezvous(tmp_path):
    """Issue 28: rank 0 of a 2-rank world started alone (the trainer, as the deepspeed launcher starts it) waits in
    the rendezvous for rank 1; with the delay at 1 s it says so, naming MASTER_ADDR:MASTER_PORT, that rank 0 is
    seen there and rank 1 is not, within the deadline after DeepSpeed's op is loaded (a JIT build of it, when
    needed, is given its own time: its end is DeepSpeed's "built successfully" line). Then it is killed."""
    import queue

    from tests import harness

    port = harness.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), build_lock.ENV_WARN_S: "1"}
    cmd = [sys.executable, "-u", "-m", "ds_ext.train", "--local_rank=0", "--recipe", str(ROOT / "recipes" /
           "quickstart.yaml"), "--set", f"log.dir={tmp_path / 'run'}", "--set", "log.wandb.mode=disabled"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [out.put(ln) for ln in p.stdout], daemon=True).start()
    seen, want = [], f"for the other ranks at 127.0.0.1:{port} (world 2)"
    try:
        t0, deadline = time.monotonic(), 600.0  # covers a JIT build of DeepSpeed's op in a fresh extensions dir
        while True:
            left = deadline - (time.monotonic() - t0)
            assert left > 0, f"no rendezvous line within {deadline:.0f} s:\n" + "".join(seen[-40:])
            try:
                line = out.get(timeout=left)
            except queue.Empty:
                continue
            seen.append(line)
            if "built successfully" in line:  # DeepSpeed's op is loaded: the rendezvous comes next
                t0, deadline = time.monotonic(), DEADLINE_S
            if want in line:
                break
        took = time.monotonic() - t0
        assert p.poll() is None  # still waiting: nothing gave up
    finally:
        p.kill()
        p.wait(DEADLINE_S)
    assert line.startswith("[ds_ext] rank 0: deepspeed.init_distributed (rendezvous at "), line
    assert "ranks seen waiting there: 0 (1 of 2); not seen: 1 " in line, line
    print(f"\n[test_build_lock] rendezvous line {took:.1f} s after the op was loaded: {line.strip()}")


# ---- every baton wait of a process that imported ds_ext (issue 30, item 10) ---------------------------------

def test_a_baton_wait_outside_watch_names_the_lock_and_ends_when_it_goes(ext_root, lines, monkeypatch):
    """``import ds_ext`` puts the notice into torch's own ``FileBaton.wait``: a wait on a leftover lock anywhere in
    the process (here the test thread, no ``watch`` around it) logs, after ``DS_EXT_BUILD_LOCK_WARN_S``, the lock
    file and the fix; removing the file, as the line says, ends the wait. Inside ``watch`` the watch speaks alone."""
    assert getattr(FileBaton.wait, "_ds_ext_notice", False) and build_lock.install_wait_notice()
    monkeypatch.setenv(build_lock.ENV_WARN_S, "0.05")
    lock = ext_root / "deepspeed_shm_comm" / LOCK_NAME
    lock.parent.mkdir()
    lock.touch()

    class Fix(logging.Handler):  # the user reading the line and running its rm
        def emit(self, record):
            if f"rm {lock}" in record.getMessage():
                lock.unlink(missing_ok=True)

    fix = Fix()
    logging.getLogger("ds_ext.build_lock").addHandler(fix)
    try:
        FileBaton(str(lock), wait_seconds=0.01).wait()  # returns only once the line has been logged
    finally:
        logging.getLogger("ds_ext.build_lock").removeHandler(fix)
    assert len(lines.msgs) == 1, lines.msgs
    assert lines.msgs[0].startswith("loading the JIT extension deepspeed_shm_comm (")
    assert f"on torch's JIT build lock {lock} (" in lines.msgs[0] and "TORCH_EXTENSIONS_DIR" in lines.msgs[0]
    lock.touch()
    t = _guarded_wait(lock, delay_s=0.2, repeat_s=0.2)  # inside watch: the watch's lines only
    line = lines.wait_for(lambda m: m.startswith("test start-up: "), start=1)
    assert str(lock) in line and not any(m.startswith("loading the JIT") for m in lines.msgs[1:])
    lock.unlink()
    t.join(DEADLINE_S)
    assert not t.is_alive()


@pytest.mark.slow  # ~10 s on 2 idle cores: torch, DeepSpeed and ds_ext imported in a fresh process
def test_deepspeed_init_on_a_stale_lock_says_so_before_any_ds_ext_call(tmp_path):
    """The audit's hang (a 2-rank HF run silent for 10 minutes): DeepSpeed's own ``init_distributed``, as an own loop
    or the HF Trainer reaches it, waits on a stale ``deepspeed_shm_comm/lock`` left in the torch extensions
    directory. With only ``import ds_ext`` before it, the process now prints the lock file and the fix within
    ``DS_EXT_BUILD_LOCK_WARN_S``; it is then killed (torch alone would wait forever)."""
    import queue

    from tests import harness

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(lock.parent.parent),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(harness.free_port()), build_lock.ENV_WARN_S: "1"}
    code = "import ds_ext, deepspeed\ndeepspeed.init_distributed(dist_backend='gloo')\nprint('initialized')\n"
    p = subprocess.Popen([sys.executable, "-u", "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [out.put(ln) for ln in p.stdout], daemon=True).start()
    seen: list = []
    try:
        t0, deadline = time.monotonic(), 120.0  # imports on a loaded machine; the line itself comes 1 s into the wait
        while not any(f"rm {lock}" in ln for ln in seen):
            left = deadline - (time.monotonic() - t0)
            assert left > 0 and p.poll() is None, "no stale-lock line:\n" + "".join(seen[-40:])
            try:
                seen.append(out.get(timeout=left))
            except queue.Empty:
                continue
        line = next(ln for ln in seen if f"rm {lock}" in ln)
        assert "loading the JIT extension deepspeed_shm_comm" in line and "waiting for 1 s" in line, line
        assert "which no process on this host holds open" in line or "cannot be told here" in line
        assert not any("initialized" in ln for ln in seen)
    finally:
        p.kill()
        p.wait(timeout=DEADLINE_S)
    assert lock.exists()  # never removed behind DeepSpeed's back: the user decides
