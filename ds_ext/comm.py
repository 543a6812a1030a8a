"""The one communication layer: every collective ds_ext makes goes through a ``Communicator``.

Methods (reducers, synchronizers, orders), the engine's step hooks and the trainer are handed a
communicator and never call ``torch.distributed`` themselves (``tests/unit/test_comm.py`` fails if a
collective is called anywhere else in the package). A communicator is

* **on ``deepspeed.comm``**: ``all_reduce``, ``all_gather_into_tensor``, ``broadcast`` and ``barrier``
  are DeepSpeed's, so DeepSpeed's comms logger (``"comms_logger": {"enabled": true}``) sees our
  traffic under the ``log_name`` ``ds_ext/<kind>``, and whatever backend DeepSpeed runs (NCCL, gloo,
  CCL, HCCL) carries it. Process groups are made with ``torch.distributed.new_group`` here, the one
  exception, because ``deepspeed.comm.new_group`` cannot pass the run's collective timeout.
* **the one meter**: every collective names a ``kind``; its payload (numel x element size of the
  tensor this rank sends, after any wire-dtype cast: see ``CommMeter``) is added to the meter under
  that kind. ``kind=None`` is control traffic (non-finite flags, consistency digests,
  evaluation sums): not metered as training communication.
* **the one place tensors meet the communication device**: ``device`` is the engine's device
  (``cuda:<local rank>`` under NCCL; the parameters' device under gloo, which takes CPU and CUDA
  tensors). Every tensor handed to a collective must already be there (a ``ValueError`` naming the
  kind and both devices otherwise: NCCL would refuse a CPU tensor at run time, so the rule is
  checked on every backend); ``tensor()`` / ``zeros()`` build small control data on it.
* **one host read per step for control data**: ``exchange_control`` all-gathers small int64 vectors
  and reads them with ONE ``tolist()``; data posted with ``post_control`` (the engine's non-finite
  flags) rides along on the first exchange of the step, so a step whose reducer needs its own
  control exchange (ExDyna's counts) still reads the host once.
* **``communication_data_type``**: ``all_reduce_mean(..., wire=True)`` sends a gradient payload in
  ``wire_dtype`` (DeepSpeed's ``engine.communication_data_type``) and casts the result back.

Process-group start-up (``init_distributed``) lives here too: the run's collective timeout, handed to
every group this module creates, and the release of DeepSpeed's CPU shared-memory names (the reasons
are in ``docs/dev/notes/process-groups.md``).

``ds_ext.testing.LoopbackWorld`` simulates n ranks in one process over the same ``Communicator`` rules.
"""
from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

_OPS = ("sum", "max", "min")


@dataclass
class Collective:
    """One collective a method issues per optimizer step, as the cost model and ``collectives``
    classmethods describe traffic (ring algorithm for the wire bytes)."""

    op: str             # "all_reduce" | "all_gather"
    nbytes: float       # payload per rank: what the communication meter counts
    group: int          # ranks in the collective
    calls: float = 1.0  # per optimizer step (1/H for a period of H steps)

    def hops(self) -> float:
        g = self.group
        if g <= 1:
            return 0.0
        return 2.0 * (g - 1) if self.op == "all_reduce" else float(g - 1)

    def wire_bytes(self) -> float:
        """Bytes one rank sends on its link for this collective (ring algorithm)."""
        g = self.group
        if g <= 1:
            return 0.0
        factor = 2.0 * (g - 1) / g if self.op == "all_reduce" else float(g - 1)
        return factor * self.nbytes


class Handle:
    """An asynchronous collective: ``wait()`` completes it (and its post-processing, e.g. the division
    of a mean or the cast back from the wire dtype) and returns the result tensor."""

    __slots__ = ("_work", "_post", "result")

    def __init__(self, work, result: torch.Tensor, post: Optional[Callable[[], None]] = None):
        self._work, self._post, self.result = work, post, result

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._post is not None:
            post, self._post = self._post, None
            post()
        return self.result


def _dist():
    import torch.distributed as dist

    return dist


def _dscomm():
    import deepspeed.comm as dc

    return dc


def local_rank() -> int:
    """This process's rank on its node (the launcher's ``LOCAL_RANK``; 0 without one)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def bind_device() -> None:
    """Make this rank's own accelerator device (``LOCAL_RANK``) the current one, as DeepSpeed's engine
    does in ``initialize``, but before any collective: torch's object collectives stage on the current
    device, and DeepSpeed binds the default NCCL group to ``cuda:LOCAL_RANK``, so a collective made
    before the engine exists (the trainer's start-up verdicts, ``node_mpu``) on cuda:0 is refused on
    every rank but the first. Called by ``init_distributed`` and by every ``Communicator`` built on the
    default device; the CPU accelerator's ``set_device`` does nothing. With one visible device per process
    (``CUDA_VISIBLE_DEVICES`` narrowed by the launcher) the one device is used."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:  # deepspeed absent: CPU
        return
    acc = get_accelerator()
    want = local_rank()
    count = acc.device_count()
    if count and want >= count:
        want = want % count
    if str(acc.current_device()) != str(want):
        acc.set_device(want)


def default_device() -> torch.device:
    """This rank's accelerator device (``bind_device``; ``cpu`` with ``DS_ACCELERATOR=cpu``)."""
    try:
        from deepspeed.accelerator import get_accelerator

        bind_device()
        return torch.device(get_accelerator().current_device_name())
    except ImportError:  # deepspeed absent: CPU
        return torch.device("cpu")


def host_to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without a blocking pageable copy: pinned, then asynchronous on CUDA (a
    pageable copy, as ``torch.tensor(data, device=cuda)`` makes, synchronises the stream)."""
    device = torch.device(device)
    if device.type == "cuda":  # page-locked, so the copy is asynchronous (the caching host allocator keeps it)
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` (a tensor's device always carries its index)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


#: ``observer(comm, op, kind, tensor, async_op, issue)``: called in place of each collective of a communicator
#: (``op``: all_reduce, all_gather or broadcast; ``tensor``: the payload this rank sends; ``kind``: its meter kind,
#: None for control data); it must call ``issue()`` once and return its result (the backend's work handle with
#: ``async_op``, else None). Benchmarks time and record collectives with it (``benchmarks/cluster.py``,
#: ``benchmarks/train.py``).
Observer = Callable[["Communicator", str, Optional[str], torch.Tensor, bool, Callable[[], Any]], Any]
_OBSERVERS: List[Observer] = []


def observe(observer: Observer) -> Callable[[], None]:
    """Add a process-wide observer: every communicator's collectives (those built inside ``attach``, reducers and
    synchronizers too) go through it. Returns the function that removes it again."""
    _OBSERVERS.append(observer)

    def remove() -> None:
        if observer in _OBSERVERS:
            _OBSERVERS.remove(observer)

    return remove


#: pinned subgroups of the world group (``Communicator.subgroup(pin=True)``), for the default process group in
#: ``world``
_PINNED: dict = {"world": None, "groups": {}}


class Communicator:
    """Collectives over one process group, on one device, metered (see the module docstring)."""

    #: the most communicators ``subgroup`` keeps (each NCCL one holds GPU memory and threads)
    max_subgroups = 64

    #: called around each of this communicator's collectives (``observe`` for the call; class default: none)
    observer: Optional["Observer"] = None

    #: ``DS_EXT_FORCE_COLLECTIVES=1``: issue every collective even in a group of one (the GPU check pushes
    #: every ds_ext collective through a 1-rank NCCL group this way; ``run/gpu-check.sh``)
    force_collectives = False

    def __init__(self, group=None, device=None, meter=None, wire_dtype: Optional[torch.dtype] = None,
                 observer: Optional["Observer"] = None):
        self.group = group
        self.meter = meter
        self.observer = observer
        self.device = _indexed(torch.device(device) if device is not None else default_device())
        self.wire_dtype = wire_dtype
        dist = _dist()
        live = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if live else 1
        self.rank = dist.get_rank(group) if live else 0
        self.global_rank = dist.get_rank() if live else 0
        self.force_collectives = live and os.environ.get("DS_EXT_FORCE_COLLECTIVES", "") == "1"
        self._init_state()

    def _init_state(self) -> None:
        """Subgroup cache and control-exchange slots (shared with ``LoopbackComm``)."""
        self._subgroups: "OrderedDict[tuple, Optional[Communicator]]" = OrderedDict()
        self.subgroups_created = 0
        self._posted: Optional[torch.Tensor] = None
        self._collected: Optional[List[List[int]]] = None

    # -- properties ---------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.force_collectives

    def with_meter(self, meter) -> "Communicator":
        """The same group and device with another meter (``None``: unmetered)."""
        c = object.__new__(type(self))
        c.__dict__.update(self.__dict__)
        c.meter = meter
        return c

    # -- control data on the communication device ----------------------------------------------------
    def tensor(self, data, dtype=None) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def zeros(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=self.device)

    # -- metering and placement ------------------------------------------------------------------------
    def _check(self, t: torch.Tensor, kind: Optional[str]) -> None:
        if t.device != self.device:
            raise ValueError(f"ds_ext.comm: tensor for {kind or 'control data'!r} is on {t.device}, the communication "
                             f"device is {self.device} (NCCL refuses tensors off its device): build it on comm.device")
        if not t.is_contiguous():
            raise ValueError(f"ds_ext.comm: tensor for {kind or 'control data'!r} is not contiguous")

    def _count(self, kind: Optional[str], t: torch.Tensor, op: str) -> None:
        if kind is not None and self.meter is not None:
            self.meter.add(kind, t.numel() * t.element_size(), op=op)

    def record(self, kind: str, nbytes: int, op: Optional[str] = None) -> None:
        """Traffic another layer sent for us (reducer ``deepspeed``: DeepSpeed's own allreduce, which
        its comms logger sees directly), entered in the same meter (``op``: its collective, where known)."""
        if self.meter is not None:
            self.meter.add(kind, nbytes, op=op)

    # -- collectives -----------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, kind: Optional[str] = None, op: str = "sum", async_op: bool = False):
        """In place over the group (``op``: sum, max or min). Returns ``t`` (or a ``Handle`` with ``async_op``)."""
        if op not in _OPS:
            raise ValueError(f"ds_ext.comm: all_reduce op {op!r} for {kind or 'control data'!r}; allowed: "
                             f"{', '.join(_OPS)}")
        self._check(t, kind)
        self._count(kind, t, "all_reduce")
        work = (self._issue("all_reduce", kind, t, async_op, lambda: self._all_reduce(t, op, async_op, kind))
                if self.distributed else None)
        return Handle(work, t) if async_op else t

    def all_reduce_mean(self, t: torch.Tensor, kind: Optional[str] = None, async_op: bool = False,
                        wire: bool = False):
        """In place: the mean over the group (sum, then division by the group size, in ``t``'s dtype, as
        DeepSpeed's own allreduce). ``wire``: send in ``wire_dtype`` when it differs from ``t``'s dtype
        (DeepSpeed's ``communication_data_type``) and cast the mean back into ``t``."""
        self._check(t, kind)
        n = self.world_size
        send = t
        if wire and self.distributed and self.wire_dtype is not None and self.wire_dtype != t.dtype:
            send = t.to(self.wire_dtype)
        self._count(kind, send, "all_reduce")  # what crosses the network
        if not self.distributed:
            return Handle(None, t) if async_op else t
        work = self._issue("all_reduce", kind, send, async_op, lambda: self._all_reduce(send, "sum", async_op, kind))

        def post():
            send.div_(n)
            if send is not t:
                t.copy_(send)

        if async_op:
            return Handle(work, t, post)
        post()
        return t

    def all_gather(self, t: torch.Tensor, kind: Optional[str] = None, async_op: bool = False):
        """Every rank's ``t`` stacked: ``[world, *t.shape]`` (one ``all_gather_into_tensor``)."""
        self._check(t, kind)
        self._count(kind, t, "all_gather")
        out = torch.empty((self.world_size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        if not self.distributed:
            out[0].copy_(t)
            return Handle(None, out) if async_op else out
        work = self._issue("all_gather", kind, t, async_op, lambda: self._all_gather(out, t, async_op, kind))
        return Handle(work, out) if async_op else out

    def broadcast(self, t: torch.Tensor, src: int = 0, kind: Optional[str] = None) -> torch.Tensor:
        """In place from group rank ``src``."""
        self._check(t, kind)
        self._count(kind, t, "broadcast")
        if self.distributed:
            self._issue("broadcast", kind, t, False, lambda: self._broadcast(t, src, kind))
        return t

    def barrier(self) -> None:
        if self.distributed:
            self._barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj`` (benchmarks' results; not for per-step paths)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        _dscomm().all_gather_object(out, obj, group=self.group)
        return out

    # -- control exchange: one host read per step -----------------------------------------------------
    def post_control(self, t: torch.Tensor) -> None:
        """Leave a small int64 vector (same length on every rank) to ride on this step's next
        ``exchange_control``; ``collect_control`` returns every rank's copy."""
        self._check(t, None)
        self._posted, self._collected = t, None

    def exchange_control(self, t: Optional[torch.Tensor], kind: Optional[str] = None) -> List[List[int]]:
        """All-gather a small int64 vector from every rank and read it on the host (one ``tolist``).
        Posted data rides along (and is kept for ``collect_control``). ``kind`` meters (and names, for
        DeepSpeed's comms logger) the whole exchange, posted flags included: what crosses the network
        in that one collective; an exchange of posted data alone is control traffic."""
        parts = [x for x in (t, self._posted) if x is not None]
        if not parts:
            return [[] for _ in range(self.world_size)]
        for x in parts:
            self._check(x, None)
        flat = torch.cat([x.reshape(-1).to(torch.int64) for x in parts]) if len(parts) > 1 else \
            parts[0].reshape(-1).to(torch.int64)
        rows = self.all_gather(flat, kind if t is not None else None).tolist()  # the one host read
        k = 0 if t is None else t.numel()
        if self._posted is not None:
            self._collected = [r[k:] for r in rows]
            self._posted = None
        return [r[:k] for r in rows]

    def amend_posted(self, t: torch.Tensor) -> bool:
        """Append ``t`` (int64-convertible, device) to this step's posted vector if it has not been exchanged
        yet (True: it rides on the same collective and host read), else False (nothing posted, or a method's
        exchange already carried it)."""
        if self._posted is None:
            return False
        self._check(t, None)
        self._posted = torch.cat([self._posted.reshape(-1).to(torch.int64), t.reshape(-1).to(torch.int64)])
        return True

    def take_posted(self) -> Optional[torch.Tensor]:
        """Take this step's posted vector over (None when nothing is posted), for a caller that carries it on
        its own collectives (a hierarchical reducer relays it through the node and cross-node exchanges); that
        caller hands every rank's rows back with ``deliver_control``."""
        t, self._posted = self._posted, None
        return t

    def deliver_control(self, rows: List[List[int]]) -> None:
        """Every rank's posted vector, relayed by the caller of ``take_posted``: ``collect_control`` returns it."""
        self._collected = rows

    def collect_control(self) -> Optional[List[List[int]]]:
        """Every rank's posted vector (exchanged now unless a method's exchange already carried it)."""
        if self._collected is None and self._posted is not None:
            self.exchange_control(None)
        got, self._collected = self._collected, None
        return got

    # -- groups -----------------------------------------------------------------------------------------
    def subgroup(self, members: Sequence[int], pin: bool = False) -> Optional["Communicator"]:
        """Collective (every rank calls it, in the same order, for every member set): a communicator
        over the given ranks of this group, ``None`` on ranks outside it. Cached; at most
        ``max_subgroups`` are kept (the least recently used one is destroyed past that, on every rank
        alike, since every rank makes the same calls). ``pin``: kept for the life of the process group and
        never evicted; pinned subgroups of the world group are shared by every communicator of the
        process (``node_mpu`` and ``attach`` make the node groups once, not once each)."""
        key = tuple(sorted(int(r) for r in members))
        if pin:
            store = self._pin_store()
            if key not in store:
                store[key] = self._new_subgroup(key)
                self.subgroups_created += 1
            return self._adopt(store[key])
        if key in self._subgroups:
            self._subgroups.move_to_end(key)
            return self._subgroups[key]
        sub = self._new_subgroup(key)
        self.subgroups_created += 1
        self._subgroups[key] = sub
        while len(self._subgroups) > self.max_subgroups:
            _, old = self._subgroups.popitem(last=False)
            self._destroy_subgroup(old)
        return sub

    def _pin_store(self) -> dict:
        """Where pinned subgroups live: process-wide for the world group (reset when the default process group
        is a new one), per communicator otherwise."""
        if self.group is None:
            world = _dist().group.WORLD
            if _PINNED["world"] is not world:
                _PINNED["world"], _PINNED["groups"] = world, {}
            return _PINNED["groups"]
        return self.__dict__.setdefault("_pinned", {})

    def _adopt(self, sub: Optional["Communicator"]) -> Optional["Communicator"]:
        """A pinned subgroup with this communicator's meter, observer and wire dtype (its own control slots)."""
        if sub is None:
            return None
        c = object.__new__(type(sub))
        c.__dict__.update(sub.__dict__)
        c.meter, c.observer, c.wire_dtype = self.meter, self.observer, self.wire_dtype
        c._init_state()
        return c

    @property
    def live_subgroups(self) -> int:
        """Subgroups alive in the cache (pinned ones not counted)."""
        return len(self._subgroups)

    # -- observers ----------------------------------------------------------------------------------------
    def _issue(self, op: str, kind: Optional[str], t: torch.Tensor, async_op: bool, issue: Callable[[], Any]):
        """Run ``issue`` (the backend primitive) through the process-wide observers (``observe``, outermost first)
        and then this communicator's own; returns what the primitive returned (its work, or None)."""
        if not _OBSERVERS and self.observer is None:  # the training path: no benchmark is listening
            return issue()
        observers = _OBSERVERS + ([self.observer] if self.observer is not None else [])
        for obs in reversed(observers):
            issue = functools.partial(obs, self, op, kind, t, async_op, issue)
        return issue()

    # -- backend primitives (deepspeed.comm); LoopbackComm overrides these ------------------------------
    def _all_reduce(self, t, op, async_op, kind):
        dc = _dscomm()
        return dc.all_reduce(t, op=getattr(dc.ReduceOp, op.upper()), group=self.group, async_op=async_op,
                             log_name=f"ds_ext/{kind or 'control'}")

    def _all_gather(self, out, t, async_op, kind):
        return _dscomm().all_gather_into_tensor(out.view(-1), t.reshape(-1), group=self.group, async_op=async_op,
                                                log_name=f"ds_ext/{kind or 'control'}")

    def _broadcast(self, t, src, kind):
        dist = _dist()
        gsrc = dist.get_global_rank(self.group, src) if self.group is not None else src
        _dscomm().broadcast(t, gsrc, group=self.group, log_name=f"ds_ext/{kind or 'control'}")

    def _barrier(self):
        _dscomm().barrier(group=self.group)

    def _new_subgroup(self, key: tuple) -> Optional["Communicator"]:

        dist = _dist()
        ranks = [dist.get_global_rank(self.group, r) for r in key] if self.group is not None else list(key)
        t = collective_timeout()
        pg = dist.new_group(ranks) if t is None else dist.new_group(ranks, timeout=t)
        if self.rank not in key:
            return None
        return Communicator(pg, device=self.device, meter=self.meter, wire_dtype=self.wire_dtype,
                            observer=self.observer)

    def _destroy_subgroup(self, sub: Optional["Communicator"]) -> None:
        if sub is not None and sub.group is not None:
            try:
                _dist().destroy_process_group(sub.group)
            except Exception as e:  # a backend that cannot destroy one group: keep going, say so once
                log.debug("could not destroy a DS-Sync process group: %s", e)


def world() -> Communicator:
    """A communicator over the default (world) group on this rank's accelerator device, unmetered
    (start-up barriers, checkpoint barriers, benchmarks)."""
    return Communicator()


def barrier() -> None:
    """Collective: a barrier over the world (no-op without a process group)."""
    Communicator().barrier()


def gather_objects(obj) -> list:
    """Collective: every rank's picklable ``obj`` over the world, in rank order (``[obj]`` without a
    process group). For start-up and checkpoint verdicts; never per step."""
    return Communicator().all_gather_object(obj)


def for_params(params, group=None, meter=None, device=None) -> Communicator:
    """A communicator on the parameters' device (methods built without ``attach``: benchmarks, tests)."""
    if device is None:
        device = params[0].device if params else None
    return Communicator(group, device=device, meter=meter)


# ============================================================================== process-group start-up
_TIMEOUT: Optional[timedelta] = None  # what init_distributed was given (None: DeepSpeed's default)


def _shm_name(rank: int) -> str:
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names() -> None:
    """Collective. Unlink this rank's DeepSpeed CPU shm segment name once every rank has mapped it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    path = _shm_name(dist.get_rank())
    if not os.path.exists(path):
        return
    barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def standalone_env(environ=os.environ) -> bool:
    """Run without any launcher (``python -m ds_ext.train ...``, how people debug): then the process
    is rank 0 of a world of 1. Sets the launcher's variables (a free local port) and returns True;
    leaves a launched or MPI-started process alone (returns False). Without this DeepSpeed would try
    MPI discovery and die importing ``mpi4py``."""
    if any(k in environ for k in _LAUNCHER_ENV) or any(k in environ for k in _MPI_ENV):
        return False
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return True


def init_distributed(timeout_s: Optional[float] = None, backend: Optional[str] = None) -> None:
    """``deepspeed.init_distributed`` (with a collective timeout, seconds; DeepSpeed's 10 min or
    ``$DEEPSPEED_TIMEOUT`` minutes when None) without leaving shm behind. Without a launcher the
    process runs as world size 1 (``standalone_env``)."""
    import deepspeed

    standalone_env()
    bind_device()

    kw = {}
    if timeout_s is not None:
        kw["timeout"] = timedelta(seconds=timeout_s)
    if backend is not None:
        kw["dist_backend"] = backend
    from .build_lock import watch  # a long wait (DeepSpeed's CPU comm op build, the rendezvous) says what it is
    rdzv = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    with watch(f"deepspeed.init_distributed (rendezvous at {rdzv})"):
        deepspeed.init_distributed(**kw)
    global _TIMEOUT
    _TIMEOUT = kw.get("timeout")
    release_shm_names()


def collective_timeout() -> Optional[timedelta]:
    """The timeout the default process group was started with here (None when DeepSpeed chose it)."""
    return _TIMEOUT


