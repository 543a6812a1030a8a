"""A step-time cost model for the communication methods, checked on the emulated cluster and used to
project to GPU clusters we cannot run (``python -m ds_ext.costmodel``).

    step = compute + compression + (communication not hidden by overlap)

Communication is the sum over the collectives one rank issues per optimizer step, each a ring:

    all_reduce  of B payload bytes in a group of g ranks:  2(g-1) * alpha + 2(g-1)/g * B / (eta * BW)
    all_gather  of B payload bytes per rank, g ranks:        (g-1) * alpha +  (g-1)   * B / (eta * BW)

``B`` is what the communication meter (``ds_ext.meter.CommMeter``) counts: the tensor handed to the
collective on one rank. ``alpha`` is the per-message latency (one ring hop) and ``eta`` the fraction of
the link rate ``BW`` a stream achieves: the model's two constants.

Where the constants come from (the CLI prints its choice, with its source, before every table):

* Default (a GPU cluster): ``alpha`` = 14 us per ring hop (``NCCL_NET_ALPHA_S``), a sourced figure for a
  real network, not a measurement of ours: NCCL's own latency model (NVIDIA NCCL's tuning model, its
  ``hwLat`` table in current releases) charges 14 us per inter-node ring step for the Simple protocol
  (the one NCCL uses for MB-sized messages; 2.7 us for its LL small-message protocol, older releases
  such as NCCL 2.7 9.6 us), InfiniBand/RoCE with NCCL's software overhead included; NCCL's extra fixed
  ~8.4 us per collective is left out (the model has no per-call term). 14 us is the conservative end for
  bucket-sized messages; ``--alpha-us`` replaces it. ``eta`` = 0.932, the emulation's fit (gloo over TCP
  reached 93 % of the shaped link), kept for GPUs as an assumption (NCCL's tuning model likewise takes
  92 % of a ring's bus bandwidth for its LL128 protocol); ``--eta`` replaces it.
* ``--fit [RESULTS]``: both constants fitted by weighted least squares (relative error) on the per-step
  communication times of every method measured on N = 4 emulated hosts (``run/bench-cluster.sh``),
  then checked at N = 2, 3, 4; with no RESULTS and no ``runs/bench-cluster``, the fit recorded in the
  README (``EMULATION_FIT_CONSTANTS``: alpha 1212 us per hop, eta 0.932). That alpha is gloo/TCP
  software overhead and CPU scheduling delay on 2 oversubscribed cores (``tc`` adds no latency: this
  kernel has no ``netem``), not network latency: right for checking the model against the emulation,
  about 90x too slow for projecting a GPU cluster.

What each method sends per step (``collectives``), written from the reducers and synchronizers in
this package (tests check them against the real meter):

* ``allreduce`` (S-SGD): one all_reduce of every fp32 gradient, in ~25 MiB buckets (the bucket
  layout of ``reducers/buckets.py``); launched during backward.
* ``powersgd`` rank r: all_reduce of P (n x r per compressed matrix) fused with the uncompressed
  tensors, then all_reduce of Q (m x r), after backward. A matrix (n, m = numel / n) is compressed
  when n*m >= 2 (n+m) r.
* ``acpsgd`` rank r: alternately P or Q (every matrix compressed), in ~25 MB fusion groups, one
  all_reduce per group, launched during backward; the model averages a P-step and a Q-step.
* ``topk`` density d: all_gather of k int64 indices and of k fp32 values, k = int(d * numel).
* ``exdyna`` density d: all_gather of one int64 count, all_gather of the int64 indices padded to the
  largest per-rank count (k/N (1 + imbalance) with exclusive partitions), all_reduce of k fp32 values
  at the union of the indices.
* ``signsgd``: all_gather of ceil(numel_t / 8) bytes per tensor and one fp32 scale per tensor.
* ``local_qsr`` (Local SGD, QSR period H): all_reduce of every fp32 parameter once every H steps.
* ``dssync`` (G groups, every step): all_reduce of every fp32 parameter inside a group of N/G ranks.

Hierarchical (node-aware) mode (``--hierarchical``; ``ds_ext/hierarchy.py``), G GPUs per node
(``--gpus-per-node``, default 8): a rank's collectives are ``hierarchical_collectives`` (reducers) or
``HierarchicalAveraging.collectives`` (``local_qsr``): the node mean and the node gather (``NodeCollective``,
``intra_node = True``) plus the method's own collectives on this local rank's 1/G shard between the N/G
nodes. Two-level time:

    intra-node: sum over node collectives of  hops * intra_alpha + wire / intra_BW
    cross-node: max over local ranks of their hops * alpha
                + max(busiest local rank's wire, sum of the G local ranks' wire / nics_per_node) / (eta * BW)

``intra_BW`` (``Constants.intra_bw_bits``, ``--intra-bw`` Gbit/s) is an input, not measured here:
default 1.6e12 bit/s = 200 GB/s, an NVLink-class achieved bus bandwidth (NVIDIA's nccl-tests
``all_reduce_perf`` on an 8x A100 DGX with NVLink 3 / NVSwitch reports ~230 GB/s bus bandwidth for large
messages; H100 NVLink 4 more); ``intra_alpha`` (``--intra-alpha-us``) 5 us per ring hop, also an input (NCCL's
tuning model charges 3.4 us per NVLink ring step for the Simple protocol, and at least 3 us of network-post
overhead per step once a ring spans nodes; the fitted ``alpha`` is the emulation's CPU scheduling delay
and would be wrong on NVLink). Node collectives are priced at the intra-node rate with no efficiency factor.
A flat ring spanning nodes prices every hop at the network ``alpha`` (NCCL's model charges its intra-node
steps the NVLink figure): the flat side's latency is overstated by up to (hops - network hops) x (alpha -
intra_alpha), which favours hierarchical mode (at most ~1 ms per all_reduce at 64 GPUs with the defaults).
The network is one link of BW per node (``--nics-per-node``, default 1), so the G local ranks' cross-node
rings share it; a flat ring over node-major ranks crosses each node's link once per direction, so its time
is the flat model's above (with k links per node both modes spread over them: flat as k rings, /k). On one
node (N <= G) the flat collectives run inside it and are priced at the intra-node rate. Hierarchical mode does
not overlap with backward (the node mean needs every gradient). The hierarchical table leaves compression out
(0, the bound a fast GPU implementation approaches) unless ``--compress-ms`` gives it; a hierarchical rank then
compresses its 1/G shard: given / G (an assumption).

Overlap: the communication of methods launched during backward (``allreduce``, ``acpsgd``) can hide behind
the backward pass. Two terms:

* window (the default): up to ``backward_fraction`` (default 2/3) of the compute time is hidden; every other
  method communicates after backward;
* launch (``--overlap launch``, ``--overlap-from BENCH_TRAIN_DIR``; ``overlap_step``, issue 19): each bucket /
  fusion group (``backward_schedule``) is launched when the last of its gradients is ready -- at the fraction of
  backward the readiness profile gives, measured by ``run/bench-train.sh`` (compute alone) or estimated from the
  layers' multiply-accumulates (``flop_ready_fractions``) -- and in order; the link serves launches one after
  another, and whatever is on it when backward ends is exposed:
  ``step = fwd + max(backward, link free) + compression + comm(after backward) + opt``.
  What it adds to the window: the last bucket (the first layers' gradients) is ready only when backward ends, so
  it is never hidden; a bucket launched early can use the rest of backward, not a fixed share of compute; and
  work in the gradient hooks (copies, ACP-SGD's compression) lengthens the backward it hides behind.
  ``train_check`` compares both terms with real training steps measured by ``run/bench-train.sh`` (2 emulated
  hosts, ResNet-50, real backward), per method; ``--overlap-from`` prints that check before the projection.
The bench-cluster measurements have no compute to overlap with, so their model check compares serial times.

Inputs, not measurements: the compute time (default 30.5 ms, a ResNet-50 bf16 step at batch 64 on an
H100) and the backward fraction. Compression times are the bench's measurements on this CPU
(main-thread CPU time per step), fitted per method over the measured N: constant, except ``signsgd``
(a + b N: it decodes N sign vectors) and ``exdyna`` (a + b / N: it scans 1/N of the gradient);
``--compress-file`` / ``--compress-ms`` replace them (e.g. by GPU times). The CLI prints two
projections: A with those compression times, B with none (the bound a fast GPU implementation
approaches). Deliberate simplifications, named: the network is a non-blocking switch (every host's
link at BW, no contention between groups; in the flat projection every GPU is a host with its own link);
no latency beyond alpha per ring hop (no per-call launch cost); exdyna's achieved density is its target and
its ranks' counts are balanced; all_gather is modelled with the same efficiency as all_reduce.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..comm import Collective
from ..reducers.buckets import bucket_sizes as _bucket_sizes
from ..reducers.buckets import fuse_reverse, numel_of

# ---------------------------------------------------------------------------------------- methods
# name -> (reducer name, reducer options, sync name, sync options, launched during backward, label)
# ``{rank}``, ``{density}`` ... are filled from the options of ``method_specs``.
LABELS = {
    "allreduce": "S-SGD (allreduce)",
    "powersgd": "PowerSGD",
    "acpsgd": "ACP-SGD",
    "topk": "top-k",
    "exdyna": "ExDyna",
    "signsgd": "EF-SignSGD",
    "local_qsr": "Local SGD + QSR",
    "dssync": "DS-Sync",
}
ALL_METHODS = tuple(LABELS)
OVERLAPS_BACKWARD = {"allreduce", "acpsgd"}


@dataclass
class MethodOptions:
    """The settings the issue fixes (rank 4, density 0.001, one QSR period, 2 DS-Sync groups)."""
    rank: int = 4
    density: float = 0.001
    qsr_alpha: float = 0.0175      # the QSR ViT-B recipe's alpha ...
    qsr_lr: float = 0.008          # ... at its peak learning rate:
    qsr_h_base: int = 4            # H = max(4, floor((0.0175 / 0.008)^2)) = 4
    dssync_groups: int = 2
    bucket_mb: float = 25.0

    @property
    def qsr_h(self) -> int:
        return max(self.qsr_h_base, int((self.qsr_alpha / self.qsr_lr) ** 2))


def method_specs(opts: MethodOptions) -> Dict[str, Tuple[str, dict, str, dict]]:
    """(reducer, reducer options, sync, sync options) per method, as ``ds_ext.deepspeed.attach.attach`` takes them."""
    return {
        "allreduce": ("allreduce", {"bucket_mb": opts.bucket_mb}, "none", {}),
        "powersgd": ("powersgd", {"rank": opts.rank, "start_powerSGD_iter": 0}, "none", {}),
        "acpsgd": ("acpsgd", {"rank": opts.rank}, "none", {}),
        "topk": ("topk", {"density": opts.density}, "none", {}),
        "exdyna": ("exdyna", {"density": opts.density}, "none", {}),
        "signsgd": ("signsgd", {}, "none", {}),
        "local_qsr": ("none", {}, "local", {"period": "qsr", "alpha": opts.qsr_alpha, "h_base": opts.qsr_h_base}),
        "dssync": ("none", {}, "dssync", {"groups": opts.dssync_groups, "grouping": "patterns", "h": 1}),
    }


def applicable(method: str, n: int, opts: MethodOptions) -> Optional[str]:
    """None, or why ``method`` cannot run on ``n`` ranks."""
    if method == "dssync" and n % opts.dssync_groups:
        return f"{opts.dssync_groups} groups do not divide {n} ranks"
    if method == "dssync" and n // opts.dssync_groups < 2:
        return f"{opts.dssync_groups} groups of {n} ranks have one rank each: no communication at all"
    return None


# ------------------------------------------------------------------------------------ collectives
# Collective (op, payload bytes, group size, calls per step) lives in ds_ext/comm.py, the communication layer's
# vocabulary: each reducer and synchronizer describes its own traffic with it (``collectives`` classmethods).
def wire_factor(op: str, group: int) -> float:
    return Collective(op, 1.0, group).wire_bytes()


_numel = numel_of


def bucket_sizes(shapes: Sequence[Sequence[int]], bucket_mb: float, elem: int = 4) -> List[int]:
    """Bytes per allreduce bucket (``reducers.buckets.bucket_sizes``: the rule of ``build_buckets``)."""
    return _bucket_sizes(shapes, bucket_mb, elem)


def powersgd_bytes(shapes, rank: int, min_rate: float = 2.0) -> Tuple[int, int]:
    """(P bytes incl. the uncompressed tensors, Q bytes) of one PowerSGD step (``PowerSGDReducer.collectives``)."""
    from ..reducers.lowrank import PowerSGDOptions, PowerSGDReducer

    p, q = PowerSGDReducer.collectives(shapes, 1, PowerSGDOptions(rank=rank,
                                                                   min_compression_rate=min_rate))
    return int(p.nbytes), int(q.nbytes)


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


#: methods with a hierarchical mode (``hierarchical: true`` on the reducer, or on ``sync: local``)
HIER_METHODS = ("allreduce", "powersgd", "acpsgd", "topk", "exdyna", "signsgd", "local_qsr")


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

    if method not in HIER_METHODS:
        raise ValueError(f"{method!r} has no hierarchical mode; methods with one: {', '.join(HIER_METHODS)}")
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


# How a method's compression time changes with the number of ranks N (fitted per method on the
# N = 2, 3, 4 measurements): signsgd decodes N packed vectors and topk scatters N*k values
# (a + b N); exdyna scans 1/N of the gradient (a + b / N); the others do the same work at any N.
COMPRESS_SCALING = {"signsgd": "linear", "topk": "linear", "exdyna": "inverse"}


@dataclass
class Compression:
    """Compression ms per step of one method: ``a + b * f(N)`` with f = 1, N or 1/N."""
    form: str = "constant"
    a: float = 0.0
    b: float = 0.0

    def at(self, n: int) -> float:
        f = {"constant": 0.0, "linear": float(n), "inverse": 1.0 / n}[self.form]
        return self.a + self.b * f


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

# The fit of the run recorded in the README (`sudo bash run/bench-cluster.sh` on this project's 2-core CPU
# machine, gloo over TCP, N = 4 emulated hosts at 1 Gbit/s, 8 methods), used only with an explicit --fit when
# there are no results to fit. Measured 2026-11-23 with 8 timed steps while other jobs kept the load average at
# 5-9 on the 2 cores: the latency constant is mostly scheduling delay (see the README), not network latency.
EMULATION_FIT_ALPHA_SOURCE = ("fitted on the CPU emulation: gloo/TCP software overhead and CPU scheduling delay on "
                              "2 oversubscribed cores, not network latency")
EMULATION_FIT_CONSTANTS = Constants(alpha_s=1.2122e-3, eta=EMULATION_ETA,
                                    source="recorded bench-cluster fit on N=4, 1 Gbit/s, 8 methods",
                                    alpha_source=EMULATION_FIT_ALPHA_SOURCE,
                                    eta_source="fitted on the CPU emulation (gloo/TCP)")
DEFAULT_COMPRESSION: Dict[str, Compression] = {
    "allreduce": Compression("constant", 58.6),
    "powersgd": Compression("constant", 90.6),
    "acpsgd": Compression("constant", 68.0),
    "topk": Compression("constant", 447.1),       # a + b N fitted a negative slope: constant
    "exdyna": Compression("inverse", 41.4, 52.6),
    "signsgd": Compression("linear", 317.8, 96.9),
    "local_qsr": Compression("constant", 25.0),
    "dssync": Compression("constant", 92.3),
}


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
    rows = []
    for bw in bws:
        for n in gpus:
            for m in methods:
                if m not in HIER_METHODS or applicable(m, n, opts) or n % gpus_per_node:
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


def _lsq2(rows: Sequence[Tuple[float, float]], ys: Sequence[float]) -> Tuple[float, float]:
    """Least squares ``y ~ x1 * u + x2 * v`` with u, v >= 0 (a coefficient that would be negative is
    fixed at 0 and the other refitted)."""
    s11 = sum(x1 * x1 for x1, _ in rows)
    s22 = sum(x2 * x2 for _, x2 in rows)
    s12 = sum(x1 * x2 for x1, x2 in rows)
    s1y = sum(x1 * y for (x1, _), y in zip(rows, ys))
    s2y = sum(x2 * y for (_, x2), y in zip(rows, ys))
    det = s11 * s22 - s12 * s12
    if det > 1e-12 * max(s11 * s22, 1e-300):
        u, v = (s1y * s22 - s2y * s12) / det, (s11 * s2y - s12 * s1y) / det
        if u >= 0 and v >= 0:
            return u, v
    cand = [(max(0.0, s1y / s11) if s11 else 0.0, 0.0), (0.0, max(0.0, s2y / s22) if s22 else 0.0)]
    err = [sum((x1 * u + x2 * v - y) ** 2 for (x1, x2), y in zip(rows, ys)) for u, v in cand]
    return cand[err.index(min(err))]


def fit_constants(points: Sequence[Tuple[List[Collective], float, float]]) -> Constants:
    """Least squares on the relative error of ``measured = alpha * hops + (1/eta) * wire / BW`` over
    ``(collectives, bw_bits, measured_seconds)``; alpha >= 0, eta > 0."""
    rows = []
    for colls, bw_bits, t in points:
        if t <= 0:
            continue
        a = sum(x.calls * x.hops() for x in colls)
        w = sum(x.calls * x.wire_bytes() for x in colls) / (bw_bits / 8.0)
        rows.append((a / t, w / t))  # each row divided by its measurement: relative residuals, target 1
    if not rows:
        raise ValueError("no measured communication times to fit")
    alpha, inv_eta = _lsq2(rows, [1.0] * len(rows))
    if inv_eta <= 0:
        raise ValueError("the measurements do not determine a bandwidth (no method moved bytes)")
    return Constants(alpha_s=alpha, eta=1.0 / inv_eta, source="fitted")


def fit_compression(method: str, points: Sequence[Tuple[int, float]]) -> Compression:
    """``(N, ms)`` measurements -> the method's ``Compression`` (its form from ``COMPRESS_SCALING``;
    a constant = the mean when only one N was measured or the slope would be negative)."""
    form = COMPRESS_SCALING.get(method, "constant")
    ns = {n for n, _ in points}
    if form == "constant" or len(ns) < 2:
        return Compression("constant", sum(ms for _, ms in points) / len(points), 0.0)
    f = (lambda n: float(n)) if form == "linear" else (lambda n: 1.0 / n)
    a, b = _lsq2([(1.0, f(n)) for n, _ in points], [ms for _, ms in points])
    return Compression(form, a, b) if b > 0 else Compression("constant", sum(ms for _, ms in points) / len(points))


# ------------------------------------------------------------------------------- measured results
def load_results(paths: Sequence[str]) -> List[dict]:
    """Bench result files (``benchmarks.cluster`` JSON), from files or directories."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise SystemExit(f"{p}: no such file or directory (run: sudo bash run/bench-cluster.sh)")
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"{f}: not a readable bench-cluster result ({e})") from None
            if isinstance(d, dict) and d.get("kind") == "benchmarks.cluster":
                d["_file"] = str(f)
                out.append(d)
    if not out:
        raise SystemExit(f"no bench-cluster results in {', '.join(paths)} (run: sudo bash run/bench-cluster.sh)")
    return out


def options_of(result: dict) -> MethodOptions:
    return MethodOptions(**result["options"])


def fit_bandwidth(results: List[dict], n: int) -> float:
    """The link rate the fit uses: the slowest one measured at ``n`` hosts (1 Gbit/s in bench-cluster)."""
    rates = [r["bw_bits"] for r in results if r["world"] == n and r["bw_bits"] > 0]
    if not rates:
        raise SystemExit(f"no bench-cluster result with N={n} hosts and a shaped link to fit the constants on")
    return min(rates)


def fit_from_results(results: List[dict], n: int = 4) -> Tuple[Constants, Dict[str, Compression]]:
    """The two constants from every method measured on ``n`` hosts at the fit bandwidth, and each
    method's compression scaling from every N measured at that bandwidth."""
    bw = fit_bandwidth(results, n)
    pts, comp = [], {}
    for r in results:
        if r["bw_bits"] != bw:
            continue
        opts = options_of(r)
        for m, row in r["methods"].items():
            comp.setdefault(m, []).append((r["world"], row["compress_ms"]))
            if r["world"] != n:
                continue
            colls = collectives(m, r["shapes"], r["world"], opts)
            if sum(c.wire_bytes() for c in colls) > 0:
                pts.append((colls, bw, row["comm_ms"] / 1e3))
    c = fit_constants(pts)
    c.source = f"fitted on N={n}, {fmt_bw(bw)}, {len(pts)} methods"
    c.alpha_source = f"{EMULATION_FIT_ALPHA_SOURCE} ({c.source})"
    c.eta_source = f"fitted on the CPU emulation (gloo/TCP, {c.source})"
    return c, {m: fit_compression(m, p) for m, p in comp.items()}


def fmt_bw(bits: float) -> str:
    return f"{bits / 1e9:g} Gbit/s"


def check_rows(results: List[dict], consts: Constants, compute_ms: float) -> List[dict]:
    """Model vs measurement for every (run, method): communication, and the serial step time
    (compute + the measured compression + communication)."""
    rows = []
    for r in sorted(results, key=lambda x: (x["bw_bits"], x["world"])):
        opts = options_of(r)
        for m, row in r["methods"].items():
            colls = collectives(m, r["shapes"], r["world"], opts)
            model_comm = 1e3 * comm_seconds(colls, r["bw_bits"], consts) if r["bw_bits"] > 0 else float("nan")
            meas_comm = row["comm_ms"]
            model_step = compute_ms + row["compress_ms"] + model_comm
            meas_step = compute_ms + row["compress_ms"] + meas_comm
            rows.append({"world": r["world"], "bw_bits": r["bw_bits"], "method": m, "meas_comm_ms": meas_comm,
                         "model_comm_ms": model_comm, "meas_step_ms": meas_step, "model_step_ms": model_step,
                         "model_bytes": sum(c.calls * c.nbytes for c in colls), "meter_bytes": row["meter_bytes"],
                         "comm_err": (model_comm - meas_comm) / meas_comm if meas_comm > 0 else float("nan"),
                         "step_err": (model_step - meas_step) / meas_step})
    return rows


def print_check(results: List[dict], consts: Constants, compute_ms: float) -> None:
    print(f"## model check against the emulation ({consts.source}: alpha {consts.alpha_s * 1e6:.1f} us per hop, "
          f"eta {consts.eta:.3f})")
    print(f"# comm = time in collectives per step; serial step = {compute_ms:g} ms compute (input) + measured "
          f"compression + comm; bytes = payload per rank per step (meter vs model)")
    print(f"{'Gbit/s':>6} {'N':>2} {'method':<10} {'comm meas':>10} {'comm model':>10} {'err':>7} "
          f"{'step meas':>10} {'step model':>10} {'err':>7} {'meter B':>12} {'model B':>12}")
    rows = check_rows(results, consts, compute_ms)
    for x in rows:
        print(f"{x['bw_bits'] / 1e9:>6g} {x['world']:>2} {x['method']:<10} {x['meas_comm_ms']:10.1f} "
              f"{x['model_comm_ms']:10.1f} {100 * x['comm_err']:6.1f}% {x['meas_step_ms']:10.1f} "
              f"{x['model_step_ms']:10.1f} {100 * x['step_err']:6.1f}% {x['meter_bytes']:12,.0f} {x['model_bytes']:12,.0f}")
    for bw in sorted({x["bw_bits"] for x in rows}):
        sel = [x for x in rows if x["bw_bits"] == bw and x["comm_err"] == x["comm_err"]]
        if sel:
            worst_c = max(sel, key=lambda x: abs(x["comm_err"]))
            worst_s = max(sel, key=lambda x: abs(x["step_err"]))
            print(f"# {fmt_bw(bw)}: largest |error| comm {100 * abs(worst_c['comm_err']):.1f}% "
                  f"({worst_c['method']}, N={worst_c['world']}), step {100 * abs(worst_s['step_err']):.1f}% "
                  f"({worst_s['method']}, N={worst_s['world']}); within 15%: comm "
                  f"{sum(abs(x['comm_err']) <= 0.15 for x in sel)}/{len(sel)}, step "
                  f"{sum(abs(x['step_err']) <= 0.15 for x in sel)}/{len(sel)}")
    print()


def read_compress_file(path: str) -> Dict[str, float]:
    """ms/step of allreduce / powersgd / acpsgd from ``run/bench-compress.sh`` output: the section
    measured on a CUDA device (the last one when there are several)."""
    cur, rows = None, {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"--compress-file {path}: cannot read ({e})") from None
    for line in text.splitlines():
        if line.startswith("# "):
            cur = "cuda" if "device cuda" in line else "cpu"
            if cur == "cuda":
                rows = {}
            continue
        parts = line.split()
        if cur == "cuda" and len(parts) >= 2 and parts[0] in ("allreduce", "powersgd", "acpsgd"):
            try:
                rows[parts[0]] = float(parts[1])
            except ValueError:
                pass
    if not rows:
        raise SystemExit(f"--compress-file {path}: no CUDA rows (allreduce/powersgd/acpsgd) found; it must be "
                         f"the output of run/bench-compress.sh on a machine with a GPU")
    return rows




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


# ------------------------------------------------------------------------- overlap with backward (launch model)
# What ``run/bench-train.sh`` measured (real training on the emulated cluster) and the window term above does not
# have: a collective launched during backward waits for its last gradient, the link serves launched collectives
# one after another, and whatever is still on the link when backward ends is exposed. ``overlap_step`` is that
# queue; ``backward_schedule`` says, per method, which collectives wait for which gradients; the readiness profile
# (the fraction of backward elapsed when each parameter's gradient is ready) is measured (bench-train's compute
# alone) or estimated from the layers' multiply-accumulates (``flop_ready_fractions``).

#: PyTorch DDP, the peer bench-train runs beside us (``benchmarks.train``)
DDP_METHODS = ("ddp_allreduce", "ddp_powersgd")
TRAIN_METHODS = tuple(ALL_METHODS) + ("deepspeed",) + DDP_METHODS
DDP_FIRST_BUCKET_MB = 1.0     # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES, with DDP's default bucket_cap_mb
DDP_BUCKET_MB = 25.0


@dataclass
class Launch:
    """Collectives issued one after another once the gradients of parameters ``members`` are ready."""
    members: List[int]
    colls: List[Collective]


def ddp_bucket_groups(sizes: Sequence[float], first_cap: float, cap: float) -> List[List[int]]:
    """DDP's bucket assignment on sizes alone: reverse parameter order, a bucket closed once it reaches its limit
    (``first_cap`` for the first, ``cap`` after; a bucket may exceed its limit by its last tensor)."""
    groups: List[List[int]] = []
    cur: List[int] = []
    acc = 0.0
    for i in reversed(range(len(sizes))):
        cur.append(i)
        acc += sizes[i]
        if acc >= (first_cap if not groups else cap):
            groups.append(cur)
            cur, acc = [], 0.0
    if cur:
        groups.append(cur)
    return groups


def ddp_powersgd_bytes(shapes, rank: int, min_rate: float = 2.0) -> Tuple[int, int, int]:
    """(uncompressed, P, Q) fp32 bytes of PyTorch's ``powerSGD_hook`` on one bucket holding ``shapes``: each
    gradient viewed as (shape[0], rest), compressed when (n + m) r * min_rate < n m with r = min(n, m, rank)."""
    unc = p = q = 0
    for s in shapes:
        numel = numel_of(s)
        n = int(s[0]) if len(s) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        if (n + m) * r * min_rate < n * m:
            p, q = p + n * r, q + m * r
        else:
            unc += numel
    return 4 * unc, 4 * p, 4 * q


def backward_schedule(method: str, shapes, n: int, opts: MethodOptions, ddp_one_bucket: bool = True
                      ) -> List[Tuple[float, List[Launch], List[Collective]]]:
    """Per variant of a step (weight, collectives launched during backward in launch order, collectives after
    backward): ``allreduce`` one all_reduce per bucket (``reducers/buckets.py``'s layout) and ``acpsgd`` one per
    fusion group (a P-step and a Q-step, weight 1/2 each) wait for their gradients; ``ddp_allreduce`` per DDP
    bucket (first 1 MiB, then 25 MiB); ``ddp_powersgd`` with one bucket (what bench-train runs: PyTorch's hook
    races on gloo with more, ``benchmarks.train.DDP_POWERSGD_ONE_BUCKET``) all_reduces the uncompressed
    tensors, P and Q after backward (with DDP's buckets: that chain per bucket, during backward); ``deepspeed``
    one flat all_reduce of every gradient after backward; every other method after backward (``collectives``)."""
    sizes = [4 * numel_of(s) for s in shapes]
    if method == "allreduce":
        groups = fuse_reverse(sizes, int(opts.bucket_mb * 2**20))
        return [(1.0, [Launch(g, [Collective("all_reduce", sum(sizes[i] for i in g), n)]) for g in groups], [])]
    if method == "acpsgd":
        from ..reducers.lowrank import _phase_sizes, fusion_caps, matrix_dims

        dims = [matrix_dims(s, opts.rank) for s in shapes]
        sp, sq = _phase_sizes(dims, [bool(d[2]) for d in dims])
        cap_p, cap_q = fusion_caps(sum(sp), sum(sq), sum(d[3] for d in dims), opts.bucket_mb)
        out = []
        for ph, cap in ((sp, cap_p), (sq, cap_q)):
            out.append((0.5, [Launch(g, [Collective("all_reduce", 4 * sum(ph[i] for i in g), n)])
                              for g in fuse_reverse(ph, cap)], []))
        return out
    if method == "ddp_allreduce":
        groups = ddp_bucket_groups(sizes, DDP_FIRST_BUCKET_MB * 2**20, DDP_BUCKET_MB * 2**20)
        return [(1.0, [Launch(g, [Collective("all_reduce", sum(sizes[i] for i in g), n)]) for g in groups], [])]
    if method == "ddp_powersgd":
        def chain(idx):
            u, p, q = ddp_powersgd_bytes([shapes[i] for i in idx], opts.rank)
            return [Collective("all_reduce", b, n) for b in (u, p, q)]
        if ddp_one_bucket:
            return [(1.0, [], chain(list(range(len(shapes)))))]
        groups = ddp_bucket_groups(sizes, DDP_FIRST_BUCKET_MB * 2**20, DDP_BUCKET_MB * 2**20)
        return [(1.0, [Launch(g, chain(g)) for g in groups], [])]
    if method == "deepspeed":
        return [(1.0, [], [Collective("all_reduce", sum(sizes), n)])]
    return [(1.0, [], collectives(method, shapes, n, opts))]


def overlap_step(fwd_ms: float, bwd_ms: float, opt_ms: float, ready: Sequence[float],
                 variants: List[Tuple[float, List[Launch], List[Collective]]],
                 comm_ms_of: Callable[[List[Collective]], float],
                 compress_bwd_ms: float = 0.0, compress_post_ms: float = 0.0) -> dict:
    """The launch-during-backward term. Backward lasts ``B = bwd_ms + compress_bwd_ms`` (compression done in the
    gradient hooks lengthens it); a launch becomes ready at ``ready_j * B`` with ``ready_j`` the largest readiness
    of its members and of every earlier launch (launches go in order), starts when the link is free, and holds it
    for ``comm_ms_of`` of its collectives. Then, after both backward and the link are done, the post-backward
    compression and collectives, in series, and the optimizer:

        step = fwd + max(B, link free) + compress_post + comm(after backward) + opt

    Returns the step, the communication (``comm_ms``), the part of it inside backward (``hidden_ms``) and the rest
    (``exposed_ms``), averaged over the variants by weight (ACP-SGD: its P- and Q-steps)."""
    acc = {"step_ms": 0.0, "comm_ms": 0.0, "hidden_ms": 0.0, "exposed_ms": 0.0}
    wsum = sum(w for w, _, _ in variants) or 1.0
    for w, launches, after in variants:
        b = bwd_ms + compress_bwd_ms
        link, busy, r_prev = 0.0, 0.0, 0.0
        for la in launches:
            r = max([r_prev] + [ready[i] for i in la.members])
            r_prev = r
            d = comm_ms_of(la.colls)
            link = max(r * b, link) + d
            busy += d
        tail = max(0.0, link - b)           # the link is busy without a gap from B on: every launch is ready by B
        after_ms = comm_ms_of(after)
        step = fwd_ms + max(b, link) + compress_post_ms + after_ms + opt_ms
        for k, v in (("step_ms", step), ("comm_ms", busy + after_ms), ("hidden_ms", busy - tail),
                     ("exposed_ms", tail + after_ms)):
            acc[k] += w * v / wsum
    return acc


def flop_ready_fractions(name: str, image_size: int = 224, shapes=None) -> List[float]:
    """Readiness profile estimated from multiply-accumulates: a meta-device forward of the registered model at
    ``image_size`` records each parameter-holding module's cost (convolution: output elements x in/groups x kernel;
    linear: output elements x inputs; other modules: output elements); backward visits them in reverse forward
    order at twice the forward cost, and a parameter is ready when its module is done. A model that does not take
    3 x H x W images: parameter bytes in reverse order instead."""
    import torch

    from ..registry import MODELS, load_builtin

    load_builtin()
    with torch.device("meta"):
        model = MODELS.build(name, {})
    params = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(params)}
    order: List[Tuple[List[int], float]] = []

    def hook(mod, inp, out):
        o = out.numel() if isinstance(out, torch.Tensor) else 0
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            cost = float(o * k)
        elif isinstance(mod, torch.nn.Linear):
            cost = float(o * mod.in_features)
        else:
            cost = float(o)
        order.append(([index[id(p)] for p in mod.parameters(recurse=False) if id(p) in index], 2.0 * cost))

    handles = [m.register_forward_hook(hook) for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.device("meta"), torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size))
    except Exception:
        order = []
    finally:
        for h in handles:
            h.remove()
    ready = [1.0] * len(params)
    seen = {i for ids, _ in order for i in ids}
    if not order or len(seen) < len(params):
        sizes = [p.numel() for p in params]
        total, acc = float(sum(sizes)) or 1.0, 0.0
        for i in reversed(range(len(params))):
            acc += sizes[i]
            ready[i] = acc / total
        return ready
    total = sum(c for _, c in order) or 1.0
    acc = 0.0
    for ids, c in reversed(order):  # a module used twice: ready after its first forward use's backward (the last)
        acc += c
        for i in ids:
            ready[i] = acc / total
    return ready


def _launch_ready(schedule, ready) -> List[float]:
    """Ready fraction of each launch of the first variant (launch order), for printing."""
    out, prev = [], 0.0
    for la in schedule[0][1]:
        prev = max([prev] + [ready[i] for i in la.members])
        out.append(prev)
    return out


# ----------------------------------------------------------------------------- model check against bench-train
#: collectives that run after backward with nothing to overlap: their measured in-flight time calibrates the
#: network constants of the check (the overlap term is then tested on the others)
SERIAL_TRAIN_METHODS = ("powersgd", "topk", "exdyna", "signsgd", "local_qsr", "dssync", "deepspeed", "ddp_powersgd")


#: methods whose compression runs on the communication threads: PyTorch's powerSGD_hook orthogonalises P, computes
#: Q and decompresses in future callbacks, which gloo runs on its own threads (between its collectives)
CALLBACK_COMPRESSION = ("ddp_powersgd",)


def train_inputs(method: str, row: dict) -> Tuple[float, float, float]:
    """(work added to forward, to backward, and after backward) of one bench-train row, ms, from CPU time beyond
    the compute alone's (measured right before the method): in forward, the main thread's (the engine's or DDP's
    wrappers); in backward, the main thread's (compression or bucket copies in the gradient hooks) plus the other
    threads' (gloo's socket and reduction work for collectives launched during backward takes the same pinned
    core from autograd); after backward, the main thread's beyond the optimizer's, plus, for
    ``CALLBACK_COMPRESSION``, the other threads' (its callbacks sit between its collectives). Other-thread CPU
    after backward is otherwise not added: it happens while the main thread waits for the link."""
    al = row["alone"]
    c_fwd = max(0.0, row.get("cpu_fwd_ms", 0.0) - al.get("cpu_fwd_ms", 0.0))
    c_bwd = (max(0.0, row["cpu_bwd_ms"] - al["cpu_bwd_ms"])
             + max(0.0, row.get("other_bwd_ms", 0.0) - al.get("other_bwd_ms", 0.0)))
    c_post = max(0.0, row["cpu_tail_ms"] - al["cpu_opt_ms"])
    if method in CALLBACK_COMPRESSION:
        c_post += max(0.0, row.get("other_tail_ms", 0.0) - al.get("other_tail_ms", 0.0))
    return c_fwd, c_bwd, c_post


def train_check(mg: dict, consts: Optional[Constants] = None, ready: Optional[Sequence[float]] = None) -> dict:
    """The overlap model against a merged bench-train result (``benchmarks.train.merged``): per method the
    modelled step (compute alone + compression + communication, the launch term for collectives launched during
    backward) and its error, the window term's (``step_ms``, 2/3 of compute) for comparison, and the modelled
    hidden communication. ``consts`` None: alpha and eta fitted on the measured communication of the methods that
    communicate after backward (``SERIAL_TRAIN_METHODS``); ``ready`` None: the measured readiness profile."""
    from benchmarks.cluster import parse_rate

    rows = mg["rows"]
    shapes = [tuple(s) for s in mg["shapes"]]
    n = int(mg["world"])
    opts = MethodOptions(**{k: v for k, v in mg["options"].items() if k in MethodOptions.__dataclass_fields__})
    bw = parse_rate(str(mg["bandwidth"]))
    if bw <= 0:
        return {"rows": {}, "note": f"links {mg['bandwidth']}: no link rate to model"}
    any_row = next(iter(rows.values()))
    prof = list(ready) if ready is not None else list(any_row["alone"]["ready_frac"])
    src = "given" if consts is not None else None
    if consts is None:
        pts = []
        for m in SERIAL_TRAIN_METHODS:
            r = rows.get(m)
            if r is None or r["comm_ms"] <= 0:
                continue
            colls = [c for _, la, after in backward_schedule(m, shapes, n, opts) for c in after]
            if sum(c.wire_bytes() for c in colls) > 0:
                pts.append((colls, bw, r["comm_ms"] / 1e3))
        consts = fit_constants(pts) if len(pts) >= 2 else replace(EMULATION_FIT_CONSTANTS)
        src = (f"fitted on the measured communication of {len(pts)} post-backward methods" if len(pts) >= 2
               else EMULATION_FIT_CONSTANTS.source)
        consts.source = src

    def comm_ms_of(colls):
        return 1e3 * comm_seconds(colls, bw, consts)

    out = {}
    for m, r in rows.items():
        al = r["alone"]
        c_fwd, c_bwd, c_post = train_inputs(m, r)
        sched = backward_schedule(m, shapes, n, opts)
        mod = overlap_step(al["fwd_ms"] + c_fwd, al["bwd_ms"], al["opt_ms"], prof, sched, comm_ms_of, c_bwd, c_post)
        # the window term (before issue 19): compute + compression + comm beyond 2/3 of compute for allreduce/acpsgd
        comm_all = sum(w * comm_ms_of([c for la in launches for c in la.colls] + after) for w, launches, after in sched)
        compute = al["fwd_ms"] + al["bwd_ms"] + al["opt_ms"]
        win = step_ms("allreduce" if m in ("allreduce", "acpsgd", "ddp_allreduce") else "powersgd", comm_all / 1e3,
                      compute, c_fwd + c_bwd + c_post, True, 2.0 / 3.0)
        out[m] = {"meas_step_ms": r["step_ms"], "model_step_ms": mod["step_ms"],
                  "err": (mod["step_ms"] - r["step_ms"]) / r["step_ms"], "window_step_ms": win,
                  "window_err": (win - r["step_ms"]) / r["step_ms"], "meas_comm_ms": r["comm_ms"],
                  "model_comm_ms": mod["comm_ms"], "meas_hidden_ms": r["hidden_ms"],
                  "model_hidden_ms": mod["hidden_ms"],
                  "extra_fwd_ms": c_fwd, "compress_bwd_ms": c_bwd, "compress_post_ms": c_post,
                  "serial_fit": m in SERIAL_TRAIN_METHODS, "alone_step_ms": al.get("step_ms", 0.0),
                  "launch_ready": _launch_ready(sched, prof) if sched[0][1] else [],
                  "meas_launch_frac": r.get("launch_frac", [])}
    return {"rows": out, "alpha_us": consts.alpha_s * 1e6, "eta": consts.eta, "constants": src,
            "bandwidth_bits": bw, "world": n}


def print_train_check(check: dict) -> None:
    rows = check.get("rows") or {}
    if not rows:
        print(f"# model check: {check.get('note', 'nothing to check')}")
        return
    print(f"## cost model vs bench-train (launch-during-backward overlap term; alpha {check['alpha_us']:.0f} us per "
          f"hop, eta {check['eta']:.3f}: {check['constants']})")
    print("# model step = compute alone (fwd + bwd + opt, measured right before the method) + CPU beyond it "
          "(train_inputs: +fwd, +bwd, +post) + communication not hidden (queue of launches against backward); "
          "window = the earlier term (comm beyond 2/3 of compute hidden for allreduce/acpsgd/ddp_allreduce)")
    print(f"{'method':<14} {'step meas':>9} {'model':>8} {'err':>7} {'window':>8} {'err':>7} {'comm meas':>9} "
          f"{'model':>8} {'hidden meas':>11} {'model':>8} {'alone':>6} {'+fwd':>5} {'+bwd':>5} {'+post':>6}")
    for m in TRAIN_METHODS:
        x = rows.get(m)
        if x is None:
            continue
        print(f"{m:<14} {x['meas_step_ms']:9.0f} {x['model_step_ms']:8.0f} {100 * x['err']:+6.1f}% "
              f"{x['window_step_ms']:8.0f} {100 * x['window_err']:+6.1f}% {x['meas_comm_ms']:9.0f} "
              f"{x['model_comm_ms']:8.0f} {x['meas_hidden_ms']:11.0f} {x['model_hidden_ms']:8.0f} "
              f"{x['alone_step_ms']:6.0f} {x['extra_fwd_ms']:5.0f} {x['compress_bwd_ms']:5.0f} "
              f"{x['compress_post_ms']:6.0f}" + ("  (constants fitted on it)" if x["serial_fit"] else ""))
    errs = [abs(x["err"]) for x in rows.values()]
    print(f"# largest |error| {100 * max(errs):.1f}%; within 15%: {sum(e <= 0.15 for e in errs)}/{len(errs)} methods")
    for m in ("allreduce", "acpsgd", "ddp_allreduce"):
        x = rows.get(m)
        if x and x["launch_ready"]:
            print(f"# {m}: launches ready at " + ", ".join(f"{v:.2f}" for v in x["launch_ready"])
                  + " of backward (readiness profile); measured launch times: "
                  + (", ".join(f"{v:.2f}" for v in x["meas_launch_frac"]) or "-"))


# ----------------------------------------------------------------------------------------- project
def project(methods, gpus, bws, shapes, opts, consts, compression: Dict[str, Compression], compute_ms: float,
            overlap: bool, backward_fraction: float, ready: Optional[Sequence[float]] = None) -> Dict[tuple, float]:
    """(Gbit/s, N, method) -> modelled step time in ms. ``ready`` (a readiness profile): the launch-during-backward
    term (``overlap_step``: backward = ``backward_fraction`` x compute, the rest before it, compression after
    backward) instead of the window term (``step_ms``)."""
    table = {}
    for bw in bws:
        for n in gpus:
            for m in methods:
                if applicable(m, n, opts):
                    continue
                c = compression.get(m)
                cms = c.at(n) if c else 0.0
                if ready is not None and overlap:
                    fn = lambda colls, bw=bw: 1e3 * comm_seconds(colls, bw * 1e9, consts)  # noqa: E731
                    table[(bw, n, m)] = overlap_step((1 - backward_fraction) * compute_ms,
                                                     backward_fraction * compute_ms, 0.0, ready,
                                                     backward_schedule(m, shapes, n, opts), fn, 0.0, cms)["step_ms"]
                    continue
                t = comm_seconds(collectives(m, shapes, n, opts), bw * 1e9, consts)
                table[(bw, n, m)] = step_ms(m, t, compute_ms, cms, overlap, backward_fraction)
    return table


def print_projection(title: str, table, methods, gpus, bws) -> None:
    print(f"\n## {title}")
    print("step time in ms, and speed-up over S-SGD (allreduce) at the same size and link")
    print(f"{'Gbit/s':>6} {'GPUs':>5} " + " ".join(f"{m:>15}" for m in methods))
    for bw in bws:
        for n in gpus:
            cells = []
            for m in methods:
                v = table.get((bw, n, m))
                cells.append(f"{'n/a':>15}" if v is None else f"{v:8.1f} {table[(bw, n, 'allreduce')] / v:5.2f}x")
            print(f"{bw:>6g} {n:>5} " + " ".join(cells))


def print_hierarchical(rows: List[dict], bound: Dict[tuple, float], consts: Constants, compute_ms: float,
                       gpus_per_node: int, nics_per_node: int, overlap: bool, backward_fraction: float,
                       compress: Dict[str, float]) -> None:
    """The flat-vs-hierarchical table with its assumptions; ``bound``: (bw, gpus, method) -> hierarchical
    over flat step speed-up with every latency at 0."""
    print(f"\n## flat vs hierarchical (node-aware): {gpus_per_node} GPUs per node, {nics_per_node} network link(s) "
          f"of BW per node")
    print(f"# network: alpha {consts.alpha_s * 1e6:.1f} us per ring hop, eta {consts.eta:.3f} ({consts.source}); "
          f"intra-node: {consts.intra_bw_bits / 8e9:g} GB/s, {consts.intra_alpha_s * 1e6:g} us per ring hop (inputs: "
          f"NVLink-class, see the module docstring)")
    print(f"# step = compute {compute_ms:g} ms (input) + compression ("
          + (", ".join(f"{k} {v:g} ms" for k, v in compress.items()) + "; hierarchical: / GPUs per node"
             if compress else "none: the bound a fast GPU implementation approaches")
          + ") + communication; flat "
          + (f"allreduce/acpsgd hide up to {backward_fraction:.2f} x compute behind backward" if overlap else "no overlap")
          + "; hierarchical: no overlap (the node mean needs every gradient)")
    print("# net MB/node: bytes a node sends over its network link per step (flat: one rank's ring sends; "
          "hierarchical: its local ranks' cross-node sends); comm = network + intra-node (hierarchical)")
    print("# speed-up = flat step / hierarchical step of the same method; x S-SGD = flat allreduce step / "
          "hierarchical step; alpha=0: the speed-up with every latency at 0 (bandwidth only)")
    print(f"{'Gbit/s':>6} {'GPUs':>4} {'nodes':>5} {'method':<10} {'netMB/node flat':>15} {'hier':>8} "
          f"{'comm ms flat':>12} {'hier':>8} {'(net':>8} {'+ intra)':>8} {'step ms flat':>12} {'hier':>8} "
          f"{'speed-up':>8} {'x S-SGD':>7} {'alpha=0':>7}")
    base = {(r["bw"], r["gpus"]): r["flat_step_ms"] for r in rows if r["method"] == "allreduce"}
    for r in rows:
        f, h = r["flat"], r["hier"]
        key = (r["bw"], r["gpus"])
        ssgd = f"{base[key] / r['hier_step_ms']:6.2f}x" if key in base else f"{'-':>7}"
        b = bound.get((r["bw"], r["gpus"], r["method"]))
        print(f"{r['bw']:>6g} {r['gpus']:>4} {r['nodes']:>5} {r['method']:<10} {f['net_bytes_node'] / 1e6:15.3f} "
              f"{h['net_bytes_node'] / 1e6:8.3f} {1e3 * f['comm_s']:12.1f} {1e3 * h['comm_s']:8.1f} "
              f"{1e3 * h['net_s']:8.1f} {1e3 * h['intra_s']:8.2f} {r['flat_step_ms']:12.1f} {r['hier_step_ms']:8.1f} "
              f"{r['flat_step_ms'] / r['hier_step_ms']:7.2f}x {ssgd} "
              + (f"{b:6.2f}x" if b is not None else f"{'-':>7}"))


DEFAULT_COMPUTE_MS = 30.5   # a ResNet-50 bf16 step at batch 64 on an H100: an input


def assumption_lines(consts: Constants, bws: Sequence[float], compute_ms: float, overlap: bool,
                     backward_fraction: float, hierarchical: bool = False, gpus_per_node: int = 8,
                     nics_per_node: int = 1, model: str = "", numel: int = 0, compression: str = "",
                     overlap_text: Optional[str] = None) -> List[str]:
    """The projection's assumptions, as the CLI prints them next to its table: link bandwidth, latency per hop
    and its source, efficiency and its source, compute time, overlap, intra-node link (hierarchical),
    compression."""
    rates = ", ".join(f"{b:g}" for b in bws)
    lines = ["## assumptions (inputs and constants of this projection, not GPU measurements)"]
    if model:
        lines.append(f"# model: {model} ({numel:,} fp32 values sent as gradients)")
    if hierarchical:
        lines.append(f"# network: {rates} Gbit/s per link; {gpus_per_node} GPUs per node sharing {nics_per_node} "
                     f"link(s) per node; non-blocking switch; a flat ring spanning nodes prices every hop at alpha")
    else:
        lines.append(f"# network: {rates} Gbit/s per link; one link per GPU (each GPU a host), non-blocking switch; "
                     f"every ring hop a network hop")
    lines.append(f"# constants ({consts.source}): alpha = {consts.alpha_s * 1e6:.1f} us per ring hop, "
                 f"eta = {consts.eta:.3f} of the link rate")
    lines.append(f"#   latency source: {consts.alpha_source or consts.source}")
    lines.append(f"#   eta source: {consts.eta_source or consts.source}")
    lines.append(f"# compute: {compute_ms:g} ms/step (input"
                 + ("; the default is a ResNet-50 bf16 step at batch 64 on an H100)"
                    if compute_ms == DEFAULT_COMPUTE_MS else ")"))
    ov = (f"allreduce/acpsgd communication (launched during backward) hides behind backward = "
          f"{backward_fraction:.2f} x compute (input); the other methods communicate after backward"
          if overlap else "none (--no-overlap): compute + compression + communication in series")
    if overlap and overlap_text:
        ov = overlap_text
    lines.append(f"# overlap: {'flat: ' if hierarchical else ''}{ov}"
                 + ("; hierarchical: none (the node mean needs every gradient)" if hierarchical else ""))
    if hierarchical:
        lines.append(f"# intra-node: {consts.intra_bw_bits / 8e9:g} GB/s, {consts.intra_alpha_s * 1e6:g} us per ring "
                     f"hop ({INTRA_SOURCE})")
    if compression:
        lines.append(f"# compression: {compression}")
    return lines


def _has_results(path: str) -> bool:
    """Whether ``path`` holds bench-cluster results (without raising, unlike ``load_results``)."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else ([p] if p.is_file() else [])
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("kind") == "benchmarks.cluster":
            return True
    return False


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _parse_compress(items: Sequence[str]) -> Dict[str, float]:
    out = {}
    for it in items:
        for kv in it.split(","):
            if not kv.strip():
                continue
            k, _, v = kv.partition("=")
            try:
                if k not in LABELS:
                    raise ValueError
                out[k] = float(v)
            except ValueError:
                raise SystemExit(f"--compress-ms {kv!r}: expected METHOD=MS with METHOD one of "
                                 f"{', '.join(LABELS)}") from None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.costmodel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=None, help="comma list (default: all; with --hierarchical: "
                                                    "allreduce,powersgd,acpsgd,topk,exdyna,local_qsr)")
    ap.add_argument("--gpus", default=None, help="data-parallel ranks to project to (default 8,16,32,64; "
                                                 "with --hierarchical 16,32,64)")
    ap.add_argument("--bandwidth", default="1,10,100", help="link rates in Gbit/s")
    ap.add_argument("--model", default="resnet50", help="registered model whose gradient shapes are sent")
    ap.add_argument("--compute-ms", type=float, default=DEFAULT_COMPUTE_MS,
                    help="per-step compute time, an input (default: ResNet-50 bf16 batch 64 on an H100)")
    ap.add_argument("--backward-fraction", type=float, default=2.0 / 3.0,
                    help="share of the compute that is backward (allreduce/acpsgd communication hides there)")
    ap.add_argument("--no-overlap", action="store_true", help="serial: no communication hidden behind backward")
    ap.add_argument("--overlap", choices=("window", "launch"), default=None,
                    help="window (default): allreduce/acpsgd hide up to --backward-fraction x compute; launch: each "
                         "bucket / fusion group is launched when its gradients are ready during backward and the link "
                         "serves launches in order (overlap_step), readiness estimated from multiply-accumulates at "
                         "--image-size unless --overlap-from gives a measured profile")
    ap.add_argument("--overlap-from", default=None, metavar="BENCH_TRAIN_DIR",
                    help="run/bench-train.sh results: check the launch term against them (per method) and project "
                         "with it, using their measured readiness profile when they trained --model (implies "
                         "--overlap launch)")
    ap.add_argument("--image-size", type=int, default=224,
                    help="input size of the readiness estimate (--overlap launch)")
    ap.add_argument("--fit", nargs="*", default=None, metavar="RESULTS",
                    help="use the CPU emulation's constants instead of the GPU default: fit them on bench-cluster "
                         "result files/directories (default runs/bench-cluster; without results there, the fit "
                         "recorded in the README), compression on every N, and print the model's error at every N")
    ap.add_argument("--compress-file", default=None,
                    help="run/bench-compress.sh output from a GPU machine: its CUDA times replace allreduce/"
                         "powersgd/acpsgd compression")
    ap.add_argument("--compress-ms", action="append", default=[], metavar="METHOD=MS,...",
                    help="fixed compression times per method (e.g. measured on a GPU)")
    ap.add_argument("--alpha-us", type=float, default=None,
                    help=f"replace the latency per ring hop, microseconds (default {NCCL_NET_ALPHA_S * 1e6:g}: NCCL's "
                         f"latency model, InfiniBand/RoCE)")
    ap.add_argument("--eta", type=float, default=None,
                    help=f"replace the bandwidth-efficiency constant (default {EMULATION_ETA:.3f})")
    ap.add_argument("--qsr-h", type=int, default=None, help="QSR period H for local_qsr (default 4: the ViT-B "
                    "recipe at peak LR; its whole schedule averages 93,600/9,711 = 9.64 steps per sync)")
    ap.add_argument("--hierarchical", action="store_true",
                    help="project flat vs hierarchical (node-aware) mode per method instead (module docstring)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node, for --hierarchical")
    ap.add_argument("--nics-per-node", type=int, default=1,
                    help="network links of --bandwidth per node, shared by its ranks (--hierarchical)")
    ap.add_argument("--intra-bw", type=float, default=INTRA_BW_BITS / 1e9,
                    help="intra-node bandwidth in Gbit/s (default 1600 = 200 GB/s, NVLink-class; an input)")
    ap.add_argument("--intra-alpha-us", type=float, default=INTRA_ALPHA_S * 1e6,
                    help="intra-node latency per ring hop, microseconds (an input)")
    ap.add_argument("--png", default="runs/costmodel/projection.png", help="plot path ('' for none)")
    ap.add_argument("--csv", default=None, help="also write both projections as CSV")
    args = ap.parse_args(argv)

    if args.methods is None:
        args.methods = ("allreduce,powersgd,acpsgd,topk,exdyna,local_qsr" if args.hierarchical
                        else ",".join(ALL_METHODS))
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in LABELS]
    if bad:
        print(f"--methods: unknown {', '.join(bad)}; known: {', '.join(LABELS)}", file=sys.stderr)
        return 2
    if "allreduce" not in methods:
        methods.insert(0, "allreduce")  # the baseline of every speed-up
    if args.gpus is None:
        args.gpus = "16,32,64" if args.hierarchical else "8,16,32,64"
    try:
        gpus = [int(x) for x in _floats(args.gpus)]
        bws = _floats(args.bandwidth)
    except ValueError as e:
        print(f"--gpus / --bandwidth: comma-separated numbers ({e})", file=sys.stderr)
        return 2
    if not gpus or not bws or min(gpus) < 1 or min(bws) <= 0:
        print("--gpus / --bandwidth: positive numbers", file=sys.stderr)
        return 2
    opts = MethodOptions()
    compression = dict(DEFAULT_COMPRESSION)
    comp_src = "built in (bench-cluster on this CPU)"
    if args.fit is not None and not args.fit and not _has_results("runs/bench-cluster"):
        consts = replace(EMULATION_FIT_CONSTANTS)
        print("# --fit: no bench-cluster results in runs/bench-cluster: the CPU emulation's fit recorded in the "
              "README (run: sudo bash run/bench-cluster.sh to fit your own)")
    elif args.fit is not None:
        results = load_results(args.fit or ["runs/bench-cluster"])
        consts, compression = fit_from_results(results)
        opts = options_of(next((r for r in results if r["world"] == 4), results[0]))
        bw = fit_bandwidth(results, 4)
        comp_src = "fitted on " + ", ".join(sorted({Path(r["_file"]).name for r in results if r["bw_bits"] == bw}))
        print_check(results, consts, args.compute_ms)
    else:
        consts = replace(DEFAULT_CONSTANTS)
    if args.qsr_h is not None:
        opts.qsr_h_base, opts.qsr_alpha = args.qsr_h, 0.0
    if args.alpha_us is not None:
        if args.alpha_us < 0:
            print("--alpha-us must be >= 0", file=sys.stderr)
            return 2
        consts = replace(consts, alpha_s=args.alpha_us * 1e-6, source=f"alpha given, eta {consts.source}",
                         alpha_source=f"given (--alpha-us {args.alpha_us:g})")
    if args.eta is not None:
        if args.eta <= 0:
            print("--eta must be > 0", file=sys.stderr)
            return 2
        consts = replace(consts, eta=args.eta, source=f"eta given, alpha {consts.source}",
                         eta_source=f"given (--eta {args.eta:g})")
    if args.intra_bw <= 0 or args.intra_alpha_us < 0 or args.gpus_per_node < 1 or args.nics_per_node < 1:
        print("--intra-bw must be > 0, --intra-alpha-us >= 0, --gpus-per-node and --nics-per-node >= 1",
              file=sys.stderr)
        return 2
    consts.intra_bw_bits, consts.intra_alpha_s = args.intra_bw * 1e9, args.intra_alpha_us * 1e-6
    given = read_compress_file(args.compress_file) if args.compress_file else {}
    given.update(_parse_compress(args.compress_ms))
    for m, v in given.items():
        compression[m] = Compression("constant", v, 0.0)
    if given:
        comp_src += f"; given: {', '.join(f'{k} {v:g} ms' for k, v in given.items())}"
    shapes = model_shapes(args.model)
    numel = sum(_numel(s) for s in shapes)
    overlap = not args.no_overlap
    ready, overlap_text = None, None
    if args.overlap_from is not None or args.overlap == "launch":
        if args.hierarchical:
            print("--overlap launch / --overlap-from: flat projections only (hierarchical mode never overlaps)",
                  file=sys.stderr)
            return 2
        src = None
        if args.overlap_from is not None:
            from benchmarks.train import load_dir, merged

            mg = merged(load_dir(args.overlap_from))
            print_train_check(train_check(mg))
            print()
            if mg["model"] == args.model:
                ready = list(next(iter(mg["rows"].values()))["alone"]["ready_frac"])
                src = (f"measured in {args.overlap_from} ({mg['model']} {mg['image_size']}px, compute alone on this "
                       f"CPU)")
        if ready is None:
            ready = flop_ready_fractions(args.model, args.image_size)
            src = f"estimated from multiply-accumulates ({args.model}, {args.image_size}px)"
        sched = backward_schedule("allreduce", shapes, 2, opts)
        overlap_text = (f"launch term: allreduce buckets and acpsgd fusion groups are launched during backward "
                        f"(= {args.backward_fraction:.2f} x compute, input) when their gradients are ready (readiness "
                        f"{src}; allreduce's {len(sched[0][1])} buckets ready at "
                        + ", ".join(f"{v:.2f}" for v in _launch_ready(sched, ready))
                        + " of backward), the link serves launches in order and what remains at the end of backward "
                          "is exposed; compression after backward; the other methods communicate after backward")
    if args.hierarchical:
        hier_given = {m: v for m, v in given.items() if m in methods and m in HIER_METHODS}
        comp_note = (f"given: {', '.join(f'{k} {v:g} ms' for k, v in hier_given.items())} for the flat method, "
                     f"/ {args.gpus_per_node} (its shard) for hierarchical" if hier_given
                     else "none (left out: the bound a fast GPU implementation approaches; --compress-ms gives it)")
    else:
        comp_note = (f"A: per method below, {comp_src}; B: none (the bound a fast GPU implementation "
                     f"approaches)")
    print("\n".join(assumption_lines(consts, bws, args.compute_ms, overlap, args.backward_fraction,
                                     args.hierarchical, args.gpus_per_node, args.nics_per_node, args.model, numel,
                                     comp_note, overlap_text)))
    if args.hierarchical:
        print(f"# local_qsr: H = {opts.qsr_h}; rank {opts.rank}; density {opts.density}")
        return _main_hierarchical(args, methods, gpus, bws, shapes, opts, consts, given, overlap)
    print(f"# compression ms/step at N = {', '.join(str(n) for n in gpus)} ({comp_src}):")
    for m in methods:
        c = compression.get(m)
        if c is None:
            print(f"#   {m:<10} none measured: 0")
            continue
        form = {"constant": f"{c.a:.1f}", "linear": f"{c.a:.1f} + {c.b:.2f} N", "inverse": f"{c.a:.1f} + {c.b:.1f} / N"}
        print(f"#   {m:<10} {form[c.form]:<18} -> " + ", ".join(f"{c.at(n):.0f}" for n in gpus))
    print(f"# local_qsr: H = {opts.qsr_h}; dssync: {opts.dssync_groups} groups, every step; rank {opts.rank}; "
          f"density {opts.density}")
    with_c = project(methods, gpus, bws, shapes, opts, consts, compression, args.compute_ms, overlap,
                     args.backward_fraction, ready)
    without = project(methods, gpus, bws, shapes, opts, consts, {}, args.compute_ms, overlap,
                      args.backward_fraction, ready)
    print_projection("projection A: compression at the speed measured on this CPU (one thread)",
                     with_c, methods, gpus, bws)
    print_projection("projection B: compression free (communication + compute only; the bound a fast GPU "
                     "implementation approaches)", without, methods, gpus, bws)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w") as f:
            f.write("projection,bandwidth_gbit,gpus,method,step_ms,speedup_over_ssgd\n")
            for name, table in (("A_cpu_compression", with_c), ("B_no_compression", without)):
                for (bw, n, m), v in sorted(table.items()):
                    f.write(f"{name},{bw:g},{n},{m},{v:.3f},{table[(bw, n, 'allreduce')] / v:.4f}\n")
        print(f"# csv: {args.csv}")
    if args.png:
        plot(with_c, without, methods, gpus, bws, args.png, consts, args.compute_ms)
    return 0


def _main_hierarchical(args, methods, gpus, bws, shapes, opts, consts, given, overlap) -> int:
    g = args.gpus_per_node
    skipped = [m for m in methods if m not in HIER_METHODS]
    methods = [m for m in methods if m in HIER_METHODS]
    bad = [n for n in gpus if n % g]
    if bad:
        print(f"--gpus {', '.join(map(str, bad))}: not a multiple of --gpus-per-node {g}", file=sys.stderr)
        return 2
    if skipped:
        print(f"# no hierarchical mode, not projected: {', '.join(skipped)}")
    compress = {m: v for m, v in given.items() if m in methods}
    rows = project_hierarchical(methods, gpus, bws, shapes, opts, consts, args.compute_ms, g, args.nics_per_node,
                                overlap, args.backward_fraction, compress)
    free = Constants(0.0, consts.eta, consts.source, consts.intra_bw_bits, 0.0)
    bound = {(r["bw"], r["gpus"], r["method"]): r["flat_step_ms"] / r["hier_step_ms"]
             for r in project_hierarchical(methods, gpus, bws, shapes, opts, free, args.compute_ms, g,
                                           args.nics_per_node, overlap, args.backward_fraction, compress)}
    print_hierarchical(rows, bound, consts, args.compute_ms, g, args.nics_per_node, overlap, args.backward_fraction,
                       compress)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w") as f:
            f.write("bandwidth_gbit,gpus,nodes,method,flat_net_bytes_node,hier_net_bytes_node,hier_cross_bytes_rank,"
                    "hier_intra_bytes_rank,flat_comm_ms,hier_comm_ms,hier_net_ms,hier_intra_ms,flat_step_ms,"
                    "hier_step_ms,speedup,speedup_alpha0\n")
            for r in rows:
                fl, h = r["flat"], r["hier"]
                f.write(f"{r['bw']:g},{r['gpus']},{r['nodes']},{r['method']},{fl['net_bytes_node']:.0f},"
                        f"{h['net_bytes_node']:.0f},{h['cross_bytes']:.0f},{h['intra_bytes']:.0f},"
                        f"{1e3 * fl['comm_s']:.4f},{1e3 * h['comm_s']:.4f},{1e3 * h['net_s']:.4f},"
                        f"{1e3 * h['intra_s']:.4f},{r['flat_step_ms']:.4f},{r['hier_step_ms']:.4f},"
                        f"{r['flat_step_ms'] / r['hier_step_ms']:.4f},"
                        f"{bound[(r['bw'], r['gpus'], r['method'])]:.4f}\n")
        print(f"# csv: {args.csv}")
    return 0


MATPLOTLIB_MISSING = "# matplotlib is not installed: no plot written (pip install matplotlib; --png '' skips the plot)"


def projection_figure(with_c, without, methods, gpus, bws, consts, compute_ms):
    """The projection plot (needs matplotlib): one panel per link rate, speed-up over S-SGD per method (solid:
    projection A, dotted: B). The legend sits below the panels, outside every axes, so it hides no line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    width = 4.4 * len(bws)
    n_labels = len(methods) + 2                               # one per method, and solid A / dotted B
    ncol = max(1, min(n_labels, int(width / 2.0)))            # ~2 inches per legend entry at fontsize 7
    rows = -(-n_labels // ncol)
    legend_in = 0.15 + 0.17 * rows                            # the legend's own strip below the panels
    height = 3.6 + legend_in
    fig, axes = plt.subplots(1, len(bws), figsize=(width, height), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bw in zip(axes[0], bws):
        for i, m in enumerate(methods):
            for table, style, label in ((with_c, "-", LABELS[m]), (without, ":", None)):
                xs = [n for n in gpus if (bw, n, m) in table]
                ys = [table[(bw, n, "allreduce")] / table[(bw, n, m)] for n in xs]
                ax.plot(xs, ys, style, marker="o" if style == "-" else None, color=colors[i % len(colors)],
                        label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(gpus)
        ax.set_xticklabels([str(n) for n in gpus])
        ax.set_title(f"{bw:g} Gbit/s")
        ax.set_xlabel("GPUs")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over S-SGD (step time)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], color="black", ls="-", marker="o"), Line2D([], [], color="black", ls=":")]
    labels += ["A: CPU-measured compression", "B: compression free"]
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=7,
               frameon=False)
    import textwrap

    title = textwrap.wrap(f"cost model: alpha {consts.alpha_s * 1e6:.0f} us per hop, eta {consts.eta:.2f} "
                          f"({consts.source}); compute {compute_ms:g} ms/step", int(width * 13))
    fig.suptitle("\n".join(title), fontsize=8)
    fig.set_figheight(height + 0.14 * (len(title) - 1))
    fig.tight_layout(rect=(0.0, legend_in / fig.get_figheight(), 1.0, 1.0))  # the suptitle: tight_layout's own
    return fig


def plot(with_c, without, methods, gpus, bws, path, consts, compute_ms) -> Optional[str]:
    """Write the projection plot to ``path``; without matplotlib, one line says so (stderr) and None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return None
    import matplotlib.pyplot as plt

    fig = projection_figure(with_c, without, methods, gpus, bws, consts, compute_ms)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# plot: {path}")
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
