"""Stop signals (SIGTERM, SIGINT, SIGUSR1) and the waiting lines of ``ds_ext/trainer/faults/``.

Real processes (``tests/e2e/workers_signals.py``: gloo, the watchdog, a loop of all_reduces that agrees
on ``faults.stop_requested()`` every step), real signals. The tests block on lines the ranks print
and on their exit, each with a deadline, and kill whatever is left in ``finally``. All ranks of a
job share one process group of their own, so ``killpg`` does what a terminal's Ctrl-C does to them
(without reaching pytest).
"""
from __future__ import annotations

import functools
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from ds_ext.trainer import faults
from ds_ext.trainer.exit_codes import ExitCode
from tests import harness

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "e2e" / "workers_signals.py")
LIMIT_S = 60.0
SAVED = re.compile(r"^saved at step (\d+)$", re.M)


class Job:
    """``world`` ranks of ``workers_signals.py``; every line they print is kept per rank."""

    def __init__(self, world: int, *args: str, env: Optional[Dict[str, str]] = None):
        self.world = world
        self.procs: List[subprocess.Popen] = []
        self.lines: List[List[str]] = [[] for _ in range(world)]
        self.cond = threading.Condition()
        self.readers: List[threading.Thread] = []
        port = harness.free_port()
        base = {k: v for k, v in os.environ.items()
                if k not in ("DS_EXT_WATCHDOG", "DS_EXT_WAIT_S", "DS_EXT_WAIT_REPORT_S", "DS_EXT_FAULT")}
        base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                    PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        base.update(env or {})
        try:
            for r in range(world):
                pgid = 0 if r == 0 else self.procs[0].pid  # one process group of their own
                group = ({"process_group": pgid} if sys.version_info >= (3, 11)
                         else {"preexec_fn": functools.partial(os.setpgid, 0, pgid)})
                p = subprocess.Popen([sys.executable, "-u", WORKER, *args], cwd=ROOT, env=dict(base, RANK=str(r)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **group)
                self.procs.append(p)
                t = threading.Thread(target=self._read, args=(r, p), daemon=True)
                t.start()
                self.readers.append(t)
        except BaseException:
            self.kill()
            raise

    def _read(self, r: int, p: subprocess.Popen) -> None:
        for raw in p.stdout:
            with self.cond:
                self.lines[r].append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def text(self, r: int) -> str:
        with self.cond:
            return "\n".join(self.lines[r])

    def wait_line(self, r: int, want: Callable[[str], bool], what: str, timeout: float = LIMIT_S) -> str:
        """Block until rank ``r`` prints a line for which ``want`` is true; return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[r][seen:]:
                    if want(line):
                        return line
                seen = len(self.lines[r])
                left = deadline - time.monotonic()
                ended = self.procs[r].poll() is not None and not self.readers[r].is_alive()
                if left <= 0 or ended:
                    raise AssertionError(f"rank {r} printed no {what} line ({'exited' if ended else 'deadline'}):\n"
                                         + "\n".join(self.lines[r][-40:]))
                self.cond.wait(min(left, 1.0))

    def wait_ready(self) -> None:
        for r in range(self.world):
            self.wait_line(r, lambda s: s.startswith("ready at step"), "'ready'")

    def wait_procs(self, timeout: float = LIMIT_S) -> List[Optional[int]]:
        """Exit codes (None: still running at the deadline)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def join_readers(self, timeout: float) -> None:
        """Until every rank's output has reached its end (the rank and whatever it forked have ended)."""
        deadline = time.monotonic() + timeout
        for t in self.readers:
            t.join(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float = LIMIT_S) -> List[Optional[int]]:
        """Exit codes (None: still running at the deadline), with all output read."""
        deadline = time.monotonic() + timeout
        codes = self.wait_procs(timeout)
        self.join_readers(deadline - time.monotonic())
        return codes

    def send(self, r: int, sig: int) -> None:
        os.kill(self.procs[r].pid, sig)

    def send_all(self, sig: int) -> None:
        """Like a terminal's Ctrl-C: one signal to the job's process group."""
        os.killpg(self.procs[0].pid, sig)

    def loader_pids(self, r: int) -> List[int]:
        return [int(m) for m in re.findall(r"^loader worker pid (\d+)$", self.text(r), re.M)]

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the job's process group (ranks and what they forked)."""
        if self.procs:
            try:
                os.killpg(self.procs[0].pid, signal.SIGKILL)  # SIGKILL also ends a SIGSTOPped process
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        self.kill_group()
        for p in self.procs:
            p.wait()
        self.join_readers(10.0)
        for p, t in zip(self.procs, self.readers):
            if p.stdout is not None and not t.is_alive():  # closing under a blocked reader would hang
                p.stdout.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def wait_gone(pids: List[int], timeout: float = 20.0) -> List[int]:
    """Block (on pidfds) until these processes (not our children) have ended; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


def stop_ranks_and_loader_workers(job: Job, *sigs: int):
    """Once the 2 ranks (one DataLoader worker each) are ready, send ``sigs`` in turn to the job's process
    group; wait for the ranks and check both workers ended after them. Returns (exit codes, rank texts)."""
    job.wait_ready()
    for sig in sigs:
        job.send_all(sig)
    codes = job.wait()
    texts = [job.text(0), job.text(1)]
    workers = job.loader_pids(0) + job.loader_pids(1)
    assert len(workers) == 2, texts
    assert wait_gone(workers) == [], texts
    return codes, texts


def ds_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.startswith("[ds_ext]")]


def assert_clean(text: str) -> None:
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


STOP_LINE = (r"\[ds_ext\] rank {r}: (SIG[A-Z0-9]+)( on another rank,)? at step \d+ \([a-z -]+\): finishing this step, "
             r"saving a checkpoint, then stopping \(exit 75\); (send it again to stop at once|a signal to this rank "
             r"stops it at once)")


def stop_line(text: str, r: int):
    """Rank r's one ``[ds_ext]`` line, the save-and-stop line; returns its match (signal, peer part)."""
    lines = ds_lines(text)
    assert len(lines) == 1, text[-3000:]
    m = re.fullmatch(STOP_LINE.format(r=r), lines[0])
    assert m, lines[0]
    return m


def saved_step(text: str) -> int:
    m = SAVED.findall(text)
    assert len(m) == 1, text[-3000:]
    return int(m[0])


# ---- the watchdog's answer -----------------------------------------------------------------------

def test_sigusr1_to_one_rank_saves_and_stops_every_rank():
    """Slurm's --signal=USR1@T may reach one rank: it asks to stop, the ranks agree, every rank saves at
    the same step and leaves with 75; rank 1 leaving with 75 first is no verdict on rank 0."""
    with Job(2, "--on-signal", "save") as job:
        job.wait_ready()
        job.send(1, signal.SIGUSR1)
        codes = job.wait()
        out0, out1 = job.text(0), job.text(1)
    assert codes == [faults.EXIT_PREEMPTED] * 2, (codes, out0[-2000:], out1[-2000:])
    assert stop_line(out1, 1).groups()[:2] == ("SIGUSR1", None)
    assert stop_line(out0, 0).groups()[:2] == ("SIGUSR1", " on another rank,")  # and no verdict line
    assert saved_step(out0) == saved_step(out1)
    assert_clean(out0 + out1)


def test_ctrl_c_under_exit_stops_each_rank_with_130():
    """Ctrl-C reaches every process of the group, DataLoader workers included: each rank prints one
    line (none from its worker) and exits 130; the workers end after their rank."""
    with Job(2, "--on-signal", "exit", "--loader-workers", "1", "--loader-init", "plain") as job:
        codes, texts = stop_ranks_and_loader_workers(job, signal.SIGINT)
    assert codes == [faults.EXIT_SIGINT] * 2, (codes, texts)
    for r, text in enumerate(texts):
        [line] = ds_lines(text)
        assert line.startswith(f"[ds_ext] rank {r}: ") and line.endswith("; stopped by SIGINT (exit 130)"), text
        assert_clean(text)


@pytest.mark.slow
def test_ctrl_c_then_launcher_sigterm_within_2s_still_saves():
    """The deepspeed launcher answers Ctrl-C with SIGTERM to its children right after their SIGINT:
    that second signal is the same request, not a repeat. The launcher's SIGTERM also reaches the
    DataLoader workers, which must live on to feed the step being finished, and end after their rank."""
    with Job(2, "--on-signal", "save", "--loader-workers", "1") as job:
        codes, texts = stop_ranks_and_loader_workers(job, signal.SIGINT, signal.SIGTERM)
    assert codes == [faults.EXIT_PREEMPTED] * 2, (codes, texts)
    for r, text in enumerate(texts):
        # both signals are pending at once here: either may reach the watchdog's wakeup fd first; and a
        # rank may learn of the other's request (agreement) a moment before its own is recorded
        assert stop_line(text, r).group(1) in ("SIGINT", "SIGTERM")
        assert_clean(text)
    assert saved_step(texts[0]) == saved_step(texts[1])


def test_repeat_signal_stops_at_once_while_blocked_and_waiting_lines():
    """Rank 1 asked to save (SIGUSR1) and now blocked in a C++ receive that never completes; rank 0 is
    blocked in the collective that agrees on the request. Both say they wait (rank 0: rank 1 keeps
    reporting, it is not stopped). A second signal (>= 2 s after the first: rank 1's waiting line comes
    2 s after it blocked, which was after the first) ends rank 1 at once with 143, and rank 0 names it
    and stops with 4."""
    env = {"DS_EXT_WAIT_S": "2", "DS_EXT_WAIT_REPORT_S": "0.5"}
    with Job(2, "--on-signal", "save", "--block-on-stop", env=env) as job:
        job.wait_ready()
        job.send(1, signal.SIGUSR1)
        blocked = job.wait_line(1, lambda s: s.startswith("blocking at step"), "'blocking'")
        step = int(blocked.rsplit(" ", 1)[1])
        job.wait_line(1, lambda s: s.startswith(f"[ds_ext] rank 1: waiting at step {step} (blocked on purpose) for "),
                      "waiting")
        w0 = job.wait_line(0, lambda s: "waiting at step" in s, "waiting")
        assert re.fullmatch(rf"\[ds_ext\] rank 0: waiting at step {step} \(collective\) for \d+ s; every rank "
                            rf"reported within the last \d+ s", w0), w0
        job.send(1, signal.SIGTERM)
        codes = job.wait()
        out0, out1 = job.text(0), job.text(1)
    assert codes == [faults.EXIT_PEER_LOST, faults.EXIT_SIGTERM], (codes, out0[-2000:], out1[-2000:])
    last = ds_lines(out1)[-1]
    assert re.fullmatch(rf"\[ds_ext\] rank 1: SIGTERM \d+ s after SIGUSR1, at step {step} \(blocked on purpose\); "
                        rf"stopped by SIGTERM \(exit 143\)", last), last
    assert f"[ds_ext] rank 0: rank 1 stopped with exit code 143 (stopped by SIGTERM) at step {step} " in out0, out0
    assert ds_lines(out0)[-1].endswith("; stopping this rank (exit 4)"), out0
    assert "saved at step" not in out0 + out1
    assert_clean(out0 + out1)


def test_stopped_rank_is_named_in_rank_0_waiting_line():
    """A SIGSTOPped rank keeps its sockets (no verdict) but stops reporting: rank 0's waiting line
    names it. Then SIGKILL: rank 0 reports the loss and leaves with 4."""
    env = {"DS_EXT_WAIT_S": "3", "DS_EXT_WAIT_REPORT_S": "1"}
    with Job(2, "--on-signal", "exit", env=env) as job:
        job.wait_ready()
        job.send(1, signal.SIGSTOP)
        line = job.wait_line(0, lambda s: "waiting at step" in s and "rank 1 last reported" in s, "waiting")
        # rank 1 may have been stopped before its second report (the first says "start-up")
        assert re.fullmatch(r"\[ds_ext\] rank 0: waiting at step (\d+) \(collective\) for \d+ s; rank 1 last "
                            r"reported \d+ s ago at step \d+ \([a-z -]+\)", line), line
        job.send(1, signal.SIGKILL)
        codes = job.wait()
        out0 = job.text(0)
    assert codes == [faults.EXIT_PEER_LOST, -signal.SIGKILL], (codes, out0[-2000:])
    assert "[ds_ext] rank 0: lost rank 1 (pid " in out0, out0
    assert_clean(out0)


def test_forked_child_does_not_hide_its_ranks_death():
    """A child forked from a rank (as a DataLoader worker is) keeps copies of the rank's sockets; gloo's
    stay open, so rank 0's all_reduce does not fail, but the child closes its copy of the watchdog
    connection, so rank 1's death is still seen and named at once."""
    with Job(2, "--on-signal", "exit", "--fork-child") as job:
        job.wait_ready()
        children = [int(job.wait_line(r, lambda s: s.startswith("forked child pid"), "'forked child'").split()[-1])
                    for r in range(2)]
        job.send(1, signal.SIGKILL)
        codes = job.wait_procs(20.0)
        assert wait_gone(children, 0.0) == children  # still there: they held gloo's sockets all along
        job.kill_group()
        job.join_readers(10.0)
        out0 = job.text(0)
    assert codes == [faults.EXIT_PEER_LOST, -signal.SIGKILL], (codes, out0[-2000:])
    assert "[ds_ext] rank 0: lost rank 1 (pid " in out0, out0
    assert_clean(out0)


# ---- without a watchdog: install_signal_handlers ---------------------------------------------------

@pytest.mark.parametrize("world,env,mode,sigs,code", [
    (1, {}, "save", [signal.SIGUSR1], faults.EXIT_PREEMPTED),
    (1, {}, "exit", [signal.SIGINT], faults.EXIT_SIGINT),
    (2, {"DS_EXT_WATCHDOG": "0"}, "save", [signal.SIGINT, signal.SIGTERM], faults.EXIT_PREEMPTED),
], ids=["world1-save-usr1", "world1-exit-int", "nowatchdog-save-int-term"])
def test_without_watchdog_main_thread_handlers(world, env, mode, sigs, code):
    with Job(world, "--on-signal", mode, env=env) as job:
        job.wait_ready()
        for sig in sigs:
            job.send_all(sig)
        codes = job.wait()
        texts = [job.text(r) for r in range(world)]
    assert codes == [code] * world, (codes, texts)
    name = signal.Signals(sigs[0]).name
    for r, text in enumerate(texts):
        assert f"watchdog off, on_signal={mode}" in text
        [line] = ds_lines(text)
        if mode == "save":  # both signals pending at once: either may run first
            assert stop_line(text, r).group(1) in ("SIGINT", "SIGTERM", "SIGUSR1")
        else:
            assert line.startswith(f"[ds_ext] rank {r}: at step ") and line.endswith(f"stopped by {name} (exit {code})")
        assert_clean(text)
    if mode == "save":
        assert len({saved_step(t) for t in texts}) == 1


def test_without_watchdog_repeat_signal_stops_at_once():
    with Job(1, "--on-signal", "save", "--block-on-stop") as job:
        job.wait_ready()
        sent = time.monotonic()
        job.send(0, signal.SIGUSR1)
        job.wait_line(0, lambda s: s.startswith("blocking at step"), "'blocking'")
        # the repeat rule's own gap (no request here waits 3 s for a verdict): not a wait for an event
        time.sleep(max(0.0, sent + faults.REPEAT_S + 0.3 - time.monotonic()))
        job.send(0, signal.SIGINT)
        codes = job.wait()
        text = job.text(0)
    assert codes == [faults.EXIT_SIGINT], (codes, text)
    assert re.search(r"\[ds_ext\] rank 0: SIGINT \d+ s after SIGUSR1, at step \d+ \(blocked on purpose\); stopped by "
                     r"SIGINT \(exit 130\)", text), text
    assert_clean(text)


# ---- rules, in-process ------------------------------------------------------------------------------

def test_exit_codes():
    assert (faults.EXIT_SIGTERM, faults.EXIT_SIGINT, faults.EXIT_SIGUSR1) == (143, 130, 138)
    assert (faults.EXIT_PREEMPTED, faults.EXIT_DIVERGED, faults.EXIT_PEER_LOST) == (75, 8, 4)
    # the one table (ds_ext/trainer/exit_codes.py): every code of docs/guide/failures-and-exit-codes.md's "Exit codes" table, once
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 75, 130, 138, 143]
    assert faults.EXIT_PEER_LOST is ExitCode.PEER_LOST and f"{ExitCode.SAVE}" == "7"
    assert ExitCode.reason_of(6, "x") == "directory in use by another job"
    assert ExitCode.reason_of(1, "RuntimeError: boom") == "RuntimeError: boom"
    assert ExitCode.reason_of(99, "exit 99") == "exit 99"
    assert len(ExitCode.table()) == len(ExitCode)


def test_repeat_rule():
    s = faults._Signals()
    s.reset("save", 3)
    assert s.arrive(signal.SIGINT, 100.0) == "first"
    assert s.arrive(signal.SIGTERM, 101.9) == "same"
    assert s.arrive(signal.SIGTERM, 102.0) == "repeat"
    with pytest.raises(ValueError, match="on_signal='stop'"):
        s.reset("stop", 0)


def test_bad_on_signal_is_refused():
    with pytest.raises(ValueError, match="on_signal='later'"):
        faults.Watchdog.start(0, 1, on_signal="later")
    with pytest.raises(ValueError, match="on_signal='later'"):
        faults.install_signal_handlers("later")


def test_peers_leaving_together_start_no_countdown():
    """0 and 75: every rank leaves at the same step. 8 (diverged) does start the countdown: a skip on a
    local step of Local SGD / DS-Sync is one rank's own, so the others may not stop by themselves."""
    wd = faults.Watchdog(0, 2)
    try:
        for code in (0, faults.EXIT_PREEMPTED):
            wd._peer_left(1, code, "leaving at this step")
            assert wd.verdict is None and wd._grace_deadline is None
        wd._peer_left(1, faults.EXIT_DIVERGED, "training diverged")
        assert wd.verdict.startswith("rank 1 stopped with exit code 8 (training diverged)")
        assert wd._grace_deadline is not None
    finally:
        wd._close_fds()


def test_stop_agreed_on_a_rank_without_its_own_request(capsys):
    faults._signals.reset("save", 3)
    try:
        assert faults.stop_code() == 0 and faults.stop_requested() is None
        assert faults.stop_agreed(int(signal.SIGUSR1)) == "SIGUSR1"
        assert faults.stop_requested() == "SIGUSR1" and faults.stop_code() == signal.SIGUSR1
        faults._signals.record(signal.SIGINT)  # its own signal, recorded after the agreement: nothing more
        assert faults.stop_requested() == "SIGUSR1"
        err = capsys.readouterr().err
        assert err.count("[ds_ext]") == 1 and "[ds_ext] rank 3: SIGUSR1 on another rank, at step " in err, err
        assert faults._signals.arrive(signal.SIGTERM, time.monotonic() + faults.REPEAT_S) == "repeat"
    finally:
        faults._signals.reset("exit", 0)
