"""The watchdog (``Watchdog.start``, one daemon thread per rank) says it. Rank 0 listens on a TCP port
(an ephemeral one, published through the c10d TCPStore that rank 0 already hosts for the
rendezvous); every other rank connects once, says ``hello <rank> <pid> <host>`` and keeps the
connection open for the life of the run. The operating system closes a process's sockets when it
dies for any reason (SIGKILL, segfault, the OOM killer), so:

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/watchdog.md``.
"""
from __future__ import annotations

import math
import os
import select
import selectors
import signal
import socket
import threading
import time
from typing import Dict, Optional, Tuple

from . import signals as _sig
from .common import (CONNECT_TIMEOUT_S, EXIT_PEER_LOST, GRACE_S, LEAVING_TOGETHER, ON_SIGNAL, REPORT_S,
                     SIGNAL_VERDICT_WAIT_S, STOP_SIGNALS, STORE_KEY, VERDICT_WAIT_S, WAIT_S, _env_seconds, _oneline,
                     _progress, _say, _signal_of_code, where)
from .signals import _handle_in_main, _install, _set_active, _signals, restore_signal_handlers

def _default_store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it there is no watchdog, nothing else changes
        return None



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
        if _sig._active is self:
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
