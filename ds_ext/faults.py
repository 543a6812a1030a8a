"""A dying rank: the peer watchdog, the messages survivors print, and the test-only fault hook.

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

The watchdog (``Watchdog.start``, one daemon thread per rank) says it. Rank 0 listens on a TCP port
(an ephemeral one, published through the c10d TCPStore that rank 0 already hosts for the
rendezvous); every other rank connects once, says ``hello <rank> <pid> <host>`` and keeps the
connection open for the life of the run. The operating system closes a process's sockets when it
dies for any reason (SIGKILL, segfault, the OOM killer), so:

* rank 0 sees end-of-file on rank r's connection. If rank r had said goodbye first (``left <rank>
  <exit code> <reason>``, sent by ``Watchdog.close`` whenever ``train()`` returns or raises), it left
  on purpose; otherwise it was lost. Rank 0 relays ``lost r`` / ``left r ...`` to every other rank.
* every other rank sees end-of-file on its connection to rank 0 without rank 0's goodbye: rank 0
  was lost (the store went with it, which is itself the evidence).

No heartbeats and no timing guesses: a rank that is merely slow (a long checkpoint write, a long
``torch.save`` holding the GIL) keeps its connection and is never declared lost. A rank that is
alive but stuck is not detected here; the collective timeout (``train.collective_timeout_s``, given
to ``deepspeed.init_distributed``) bounds that case, and the message then says that every rank is
still connected.

On a verdict a survivor prints one line naming the lost rank (pid, host), the step it was at and
what it was doing, and leaves with ``os._exit(EXIT_PEER_LOST)`` from the watchdog thread: no
traceback, no hang in gloo/NCCL destructors, and it works even when the main thread is blocked in a
collective that will never return (NCCL). A peer that left on purpose with a non-zero code (a
recipe, data or checkpoint error, or an exception) gets ``GRACE_S`` seconds for this rank to reach
the same verdict itself before it is stopped too. When the main thread's collective fails first
(gloo), ``explain_failure`` waits briefly for the watchdog's verdict and prints the same line.
SIGTERM (what the deepspeed launcher sends to the survivors) is answered with the same line plus
exit code 143, also from the watchdog thread (``signal.set_wakeup_fd``), so it is handled even while
the main thread sits in a C++ call. ``DS_EXT_WATCHDOG=0`` turns the watchdog off (a firewall that
only opens MASTER_PORT); failures are then reported from the main thread without the rank.

Fault injection (tests only): ``DS_EXT_FAULT=<phase>:<rank>:<step>`` makes that rank send itself
SIGKILL (a real kill of the real process, after one line on stderr with the time) when it reaches
``point(phase, step)``; ``<phase>:<rank>:<step>:stop`` sends SIGSTOP instead (a rank that is alive
but stuck: its sockets stay open). Phases:

* ``data``: fetching the first micro-batch of optimizer step ``step``;
* ``collective``: after the backward of the last micro-batch of step ``step``, with the reducer's
  gradient collectives launched, before ``engine.step()`` waits for them;
* ``checkpoint.save`` for the checkpoint taken after step ``step``: ``ckpt_start`` (staging
  directory made), ``ckpt_deepspeed`` (DeepSpeed's files written), ``ckpt_rankfile`` (this rank's
  ds_ext file written), ``ckpt_meta`` (rank 0: ``meta.json`` written in staging), ``ckpt_replace``
  (rank 0, only when the tag exists already: the old copy moved aside, the new one not yet in
  place), ``ckpt_rename`` (rank 0: renamed into place, ``latest`` not yet replaced), ``ckpt_latest``
  (rank 0: ``latest`` replaced, nothing pruned), ``ckpt_prune`` (rank 0: an old checkpoint renamed
  away, not yet deleted), ``ckpt_end`` (after the final barrier).
"""
from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

EXIT_PEER_LOST = 4   # another rank died or stopped, or a collective failed
EXIT_CHECKPOINT = 5  # a checkpoint cannot be resumed from (mismatch, missing or damaged files)
EXIT_SIGTERM = 128 + signal.SIGTERM

GRACE_S = 10.0          # how long a peer's deliberate non-zero exit waits for this rank to leave by itself
VERDICT_WAIT_S = 5.0    # how long a failed collective in the main thread waits for the watchdog's verdict
CONNECT_TIMEOUT_S = 60.0
STORE_KEY = "ds_ext/watchdog/address"

PHASES = ("data", "collective", "ckpt_start", "ckpt_deepspeed", "ckpt_rankfile", "ckpt_meta", "ckpt_replace",
          "ckpt_rename", "ckpt_latest", "ckpt_prune", "ckpt_end")
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def _say(line: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass
    try:
        sys.stderr.write(line.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        pass


# ---- where this rank is (read by the messages) ------------------------------------------------

_progress: List = [0, "start-up"]


def progress(step: int, what: str) -> None:
    """Record the optimizer step this rank is working on (or has just finished) and what it does."""
    _progress[0] = step
    _progress[1] = what


def where() -> str:
    """``step N (what)`` for the messages."""
    return f"step {_progress[0]} ({_progress[1]})"


# ---- fault injection (tests) ------------------------------------------------------------------

class FaultSpecError(ValueError):
    """A malformed ``DS_EXT_FAULT`` value."""


_fault: Optional[Tuple[str, int, int, str, str]] = None  # (phase, rank, step, action, raw) for this rank
_fault_rank = -1


def load_fault_plan(rank: int, env: Optional[Dict[str, str]] = None) -> None:
    """Read ``DS_EXT_FAULT`` for this rank; raise ``FaultSpecError`` naming the variable and value."""
    global _fault, _fault_rank
    raw = (env if env is not None else os.environ).get("DS_EXT_FAULT", "").strip()
    _fault, _fault_rank = None, rank
    if not raw:
        return
    parts = raw.split(":")
    if len(parts) == 3:
        parts.append("kill")
    if (len(parts) != 4 or parts[0] not in PHASES or not parts[1].isdigit() or not parts[2].isdigit()
            or parts[3] not in ACTIONS):
        raise FaultSpecError(f"DS_EXT_FAULT={raw!r}: expected <phase>:<rank>:<step>[:kill|stop] with phase one of "
                             f"{', '.join(PHASES)} and non-negative integers")
    if int(parts[1]) == rank:
        _fault = (parts[0], int(parts[1]), int(parts[2]), parts[3], raw)


def point(phase: str, step: int) -> None:
    """A fault-injection point: SIGKILL (or SIGSTOP) this process if ``DS_EXT_FAULT`` names this phase,
    rank and step."""
    f = _fault
    if f is None or f[0] != phase or f[2] != step:
        return
    sig = ACTIONS[f[3]]
    _say(f"[ds_ext] fault injection DS_EXT_FAULT={f[4]}: {signal.Signals(sig).name} rank {_fault_rank} "
         f"(pid {os.getpid()}) in {phase} at step {step} t={time.time():.3f}")
    os.kill(os.getpid(), sig)


# ---- the watchdog -----------------------------------------------------------------------------

def _default_store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it there is no watchdog, nothing else changes
        return None


def _oneline(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


class Watchdog:
    """One per rank; see the module docstring. ``start`` returns None when turned off or impossible."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.verdict: Optional[str] = None      # what happened to a peer, once something did
        self._verdict_event = threading.Event()
        self._lock = threading.RLock()  # re-entrant: the SIGTERM handler may run inside a held section
        self._send_lock = threading.Lock()
        self._never = threading.Event()
        self._closing = False
        self._stopping = False
        self._grace_deadline: Optional[float] = None
        self._sel = selectors.DefaultSelector()
        self._listen: Optional[socket.socket] = None
        self._server: Optional[_Conn] = None      # a client's connection to rank 0
        self._clients: Dict[socket.socket, _Conn] = {}  # rank 0's connections
        self._ctl_r, self._ctl_w = os.pipe()      # wakes the thread (close, SIGTERM)
        os.set_blocking(self._ctl_r, False)
        os.set_blocking(self._ctl_w, False)
        self._sel.register(self._ctl_r, selectors.EVENT_READ, "ctl")
        self._old_wakeup_fd: Optional[int] = None
        self._old_sigterm = None
        self._thread: Optional[threading.Thread] = None

    # -- set-up ----------------------------------------------------------------------------
    @classmethod
    def start(cls, rank: int, world: int) -> Optional["Watchdog"]:
        """Collective (every rank calls it after the process group exists). Rank 0 always publishes
        something under ``STORE_KEY`` (its address, or ``none`` when it runs without a watchdog), so
        the others never wait for an address that will not come."""
        if world < 2:
            return None
        off = os.environ.get("DS_EXT_WATCHDOG", "1").strip().lower() in ("0", "off", "false", "no")
        store = _default_store()
        if store is None:
            _say(f"[ds_ext] rank {rank}: no c10d store to publish the watchdog address; running without the "
                 f"watchdog (a lost rank is then reported without its number)")
            return None
        wd = cls(rank, world)
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
        wd._install_sigterm()
        wd._thread = threading.Thread(target=wd._loop, name="ds_ext-watchdog", daemon=True)
        wd._thread.start()
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

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm_main)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._ctl_w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            pass

    # -- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            timeout = None
            if self._grace_deadline is not None:
                timeout = max(0.0, self._grace_deadline - time.monotonic())
            try:
                events = self._sel.select(timeout)
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
            if self._grace_deadline is not None and time.monotonic() >= self._grace_deadline:
                self._stop(EXIT_PEER_LOST, self.message(EXIT_PEER_LOST))

    def _event(self, tag: str, fileobj) -> None:
        if tag == "ctl":
            try:
                data = os.read(self._ctl_r, 512)
            except (BlockingIOError, OSError):
                data = b""
            if self._closing:
                raise _Return()
            if bytes([signal.SIGTERM]) in data:
                self._on_sigterm()
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
            if kind == "hello" and not from_server:
                r, conn.pid, conn.host = rest.split(" ", 2)
                conn.rank = int(r)
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
        self._set_verdict(core)
        self._stop(EXIT_PEER_LOST, self.message(EXIT_PEER_LOST))

    def _peer_left(self, r: int, code: int, reason: str) -> None:
        if code == 0 or r == self.rank:
            return
        core = f"rank {r} stopped with exit code {code} ({reason or 'no reason given'}) at {where()} on this rank"
        if self._set_verdict(core) and self._grace_deadline is None:
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
        how = "stopped by SIGTERM" if code == EXIT_SIGTERM else "stopping this rank"
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
            reason = self.verdict or ("stopped by SIGTERM" if code == EXIT_SIGTERM else f"stopped (exit {code})")
            reason = reason.split(" at step ")[0]  # e.g. "lost rank 1 (pid ... on host)"
            if code == EXIT_SIGTERM:
                reason = "stopped by SIGTERM" + ("" if reason == "stopped by SIGTERM" else f" after: {reason}")
        self._goodbye(code, reason)
        os._exit(code)

    def _goodbye(self, code: int, reason: str) -> None:
        line = f"left {self.rank} {code} {_oneline(reason, 200)}"
        if self._server is not None:
            self._send(self._server, line)
        elif self._listen is not None:
            self._relay(line)

    # -- SIGTERM -----------------------------------------------------------------------------
    def _on_sigterm(self) -> None:
        self._verdict_event.wait(3.0)  # the deepspeed launcher's SIGTERM follows a death by up to a second
        self._stop(EXIT_SIGTERM, self.message(EXIT_SIGTERM))

    def _on_sigterm_main(self, signum, frame) -> None:
        self._on_sigterm()

    # -- main-thread API ---------------------------------------------------------------------
    def wait_verdict(self, timeout: float) -> Optional[str]:
        self._verdict_event.wait(timeout)
        return self.verdict

    def close(self, code: int, reason: str = "") -> None:
        """Leave on purpose: tell the peers (``code`` 0: finished), stop the thread, restore SIGTERM."""
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
            try:
                if self._old_wakeup_fd is not None:
                    signal.set_wakeup_fd(self._old_wakeup_fd)
                if self._old_sigterm is not None:
                    signal.signal(signal.SIGTERM, self._old_sigterm)
            except (ValueError, OSError):
                pass
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
    ``EXIT_PEER_LOST``; otherwise return and let the caller handle or re-raise it."""
    if not looks_distributed(exc):
        return
    if wd is not None:
        if wd.wait_verdict(VERDICT_WAIT_S):
            wd._stop(EXIT_PEER_LOST, wd.message(EXIT_PEER_LOST))
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
