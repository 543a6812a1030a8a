"""Node-aware ("hierarchical") communication: exact averaging inside a node, the method's compressed
exchange only between nodes, every rank of a node carrying a share of it.

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/hierarchy.md``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .comm import Collective, Communicator, host_to_device
from .reducers.base import Reducer
from .registry import NoOptions
from .topology import Topology, balanced_shards, node_communicators, numel_of, ranks_text

log = logging.getLogger(__name__)

NODE_PREFIX = "node"
NODE_MEAN = "node_mean"
NODE_GATHER = "node_gather"

# ================================================================================================ reducer
def inner_problem(inner_cls) -> Optional[str]:
    """Why a reducer class cannot be wrapped (None when it can)."""
    name = getattr(inner_cls, "__name__", repr(inner_cls))
    if not isinstance(inner_cls, type) or not issubclass(inner_cls, Reducer):
        return f"hierarchical: {name} is not a reducer class"
    if not inner_cls.replaces_engine_allreduce:
        return (f"hierarchical: {name} keeps DeepSpeed's own allreduce over the whole world; wrap a reducer that "
                f"communicates itself ({', '.join(wrappable_reducers())})")
    if not inner_cls.communicates_gradients:
        return (f"hierarchical: {name} exchanges no gradients; for local methods use HierarchicalAveraging in the "
                f"synchronizer instead")
    if inner_cls.observes_microbatches:
        return f"hierarchical: {name} consumes every microbatch gradient over the whole world and cannot be sharded"
    return None


def wrappable_reducers() -> List[str]:
    """The registered reducers ``HierarchicalReducer`` can wrap (``inner_problem``'s conditions), sorted."""
    from .registry import REDUCERS

    def ok(c) -> bool:
        return c.replaces_engine_allreduce and c.communicates_gradients and not c.observes_microbatches

    classes = {n: REDUCERS.get(n).factory for n in REDUCERS.names()}
    return sorted(n for n, c in classes.items() if issubclass(c, Reducer) and ok(c))


class HierarchicalReducer(Reducer):
    """Exact node mean, the wrapped method on this rank's shard between nodes, node gather (module docstring).

    ``build_inner(named_params_subset, cross_comm) -> Reducer`` builds the wrapped method; ``inner_cls`` is
    its class (every rank, an empty-shard one too, takes ``replaces_engine_allreduce``, ``uses_kernels`` and
    ``communicates_gradients`` from it). ``kind_prefix``: the node kinds are ``<prefix>_mean`` and
    ``<prefix>_gather``."""

    def __init__(self, named_params, comm: Communicator, topology: Topology,
                 build_inner: Callable[[list, Communicator], Reducer], inner_cls, kind_prefix: str = NODE_PREFIX,
                 options=None, engine=None):
        problem = inner_problem(inner_cls)
        if problem:
            raise ValueError(problem)
        super().__init__(named_params, options if options is not None else NoOptions(), comm=comm, engine=engine)
        self.inner_cls = inner_cls
        self.replaces_engine_allreduce = inner_cls.replaces_engine_allreduce
        self.uses_kernels = inner_cls.uses_kernels
        self.communicates_gradients = inner_cls.communicates_gradients
        self.topology = topo = topology
        self.kind_mean, self.kind_gather = f"{kind_prefix}_mean", f"{kind_prefix}_gather"
        self.node_comm, self.cross_comm = node_communicators(self.comm, topo)

        self.numels = [p.numel() for p in self.params]
        self.shards = balanced_shards(self.numels, topo.local_size)
        self.shard = self.shards[topo.local_rank]
        self.shard_names = [self.named_params[i][0] for i in self.shard]
        self._layouts = [self._layout(s) for s in self.shards]
        self.max_shard = max((lay[-1][1] + lay[-1][2] for lay in self._layouts if lay), default=0)

        self.inner: Optional[Reducer] = None
        error = None
        if topo.n_nodes == 1 and topo.local_size > 1:  # nothing crosses a node: the exact node mean is the answer
            log.info("hierarchical: one node of %d ranks; gradients are averaged exactly, %s is not used",
                     topo.local_size, inner_cls.__name__)
        elif self.shard:
            try:
                self.inner = build_inner([self.named_params[i] for i in self.shard], self.cross_comm)
            except Exception as e:  # noqa: BLE001 -- re-raised below, after every rank has said how it went
                error = e
        if self.comm.distributed:  # one control exchange at attach: every rank stops, or none does
            rows = self.comm.exchange_control(self.comm.tensor([0 if error is None else 1], dtype=torch.int64))
            failed = [r for r, row in enumerate(rows) if row[0]]
        else:
            failed = [self.rank] if error is not None else []
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"hierarchical: building {inner_cls.__name__} on the parameter shard of rank(s) "
                             f"{ranks_text(failed)} failed (see that rank's error); every rank stops")

        dev = self.comm.device
        if topo.local_size > 1 and self.params:
            self._mean = torch.zeros(sum(self.numels), device=dev)
            self._mean_views = list(self._mean.split(self.numels))
            self._send = torch.zeros(self.max_shard, device=dev)  # the padding tail stays zero
        mine = self._layouts[topo.local_rank]
        self._send_views = [self._send[off:off + n] for _, off, n in mine] if topo.local_size > 1 and mine else []

    def _layout(self, shard: List[int]) -> List[Tuple[int, int, int]]:
        """``(parameter index, offset, numel)`` of a shard's parameters in its gather slot."""
        out, off = [], 0
        for i in shard:
            out.append((i, off, self.numels[i]))
            off += self.numels[i]
        return out

    # -- the step -----------------------------------------------------------------------------------
    def grad_ready(self, p) -> None:
        """Nothing to do during backward: the node mean needs every gradient (no overlap in hierarchical
        mode). With one rank per node the wrapped method (whose shard is everything) gets it directly."""
        if self.topology.local_size == 1 and self.inner is not None:
            self.inner.grad_ready(p)

    def finish(self) -> None:
        topo = self.topology
        if topo.local_size == 1:  # no node links: exactly the wrapped method over the (cross-node) world
            if self.inner is not None:
                self.inner.finish()
            return
        if not self.params:
            return
        # the engine's control data (non-finite flags, stop vote) posted on the world communicator rides on (a),
        # the wrapped method's cross-node exchange and (c): one host read per step (issue 27 N4)
        posted = self.comm.take_posted() if topo.n_nodes > 1 else None
        slots = self._control_slots(posted)
        # (a) exact node mean of every gradient: one fused fp32 all_reduce inside the node
        _pack_grads(self._mean_views, self.params)
        if posted is not None:
            self._mean[self._n_grad:].copy_(slots)
        self.node_comm.all_reduce_mean(self._mean, self.kind_mean)
        if topo.n_nodes == 1:  # one node: the exact mean is every gradient's result
            for p, v in zip(self.params, self._mean_views):
                _write(p, v)
            return
        # (b) the wrapped method on this rank's shard, across nodes, fed as backward would feed it
        rows = None
        if self.inner is not None:
            for i in self.shard:
                _write(self.params[i], self._mean_views[i])
            if posted is not None:  # the node's sums of every rank's slot, aboard the cross-node exchange
                node_sum = self._mean[self._n_grad:].mul(topo.local_size).round_().to(torch.int64)
                self.cross_comm.post_control(node_sum)
            for i in reversed(self.shard):
                self.inner.grad_ready(self.params[i])
            self.inner.finish()
            _pack_grads(self._send_views, [self.params[i] for i, _, _ in self._layouts[topo.local_rank]])
            if posted is not None:
                rows = [sum(col) for col in zip(*self.cross_comm.collect_control())]  # every node's sums added
                self._send[self.max_shard:].copy_(host_to_device(torch.tensor(rows, dtype=torch.float32),
                                                                 self._send.device))
        # (c) every local rank's shard result to every rank of the node: one fused all_gather
        got = self.node_comm.all_gather(self._send, self.kind_gather)  # [local_size, max_shard]
        for j, lay in enumerate(self._layouts):
            if j == topo.local_rank:
                continue
            for i, off, n in lay:
                _write(self.params[i], got[j, off:off + n])
        if posted is not None:
            if rows is None:  # no shard here: a node peer that has one brought the world's rows
                rows = got[self._relay_from, self.max_shard:].round().to(torch.int64).tolist()
            m = posted.numel()
            self.comm.deliver_control([rows[r * m:(r + 1) * m] for r in range(self.comm.world_size)])

    def _control_slots(self, posted: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``posted`` in this rank's slot of a zero vector of ``world x len(posted)`` (fp32, exact for the small
        counts posted); the node mean and the gather buffers grow a tail of that size the first time."""
        if posted is None:
            return None
        m, world = posted.numel(), self.comm.world_size
        if getattr(self, "_slot_m", None) != m:
            self._slot_m, self._n_grad = m, sum(self.numels)
            dev = self.comm.device
            self._mean = torch.zeros(self._n_grad + world * m, device=dev)
            self._mean_views = list(self._mean[:self._n_grad].split(self.numels))
            self._send = torch.zeros(self.max_shard + world * m, device=dev)
            mine = self._layouts[self.topology.local_rank]
            self._send_views = [self._send[off:off + n] for _, off, n in mine]
            self._relay_from = next(j for j, s in enumerate(self.shards) if s)
        slots = self._mean.new_zeros(world * m)
        slots[self.comm.rank * m:(self.comm.rank + 1) * m] = posted.reshape(-1)
        return slots

    # -- what attach says -----------------------------------------------------------------------------
    @property
    def registered_name(self) -> str:
        from .registry import REDUCERS

        return REDUCERS.name_of_class(self.inner_cls) or self.inner_cls.__name__

    def warmup(self):
        return self.inner.warmup() if self.inner is not None else None

    def describe(self, total_steps=None) -> str:
        """Attach's line: the node mean, then the wrapped method's own line for this rank's shard between nodes."""
        t = self.topology
        head = (f"hierarchical {self.registered_name}: exact gradient mean inside each node ({t.local_size} ranks "
                f"x {t.n_nodes} nodes)")
        if self.inner is None:
            return head + (f"; {self.registered_name} not used (one node)" if t.n_nodes == 1 else
                           "; this rank's shard is empty")
        return f"{head}; between nodes, this rank's shard: {self.inner.describe(total_steps)}"

    # -- state --------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return self.inner.stats() if self.inner is not None else {}

    def reset_nonfinite(self) -> None:
        """A skipped step (the guard's local view: every rank's flag rode on the node and cross-node exchanges):
        the wrapped method's state, which may have absorbed the value, reset."""
        if self.inner is not None:
            self.inner.reset_nonfinite()

    def state_dict(self) -> dict:
        t = self.topology
        return {"inner": self.inner.state_dict() if self.inner is not None else None, "shard": list(self.shard_names),
                "local_size": t.local_size, "n_nodes": t.n_nodes, "local_rank": t.local_rank}

    def load_state_dict(self, state: dict) -> None:
        t = self.topology
        saved = (state.get("local_size"), state.get("n_nodes"))
        if saved != (t.local_size, t.n_nodes):
            raise ValueError(f"hierarchical reducer state was saved with {saved[0]} ranks per node on {saved[1]} "
                             f"node(s), this run has {t.local_size} on {t.n_nodes}: shards and error feedback are "
                             f"per rank, resume with the same hostfile layout")
        if list(state.get("shard") or []) != self.shard_names:
            raise ValueError(f"hierarchical reducer state of rank {self.rank} is for a parameter shard of "
                             f"{len(state.get('shard') or [])} parameter(s) {_names(state.get('shard'))}, this rank "
                             f"owns {len(self.shard_names)} {_names(self.shard_names)}: the model differs")
        if self.inner is not None:
            self.inner.load_state_dict(state["inner"])

    # -- cost model ---------------------------------------------------------------------------------
    @classmethod
    def collectives(cls, shapes, world: int, options, local_size: int = 1, inner_cls=None,
                    local_rank: Optional[int] = None, **model) -> list:
        """``hierarchical_collectives(inner_cls, shapes, world, local_size, options, local_rank, **model)``."""
        if inner_cls is None:
            raise ValueError("HierarchicalReducer.collectives needs inner_cls (the wrapped reducer class)")
        return hierarchical_collectives(inner_cls, shapes, world, local_size, options, local_rank=local_rank,
                                        **model)


def _pack_grads(views: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter]) -> None:
    """Each ``p.grad`` into its 1-D view of a flat buffer (one fused copy); a missing gradient as zeros."""
    dst, src = [], []
    for v, p in zip(views, params):
        if p.grad is None:
            v.zero_()
        else:
            dst.append(v)
            src.append(p.grad.detach().reshape(-1))
    if dst:
        torch._foreach_copy_(dst, src)


def _write(p: torch.nn.Parameter, flat: torch.Tensor) -> None:
    """``p.grad`` <- ``flat`` (a 1-D fp32 view), in ``p``'s dtype; a missing gradient is created."""
    v = flat.view(p.shape)
    if p.grad is None:
        p.grad = v.to(p.dtype).clone()
    else:
        p.grad.copy_(v)


def _names(names) -> str:
    names = list(names or [])
    return "[" + ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "") + "]"


def build_hierarchical(name: str, options, named_params, comm: Communicator, topology: Optional[Topology] = None,
                       engine=None, kind_prefix: str = NODE_PREFIX) -> HierarchicalReducer:
    """``REDUCERS``' ``name`` (options validated as for a flat run) wrapped in a ``HierarchicalReducer``;
    ``topology`` defaults to ``Topology.from_env(comm)`` (collective)."""
    from .registry import REDUCERS, load_builtin

    load_builtin()
    entry = REDUCERS.get(name)
    opts = REDUCERS.validated(name, options)
    topo = topology if topology is not None else Topology.from_env(comm)

    def build(subset, cross):
        return REDUCERS.build(name, opts, subset, comm=cross, engine=engine)

    return HierarchicalReducer(named_params, comm, topo, build, entry.factory, kind_prefix=kind_prefix,
                               options=opts, engine=engine)


# ============================================================================================== cost model
@dataclass
class NodeCollective(Collective):
    """A collective among the ranks of one node (fast links): a cost model can price it apart."""

    intra_node = True  # class attribute, not a field: equality and repr stay Collective's


def _shard_shapes(shapes, local_size: int, local_rank: Optional[int], cost) -> Tuple[list, list]:
    shards = balanced_shards([numel_of(s) for s in shapes], local_size)
    if local_rank is None:  # the busiest local rank sets the pace
        local_rank = max(range(local_size), key=lambda j: (cost([shapes[i] for i in shards[j]]), -j))
    return [shapes[i] for i in shards[local_rank]], shards


def hierarchical_collectives(inner_cls, shapes, world: int, local_size: int, options, local_rank: Optional[int] = None,
                             **model) -> list:
    """What one rank issues per step in hierarchical mode (fp32, 4 bytes per element, as
    ``ds_ext.comm.Collective``): the node mean (all_reduce of every gradient, group ``local_size``), the
    wrapped method's collectives for the shard of ``local_rank`` at group ``world / local_size`` (default:
    the local rank whose shard costs the most wire bytes), and the node gather (all_gather of the largest
    shard, group ``local_size``). Node collectives are ``NodeCollective``. ``local_size`` 1: the wrapped
    method's own."""
    if local_size < 1 or world % local_size:
        raise ValueError(f"hierarchical: world size {world} is not a multiple of {local_size} ranks per node")
    n_nodes = world // local_size
    if local_size == 1:
        return list(inner_cls.collectives(shapes, world, options, **model))
    if n_nodes == 1:  # the exact node mean only
        return [NodeCollective("all_reduce", 4 * sum(numel_of(s) for s in shapes), local_size)]

    def cost(sub):
        colls = inner_cls.collectives(sub, n_nodes, options, **model) if sub else []
        return (sum(c.wire_bytes() * c.calls for c in colls), sum(c.nbytes * c.calls for c in colls))

    mine, shards = _shard_shapes(list(shapes), local_size, local_rank, cost)
    numels = [numel_of(s) for s in shapes]
    out: list = [NodeCollective("all_reduce", 4 * sum(numels), local_size)]
    if mine:
        out += list(inner_cls.collectives(mine, n_nodes, options, **model))
    out.append(NodeCollective("all_gather", 4 * max(sum(numels[i] for i in s) for s in shards), local_size))
    return out


def intra_node_bytes(meter, prefix: str = NODE_PREFIX) -> int:
    """Bytes metered under the node kinds (``<prefix>_mean``, ``<prefix>_gather``, ...)."""
    return sum(v for k, v in meter.by_kind.items() if k.startswith(prefix + "_"))


def cross_node_bytes(meter, prefix: str = NODE_PREFIX) -> int:
    """Bytes metered under every other kind: in hierarchical mode, what crosses between nodes."""
    return sum(v for k, v in meter.by_kind.items() if not k.startswith(prefix + "_"))


# ============================================================================== local methods (Local SGD)
class HierarchicalAveraging:
    """Two-level averaging for parameter-averaging synchronizers (``ds_ext/sync/averaging.py``).

    * ``node_gradient_mean(params)`` every step, before the optimizer step: gradients averaged exactly
      inside the node (kind ``node_mean``), so the ranks of a node stay identical and the node acts as
      one worker with a node-sized batch;
    * ``average_across_nodes(tensors)`` on the period rule: each local rank averages its shard of the
      tensors (``balanced_shards`` on numel) over its cross-node communicator (``average``, kind
      ``param_allreduce``), then the shards are all-gathered inside the node (kind ``node_gather``).

    Construction is collective (``node_communicators``)."""

    def __init__(self, comm: Communicator, topology: Topology, kind_prefix: str = NODE_PREFIX):
        self.comm, self.topology = comm, topology
        self.kind_mean, self.kind_gather = f"{kind_prefix}_mean", f"{kind_prefix}_gather"
        self.node_comm, self.cross_comm = node_communicators(comm, topology)
        self._bufs: Dict[tuple, torch.Tensor] = {}

    def _buffer(self, key: tuple, numel: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() != numel:
            buf = self._bufs[key] = torch.zeros(numel, device=self.comm.device)
        return buf

    def node_gradient_mean(self, params: Sequence[torch.nn.Parameter],
                           flag: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Collective inside the node: every ``p.grad`` <- the node's mean (fp32 sum / local_size, written
        back in the gradient's dtype; a missing gradient counts as zeros and is created). ``flag`` (a 0-dim
        tensor on the device, e.g. the non-finite guard's) rides as one extra element of the same all_reduce
        (4 more bytes); the node's sum of it comes back (0-dim fp32, device, never read here), so a local
        skip verdict can be shared by the node without another collective. No-op with one rank per node
        (``flag`` comes back unchanged)."""
        if self.topology.local_size == 1:
            return flag
        params = list(params)
        numels = [p.numel() for p in params]
        total = sum(numels) + (1 if flag is not None else 0)
        if total == 0:
            return flag
        buf = self._buffer(("mean",), total)
        views = list(buf[:sum(numels)].split(numels)) if numels else []
        _pack_grads(views, params)
        if flag is not None:
            buf[-1:].copy_(flag.reshape(1))
        if flag is None:
            self.node_comm.all_reduce_mean(buf, self.kind_mean)
        else:  # the flag is summed, not averaged
            self.node_comm.all_reduce(buf, self.kind_mean)
            buf[:-1].div_(self.topology.local_size)
        for v, p in zip(views, params):
            _write(p, v)
        return buf[-1].clone() if flag is not None else None

    def average_across_nodes(self, tensors: Sequence[torch.Tensor]) -> None:
        """Collective over the world: ``tensors`` (parameters, moments, buffers: the synchronizer's
        ``_tensors()``, identical inside a node) <- their mean over the nodes, in place. Local rank j
        averages shard j over its cross-node communicator, then the node gathers the shards."""
        from .sync.averaging import average

        topo = self.topology
        if topo.n_nodes == 1:  # the ranks of the node already agree
            return
        tensors = list(tensors)
        numels = [t.numel() for t in tensors]
        shards = balanced_shards(numels, topo.local_size)
        mine = [tensors[i] for i in shards[topo.local_rank]]
        average(mine, self.cross_comm, topo.n_nodes)  # kind param_allreduce
        if topo.local_size == 1:
            return
        slot = max(sum(numels[i] for i in s) for s in shards)
        if slot == 0:
            return
        send = self._buffer(("gather",) + tuple(numels), slot)
        off = 0
        dst, src = [], []
        for t in mine:
            dst.append(send[off:off + t.numel()])
            src.append(t.detach().reshape(-1))
            off += t.numel()
        if dst:
            torch._foreach_copy_(dst, src)
        got = self.node_comm.all_gather(send, self.kind_gather)  # [local_size, slot]
        for j, shard in enumerate(shards):
            if j == topo.local_rank:
                continue
            off = 0
            dst, src = [], []
            for i in shard:
                t = tensors[i]
                dst.append(t)
                src.append(got[j, off:off + t.numel()].view(t.shape))
                off += t.numel()
            if dst:
                torch._foreach_copy_(dst, src)

    @staticmethod
    def collectives(shapes, world: int, local_size: int, options, lr: float = 0.0,
                    local_rank: Optional[int] = None) -> list:
        """A synchronizer's traffic per optimizer step in hierarchical mode (fp32): the node gradient mean
        every step (``NodeCollective``), the cross-node parameter all_reduce of the shard of ``local_rank``
        (default: the largest) every H steps, the node gather of the largest shard every H steps. As
        ``LocalSync.collectives``, only the parameters are counted (not moments or buffers)."""
        from .sync.averaging import _averaging_collectives

        if local_size < 1 or world % local_size:
            raise ValueError(f"hierarchical: world size {world} is not a multiple of {local_size} ranks per node")
        n_nodes = world // local_size
        numels = [numel_of(s) for s in shapes]
        out: list = []
        if local_size > 1:
            out.append(NodeCollective("all_reduce", 4 * sum(numels), local_size))
        if n_nodes == 1:
            return out
        mine, shards = _shard_shapes(list(shapes), local_size, local_rank, lambda sub: sum(numel_of(s) for s in sub))
        cross = _averaging_collectives(mine, n_nodes, options, lr)
        out += cross
        if local_size > 1:
            out.append(NodeCollective("all_gather", 4 * max(sum(numels[i] for i in s) for s in shards), local_size,
                                      cross[0].calls))
        return out
