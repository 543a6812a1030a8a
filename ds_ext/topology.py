"""Where each rank sits in a multi-node run, and the node-aware communicators built from it.

Global ranks are node-major, ``rank = node * local_size + local_rank``, which is how the ``deepspeed``
launcher numbers the slots of a hostfile (it also sets ``LOCAL_RANK`` / ``LOCAL_SIZE`` per node, and
``CROSS_RANK`` / ``CROSS_SIZE``: node index, node count; torchrun's ``LOCAL_WORLD_SIZE`` / ``GROUP_RANK``
are read too). ``Topology.from_env`` reads them and checks them with one control exchange. Used by
hierarchical mode (``ds_ext/hierarchy.py``) and by ZeRO partitioned within a node (``ds_ext/deepspeed/zero.py``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from .comm import Communicator

log = logging.getLogger(__name__)

_ENV_KEYS = ("LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")
#: torchrun's names for the same (``LOCAL_WORLD_SIZE``: ranks on this node; ``GROUP_RANK``: the node's index)
_TORCHRUN_KEYS = (("LOCAL_SIZE", "LOCAL_WORLD_SIZE"), ("CROSS_RANK", "GROUP_RANK"))
_MISSING, _MALFORMED = -1, -2


# ================================================================================================ layout
@dataclass(frozen=True)
class Topology:
    """Where this rank sits: node-major ranks, ``rank = node * local_size + local_rank``."""

    rank: int
    world: int
    node: int
    local_rank: int
    local_size: int
    n_nodes: int

    def __post_init__(self):
        ls = self.local_size
        if ls < 1 or self.world < 1 or self.world % ls:
            raise ValueError(f"hierarchical: world size {self.world} is not a positive multiple of {ls} ranks per node")
        if not 0 <= self.rank < self.world or self.n_nodes != self.world // ls \
                or (self.node, self.local_rank) != divmod(self.rank, ls):
            raise ValueError(f"hierarchical: inconsistent topology {self}: ranks are node-major, "
                             f"rank = node * local_size + local_rank")

    def node_members(self, node: Optional[int] = None) -> List[int]:
        """The global ranks of ``node`` (default: this rank's)."""
        k = self.node if node is None else node
        return list(range(k * self.local_size, (k + 1) * self.local_size))

    def cross_members(self, local_rank: Optional[int] = None) -> List[int]:
        """The global ranks with local rank ``local_rank`` (default: this rank's), one per node."""
        j = self.local_rank if local_rank is None else local_rank
        return [k * self.local_size + j for k in range(self.n_nodes)]

    @classmethod
    def explicit(cls, rank: int, world: int, local_size: int) -> "Topology":
        """The topology of ``rank`` in a world of ``world`` ranks, ``local_size`` per node (tests, benchmarks)."""
        if local_size < 1 or world < 1 or world % local_size:
            raise ValueError(f"hierarchical: world size {world} is not a multiple of {local_size} ranks per node; "
                             "every node must run the same number of ranks (hostfile slots)")
        node, local_rank = divmod(rank, local_size)
        return cls(rank, world, node, local_rank, local_size, world // local_size)

    @classmethod
    def from_env(cls, comm: Communicator, env: Optional[Mapping[str, str]] = None) -> "Topology":
        """Collective (once, at attach). ``LOCAL_RANK`` / ``LOCAL_SIZE`` (and, if present, ``CROSS_RANK`` /
        ``CROSS_SIZE``; under torchrun ``LOCAL_WORLD_SIZE`` / ``GROUP_RANK``) of every rank, exchanged in ONE control all_gather and checked alike on every rank,
        so a bad layout stops every rank with the same one-line ``ValueError`` (``layout_problem``)."""
        env = dict(os.environ if env is None else env)
        for ours, torchrun in _TORCHRUN_KEYS:  # torchrun's names, where the deepspeed launcher's are absent
            if not str(env.get(ours) or "").strip() and str(env.get(torchrun) or "").strip():
                env[ours] = env[torchrun]
        mine = [_env_int(env, k) for k in _ENV_KEYS]
        rows = comm.exchange_control(comm.tensor(mine, dtype=torch.int64))  # control data: not metered
        problem = layout_problem(rows, comm.world_size)
        if problem:
            raise ValueError(problem)
        return cls.explicit(comm.rank, comm.world_size, rows[0][1])


def _env_int(env: Mapping[str, str], key: str) -> int:
    v = env.get(key)
    if v is None or not str(v).strip():
        return _MISSING
    try:
        x = int(str(v).strip())
    except ValueError:
        return _MALFORMED
    return x if x >= 0 else _MALFORMED


def layout_problem(rows: Sequence[Sequence[int]], world: int) -> Optional[str]:
    """The first problem (one line) of every rank's ``[LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE]``
    (-1: not set, -2: not a non-negative integer), or None when they describe node-major ranks."""
    for i in (1, 0):  # LOCAL_SIZE first: the rest is read against it
        key = _ENV_KEYS[i]
        missing = [r for r, row in enumerate(rows) if row[i] == _MISSING]
        if missing:
            return (f"hierarchical mode needs the deepspeed launcher's LOCAL_RANK/LOCAL_SIZE (this node's rank "
                    f"and its number of ranks, from the hostfile's slots): {key} is not set on rank(s) "
                    f"{ranks_text(missing)}; launch with the deepspeed launcher (`deepspeed --hostfile ...`, "
                    f"run/env.sh: ds_ext_launch)")
    for i, key in enumerate(_ENV_KEYS):
        bad = [r for r, row in enumerate(rows) if row[i] == _MALFORMED]
        if bad:
            return f"hierarchical: {key} on rank(s) {ranks_text(bad)} is not a non-negative integer"
    size0 = rows[0][1]
    for r, row in enumerate(rows):
        if row[1] < 1:
            return f"hierarchical: rank {r} reports LOCAL_SIZE={row[1]}; a node runs at least one rank"
        if row[1] != size0:
            return (f"hierarchical: rank {r} reports LOCAL_SIZE={row[1]} but rank 0 reports {size0}; every node "
                    f"must run the same number of ranks (hostfile slots)")
    if world % size0:
        return (f"hierarchical: world size {world} is not a multiple of LOCAL_SIZE={size0}; every node must run "
                f"the same number of ranks (hostfile slots)")
    nodes = world // size0
    for r, (lr, _, cr, cs) in enumerate(rows):
        if lr != r % size0:
            return (f"hierarchical: rank {r} reports LOCAL_RANK={lr}, but ranks must be node-major (rank = node * "
                    f"LOCAL_SIZE + LOCAL_RANK, as the deepspeed launcher numbers hostfile slots), so with "
                    f"LOCAL_SIZE={size0} it should be {r % size0}")
        if cr != _MISSING and cr != r // size0:
            return (f"hierarchical: rank {r} reports CROSS_RANK={cr} (its node index), but rank // LOCAL_SIZE = "
                    f"{r // size0}")
        if cs != _MISSING and cs != nodes:
            return (f"hierarchical: rank {r} reports CROSS_SIZE={cs} nodes, but world size {world} / "
                    f"LOCAL_SIZE={size0} is {nodes}")
    return None


def ranks_text(rs: Sequence[int]) -> str:
    return ", ".join(str(r) for r in rs[:8]) + (f" (+{len(rs) - 8} more)" if len(rs) > 8 else "")


# ============================================================================================== sharding
def balanced_shards(numels: Sequence[int], parts: int) -> List[List[int]]:
    """Indices of ``numels`` split into ``parts`` shards: largest first to the least-loaded shard (ties to
    the lower shard; equal sizes in index order), each shard in index order. Deterministic: host
    arithmetic on sizes only, the same on every rank."""
    if parts < 1:
        raise ValueError(f"balanced_shards: {parts} parts")
    load = [0] * parts
    shards: List[List[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(numels)), key=lambda i: (-int(numels[i]), i)):
        j = min(range(parts), key=lambda j: (load[j], j))
        shards[j].append(i)
        load[j] += int(numels[i])
    return [sorted(s) for s in shards]


def numel_of(x) -> int:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor):
        x = x[1]
    if isinstance(x, torch.Tensor):
        return x.numel()
    n = 1
    for d in x:
        n *= int(d)
    return n


def shard_params(named_params, local_size: int) -> List[List[int]]:
    """Parameter indices owned by each local rank (``balanced_shards`` on numel). ``named_params``: ``(name,
    parameter)`` pairs, tensors, or shapes."""
    return balanced_shards([numel_of(x) for x in named_params], local_size)


# ======================================================================================= communicators
def _solo(comm: Communicator) -> Communicator:
    """A one-rank communicator on ``comm``'s device and meter: it never communicates (every collective of
    ``ds_ext/comm.py`` short-cuts at world size 1), so it needs no process group. Not for ``subgroup``."""
    c = comm.with_meter(comm.meter)
    c.world_size, c.rank = 1, 0
    c.force_collectives = False  # its group is the world's: it must never issue a collective
    c._init_state()
    return c


def node_communicators(comm: Communicator, topo: Topology) -> Tuple[Communicator, Communicator]:
    """Collective (every rank, same order): ``(node communicator, cross-node communicator)`` of this rank.
    Makes every node's group, then every local rank's cross-node group, through ``comm.subgroup`` (pinned
    there, never evicted, so a second call, e.g. by ``HierarchicalAveraging`` next to a ``HierarchicalReducer``
    or by ``attach`` after ``node_mpu``, makes none). One-rank sets get a one-rank communicator, the whole
    world is ``comm`` itself."""
    if topo.world != comm.world_size or topo.rank != comm.rank:
        raise ValueError(f"hierarchical: topology for rank {topo.rank} of {topo.world}, communicator is rank "
                         f"{comm.rank} of {comm.world_size}")
    sets = []
    if topo.local_size > 1:
        sets += [("node", k, topo.node_members(k)) for k in range(topo.n_nodes)]
    if topo.n_nodes > 1:
        sets += [("cross", j, topo.cross_members(j)) for j in range(topo.local_size)]
    node = cross = None
    for which, idx, members in sets:
        c = comm if len(members) == topo.world else comm.subgroup(members, pin=True)
        if which == "node" and idx == topo.node:
            node = c
        if which == "cross" and idx == topo.local_rank:
            cross = c
    return (node if node is not None else _solo(comm)), (cross if cross is not None else _solo(comm))
