"""A step-time cost model for the communication methods, checked on the emulated cluster and used to
project to GPU clusters we cannot run (``python -m ds_ext.costmodel``).

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/costmodel.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..comm import Collective
from ..reducers.buckets import bucket_sizes as _bucket_sizes
from ..reducers.buckets import numel_of
from .presets import ALL_METHODS, OVERLAPS_BACKWARD, MethodOptions, applicable, hier_methods, method_specs


# ------------------------------------------------------------------------------------ collectives
# Collective (op, payload bytes, group size, calls per step) lives in ds_ext/comm.py, the communication layer's
# vocabulary: each reducer and synchronizer describes its own traffic with it (``collectives`` classmethods).
def wire_factor(op: str, group: int) -> float:
    return Collective(op, 1.0, group).wire_bytes()


_numel = numel_of


def bucket_sizes(shapes: Sequence[Sequence[int]], bucket_mb: float, elem: int = 4,
                 first_bucket_mb: Optional[float] = 1.0) -> List[int]:
    """Bytes per allreduce bucket (``reducers.buckets.bucket_sizes``: the rule of ``build_buckets``, first bucket
    capped at ``first_bucket_mb`` as ``allreduce``'s default; reverse registration order, the first step's layout)."""
    return _bucket_sizes(shapes, bucket_mb, elem, first_bucket_mb)


def powersgd_bytes(shapes, rank: int, min_rate: float = 2.0) -> Tuple[int, int]:
    """(P bytes incl. the uncompressed tensors, Q bytes) of one PowerSGD step, summed over its fusion groups
    (``PowerSGDReducer.group_bytes``)."""
    from ..reducers.lowrank import PowerSGDOptions, PowerSGDReducer

    p, q = PowerSGDReducer.group_bytes(shapes, PowerSGDOptions(rank=rank, min_compression_rate=min_rate))
    return int(sum(p)), int(sum(q))


def acpsgd_groups(shapes, rank: int, fusion_mb: float = 25.0) -> Tuple[List[int], List[int]]:
    """Bytes of each fused all_reduce of a P-step and of a Q-step (``ACPSGDReducer.group_bytes``)."""
    from ..reducers.lowrank import ACPSGDReducer

    return ACPSGDReducer.group_bytes(shapes, rank, fusion_mb)


def collectives(method: str, shapes: Sequence[Sequence[int]], n: int, opts: MethodOptions,
                exdyna_imbalance: float = 0.0) -> List[Collective]:
    """The collectives one rank issues per optimizer step (averaged over a period where it has one): the
    method's reducer and synchronizer describe their own traffic (their ``collectives`` classmethods,
    found through the registries), with the options ``method_specs`` gives them."""
    from ..registry import REDUCERS, SYNCS, load_builtin

    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
    load_builtin()
    rname, ropts, sname, sopts = method_specs(opts)[method]
    out: List[Collective] = []
    for registry, name, options in ((REDUCERS, rname, ropts), (SYNCS, sname, sopts)):
        entry = registry.get(name)
        out += entry.factory.collectives(shapes, n, entry.options(**options), imbalance=exdyna_imbalance,
                                         lr=opts.qsr_lr)
    return out


def hierarchical_method_collectives(method: str, shapes: Sequence[Sequence[int]], n: int, local_size: int,
                                    opts: MethodOptions, local_rank: Optional[int] = None,
                                    exdyna_imbalance: float = 0.0) -> List[Collective]:
    """What one rank issues per optimizer step in hierarchical mode, ``local_size`` ranks per node: the
    reducer's ``ds_ext.hierarchy.hierarchical_collectives`` (node mean, the method on this local rank's shard
    between the nodes, node gather) and, for ``local_qsr``, ``HierarchicalAveraging.collectives`` (node
    gradient mean every step, the shard's parameter average across nodes every H steps, node gather).
    ``local_rank`` None: the local rank whose shard costs the most (as there)."""
    from ..hierarchy import HierarchicalAveraging, hierarchical_collectives
    from ..registry import REDUCERS, SYNCS, load_builtin

    if method not in hier_methods():
        raise ValueError(f"{method!r} has no hierarchical mode; methods with one: {', '.join(hier_methods())}")
    load_builtin()
    rname, ropts, sname, sopts = method_specs(opts)[method]
    out: List[Collective] = []
    if rname != "none":
        entry = REDUCERS.get(rname)
        out += hierarchical_collectives(entry.factory, shapes, n, local_size, entry.options(**ropts),
                                        local_rank=local_rank, imbalance=exdyna_imbalance, lr=opts.qsr_lr)
    if sname != "none":
        entry = SYNCS.get(sname)
        out += HierarchicalAveraging.collectives(shapes, n, local_size, entry.options(**sopts), lr=opts.qsr_lr,
                                                 local_rank=local_rank)
    return out


# ------------------------------------------------------------------------------------------ model
#: intra-node link of the two-level (hierarchical) term: inputs, not measured here (module docstring)
INTRA_BW_BITS = 1.6e12      # 200 GB/s: NVLink-class achieved bus bandwidth


INTRA_ALPHA_S = 5e-6        # per ring hop inside a node


INTRA_SOURCE = ("inputs: NVLink-class; nccl-tests all_reduce_perf reports ~230 GB/s bus bandwidth on 8x A100 "
                "NVLink 3, NCCL's tuning model charges 3.4 us per NVLink ring step")


@dataclass
class Constants:
    alpha_s: float          # per-message (ring hop) latency, seconds
    eta: float              # achieved fraction of the link rate
    source: str = "built-in"
    intra_bw_bits: float = INTRA_BW_BITS   # intra-node rate (bit/s) for NodeCollective (``intra_node``)
    intra_alpha_s: float = INTRA_ALPHA_S   # intra-node per-hop latency, seconds
    alpha_source: str = ""  # where alpha comes from, printed with it (the CLI's assumptions)
    eta_source: str = ""    # where eta comes from


# The default network latency of a GPU-cluster projection: a sourced figure, not a measurement of ours
# (module docstring). NCCL's tuning model (its hwLat table, network row) charges a ring 14 us per
# inter-node step with the Simple protocol, which carries MB-sized messages (2.7 us with LL for small
# ones; 9.6 us in older releases such as NCCL 2.7).
NCCL_NET_ALPHA_S = 14e-6


NCCL_ALPHA_SOURCE = ("NCCL's own latency model (NVIDIA NCCL tuning model, hwLat table): 14 us per inter-node ring "
                     "step, Simple protocol, InfiniBand/RoCE incl. NCCL software overhead; 2.7 us for its LL "
                     "small-message protocol, so conservative for small messages; --alpha-us replaces it")


EMULATION_ETA = 0.9324


EMULATION_ETA_SOURCE = ("fitted on the CPU emulation (gloo/TCP reached 93% of the shaped link); an assumption for "
                        "NCCL, whose tuning model takes 92% of a ring's bus bandwidth for LL128; --eta replaces it")


# The constants of a GPU-cluster projection (the CLI's default): NCCL's network latency, the emulation's eta.
DEFAULT_CONSTANTS = Constants(alpha_s=NCCL_NET_ALPHA_S, eta=EMULATION_ETA,
                              source="default: alpha from NCCL's latency model, eta from the emulation fit",
                              alpha_source=NCCL_ALPHA_SOURCE, eta_source=EMULATION_ETA_SOURCE)


# The fit recorded in docs/results/costmodel.md (`sudo bash run/bench-cluster.sh` on this project's 2-core CPU
# machine, gloo over TCP, N = 4 emulated hosts at 1 Gbit/s, 8 methods), used only by ``benchmarks.costmodel_fit --fit`` when
# there are no results to fit. Measured 2026-11-23 with 8 timed steps while other jobs kept the load average at
# 5-9 on the 2 cores: the latency constant is mostly scheduling delay (docs/results/costmodel.md), not network latency.
EMULATION_FIT_ALPHA_SOURCE = ("fitted on the CPU emulation: gloo/TCP software overhead and CPU scheduling delay on "
                              "2 oversubscribed cores, not network latency")


EMULATION_FIT_CONSTANTS = Constants(alpha_s=1.2122e-3, eta=EMULATION_ETA,
                                    source="recorded bench-cluster fit on N=4, 1 Gbit/s, 8 methods",
                                    alpha_source=EMULATION_FIT_ALPHA_SOURCE,
                                    eta_source="fitted on the CPU emulation (gloo/TCP)")


def is_intra_node(x) -> bool:
    """A collective among the ranks of one node (``ds_ext.hierarchy.NodeCollective``)."""
    return bool(getattr(x, "intra_node", False))


def intra_seconds(colls: Iterable[Collective], c: Constants) -> float:
    """Collectives priced on the intra-node link: ``hops * intra_alpha + wire / intra_BW`` (no efficiency factor)."""
    bw = c.intra_bw_bits / 8.0
    return sum(x.calls * (x.hops() * c.intra_alpha_s + x.wire_bytes() / bw) for x in colls)


def comm_seconds(colls: Iterable[Collective], bw_bits: float, c: Constants) -> float:
    """Network collectives at ``bw_bits`` (``hops * alpha + wire / (eta BW)``); a collective inside a node
    (``intra_node``: ``NodeCollective``) at the intra-node rate (``intra_seconds``)."""
    bw = bw_bits / 8.0
    colls = list(colls)
    net = sum(x.calls * (x.hops() * c.alpha_s + x.wire_bytes() / (c.eta * bw)) for x in colls if not is_intra_node(x))
    return net + intra_seconds([x for x in colls if is_intra_node(x)], c)


def _wire(colls) -> float:
    return sum(x.calls * x.wire_bytes() for x in colls)


def _payload(colls) -> float:
    return sum(x.calls * x.nbytes for x in colls)


def flat_comm(method: str, shapes, n: int, gpus_per_node: int, opts: MethodOptions, consts: Constants,
              bw_bits: float, nics_per_node: int = 1, exdyna_imbalance: float = 0.0) -> dict:
    """The flat method on ``n`` ranks, ``gpus_per_node`` per node (module docstring): on several nodes its
    rings cross each node's network link once per direction (k links: k rings, the bandwidth term / k); on
    one node everything runs on the intra-node link. Seconds per step, and the bytes one node sends over
    the network per step (``net_bytes_node``: one rank's ring sends)."""
    colls = collectives(method, shapes, n, opts, exdyna_imbalance)
    if n <= gpus_per_node:
        return {"net_s": 0.0, "intra_s": intra_seconds(colls, consts), "comm_s": intra_seconds(colls, consts),
                "net_bytes_node": 0.0, "payload_rank": _payload(colls)}
    k = max(1, int(nics_per_node))
    net = (sum(x.calls * x.hops() for x in colls) * consts.alpha_s
           + _wire(colls) / k / (consts.eta * bw_bits / 8.0))
    return {"net_s": net, "intra_s": 0.0, "comm_s": net, "net_bytes_node": _wire(colls), "payload_rank": _payload(colls)}


def hierarchical_comm(method: str, shapes, n: int, gpus_per_node: int, opts: MethodOptions, consts: Constants,
                      bw_bits: float, nics_per_node: int = 1, exdyna_imbalance: float = 0.0) -> dict:
    """The two-level term (module docstring): ``intra_s`` (node collectives at the intra-node rate), ``net_s``
    (the cross-node collectives of the node's ``gpus_per_node`` local ranks, sharing ``nics_per_node`` links
    of ``bw_bits``), ``comm_s`` = their sum; ``cross_bytes``: the cross-node payload of the busiest local rank
    (``hierarchical_collectives``' collectives that are not ``intra_node``), ``cross_bytes_node`` of all of a
    node's local ranks, ``net_bytes_node``: what a node sends over the network per step; ``intra_bytes``:
    a rank's node-collective payload."""
    g = int(gpus_per_node)
    if g < 1 or n % g:
        raise ValueError(f"hierarchical: {n} GPUs is not a multiple of {g} GPUs per node")
    busiest = hierarchical_method_collectives(method, shapes, n, g, opts, None, exdyna_imbalance)
    nodes = n // g
    per = ([hierarchical_method_collectives(method, shapes, n, g, opts, j, exdyna_imbalance) for j in range(g)]
           if g > 1 and nodes > 1 else [busiest])
    intra = [x for x in busiest if is_intra_node(x)]
    cross = [[x for x in cs if not is_intra_node(x)] for cs in per]
    wires = [_wire(cs) for cs in cross]
    net = 0.0
    if any(cs for cs in cross):
        hops = max(sum(x.calls * x.hops() for x in cs) for cs in cross)
        net = hops * consts.alpha_s + max(max(wires), sum(wires) / max(1, int(nics_per_node))) / (
            consts.eta * bw_bits / 8.0)
    intra_s = intra_seconds(intra, consts)
    return {"net_s": net, "intra_s": intra_s, "comm_s": net + intra_s,
            "cross_bytes": _payload([x for x in busiest if not is_intra_node(x)]),
            "cross_bytes_node": sum(_payload(cs) for cs in cross), "net_bytes_node": sum(wires),
            "intra_bytes": _payload(intra)}


def project_hierarchical(methods, gpus, bws, shapes, opts, consts, compute_ms: float, gpus_per_node: int = 8,
                         nics_per_node: int = 1, overlap: bool = True, backward_fraction: float = 2.0 / 3.0,
                         compress: Optional[Dict[str, float]] = None) -> List[dict]:
    """Flat vs hierarchical per (Gbit/s, GPUs, method): communication (network, intra-node) and step time.
    Flat overlaps as ``step_ms`` says; hierarchical never does. ``compress``: ms per step of the flat method
    (a hierarchical rank compresses its 1/gpus_per_node shard); default none."""
    compress = compress or {}
    with_mode = hier_methods()
    rows = []
    for bw in bws:
        for n in gpus:
            for m in methods:
                if m not in with_mode or applicable(m, n, opts) or n % gpus_per_node:
                    continue
                f = flat_comm(m, shapes, n, gpus_per_node, opts, consts, bw * 1e9, nics_per_node)
                h = hierarchical_comm(m, shapes, n, gpus_per_node, opts, consts, bw * 1e9, nics_per_node)
                cf = compress.get(m, 0.0)
                ch = cf / gpus_per_node
                rows.append({"bw": bw, "gpus": n, "nodes": n // gpus_per_node, "method": m, "flat": f, "hier": h,
                             "flat_step_ms": step_ms(m, f["comm_s"], compute_ms, cf, overlap, backward_fraction),
                             "hier_step_ms": step_ms(m, h["comm_s"], compute_ms, ch, False, backward_fraction)})
    return rows


def step_ms(method: str, comm_s: float, compute_ms: float, compress_ms: float, overlap: bool,
            backward_fraction: float = 2.0 / 3.0) -> float:
    """compute + compression + communication not hidden behind backward (methods launched during
    backward hide up to ``backward_fraction * compute``)."""
    comm_ms = 1e3 * comm_s
    if overlap and method in OVERLAPS_BACKWARD:
        comm_ms = max(0.0, comm_ms - backward_fraction * compute_ms)
    return compute_ms + compress_ms + comm_ms


# ----------------------------------------------------------------------------------------- shapes
def model_shapes(name: str) -> List[Tuple[int, ...]]:
    """Trainable parameter shapes of a registered model (in registration order), built on the meta
    device (no memory, no initialisation cost)."""
    import torch

    from ..registry import MODELS, load_builtin

    load_builtin()
    with torch.device("meta"):
        model = MODELS.build(name, {})
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def fmt_bw(bits: float) -> str:
    return f"{bits / 1e9:g} Gbit/s"
