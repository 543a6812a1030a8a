"""Overlap with backward (the launch model).

What ``run/bench-train.sh`` measured (real training on the emulated cluster) and the window term above does not
have: a collective launched during backward waits for its last gradient, the link serves launched collectives
one after another, and whatever is still on the link when backward ends is exposed. ``overlap_step`` is that
queue; ``backward_schedule`` says, per method, which collectives wait for which gradients; the readiness profile
(the fraction of backward elapsed when each parameter's gradient is ready) is measured (bench-train's compute
alone) or estimated from the layers' multiply-accumulates (``flop_ready_fractions``).

Launch points per method (``backward_schedule``; each method's own layout function, so the model and the
reducer cannot drift apart):

* ``allreduce``: one all_reduce per bucket as it fills (``reducers/buckets.py``: first bucket 1 MiB).
* ``acpsgd``: one all_reduce per fusion group as it fills, a P-step and a Q-step variant.
* ``powersgd`` (``pipelined``, its default; ``reducers/powersgd_pipeline.py``): per fusion group, the group's
  P all_reduce when the group fills and the previous group's Q all_reduce right behind it (Q(k-1) is computed
  from P(k-1)'s result when group k launches), so launch k carries [P(k), Q(k-1)]; the last group's Q is issued
  after backward. ``pipelined: false``: P and Q after backward.
* ``signsgd`` (``pipelined`` with ``scale: tensor``, its default; ``reducers/signsgd.py``): per bucket (the
  S-SGD layout) the all_gathers of its packed signs and of its scales when it fills; ``scale: global`` after.
* ``topk`` and ``exdyna``: every collective after backward -- the selection is global (module docstring of
  ``reducers/sparse.py``); what they start in the gradient hooks is computation (error-feedback accumulation,
  ExDyna's partition count), not a launch. ``compression_split`` says which share of a method's compression
  time runs in the hooks (measured, ``HOOK_SHARE``); in ``overlap_step`` that share lengthens backward
  (``compress_bwd_ms``: the hooks run on the device that runs backward) and the rest follows it
  (``compress_post_ms``). So moving topk / ExDyna work into the hooks changes no step time here; it only
  shortens the step where the hook work runs beside backward (another stream or core), which the model does
  not assume."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

from ..comm import Collective
from ..reducers.buckets import fuse_ordered, fuse_reverse, numel_of
from .model import collectives
from .presets import MethodOptions


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


#: share of a method's compression time that runs in its gradient-ready hooks, with its default options (density
#: 0.001, rank 4): CPU time of the hooks / (hooks + ``finish()``), ResNet-50 gradients, 4 loopback ranks on this
#: 2-core CPU under load 8-13 (``python -m benchmarks.overlap_share --world 4``, 2026-12-07: hooks / finish ms
#: topk 22.0 / 486.5, exdyna 25.2 / 21.3, signsgd 81.1 / 70.2, powersgd 165.6 / 55.3). Methods not listed: 0
#: (``allreduce`` and ``acpsgd`` are priced by their launch points alone; the others start nothing in the hooks).
HOOK_SHARE = {"topk": 0.04, "exdyna": 0.54, "signsgd": 0.54, "powersgd": 0.75}


def compression_split(method: str, compress_ms: float) -> Tuple[float, float]:
    """``(in the hooks, after backward)`` ms of ``compress_ms`` (``HOOK_SHARE``): ``overlap_step``'s
    ``compress_bwd_ms`` and ``compress_post_ms``."""
    share = HOOK_SHARE.get(method, 0.0)
    return share * compress_ms, (1.0 - share) * compress_ms


def _reducer_options(method: str, opts: MethodOptions):
    from ..registry import REDUCERS, load_builtin

    from .presets import method_specs

    load_builtin()
    rname, ropts, _, _ = method_specs(opts)[method]
    entry = REDUCERS.get(rname)
    return entry.factory, entry.options(**ropts)


def _powersgd_launches(shapes, n: int, opts: MethodOptions) -> List[Tuple[float, List[Launch], List[Collective]]]:
    """Per fusion group: launch k = [P(k), Q(k-1)] when group k fills, Q(last) after backward (module docstring)."""
    from ..reducers.lowrank import matrix_dims
    from ..reducers.powersgd_pipeline import group_sizes

    cls, o = _reducer_options("powersgd", opts)
    if not o.pipelined:
        return [(1.0, [], cls.collectives(shapes, n, o))]
    dims = [matrix_dims(s, o.rank) for s in shapes]
    comp = [bool(r) and cls.compresses(nn, m, r, o.min_compression_rate) for nn, m, r, _ in dims]
    groups, p, q = group_sizes(dims, comp, o.bucket_mb * 2**20 / 4)
    ar = lambda elems: Collective("all_reduce", 4 * elems, n)  # noqa: E731
    launches = [Launch(g, [ar(p[k])] + ([ar(q[k - 1])] if k and q[k - 1] else [])) for k, g in enumerate(groups)]
    return [(1.0, launches, [ar(q[-1])] if groups and q[-1] else [])]


def _signsgd_launches(shapes, n: int, opts: MethodOptions) -> List[Tuple[float, List[Launch], List[Collective]]]:
    """Per bucket: the all_gathers of its signs and scales when it fills (module docstring)."""
    from ..reducers.signsgd import bucket_groups

    cls, o = _reducer_options("signsgd", opts)
    colls = cls.collectives(shapes, n, o)
    if not o.pipelined or o.scale != "tensor":
        return [(1.0, [], colls)]
    groups = bucket_groups([numel_of(s) for s in shapes], o)
    return [(1.0, [Launch(g, colls[2 * b:2 * b + 2]) for b, g in enumerate(groups)], [])]


def backward_schedule(method: str, shapes, n: int, opts: MethodOptions, ddp_one_bucket: bool = True
                      ) -> List[Tuple[float, List[Launch], List[Collective]]]:
    """Per variant of a step (weight, collectives launched during backward in launch order, collectives after
    backward): ``allreduce`` and ``half`` (2 bytes per element) one all_reduce per bucket (``reducers/buckets.py``'s
    layout: first bucket 1 MiB, reverse registration order; the measured ready order it is rebuilt in after step 1 is
    not known here) and ``acpsgd`` one per fusion group (a P-step and a Q-step, weight 1/2 each) wait for their
    gradients; ``ddp_allreduce`` per DDP bucket (first 1 MiB, then 25 MiB); ``ddp_powersgd`` with one bucket
    (``ddp_one_bucket``, one of bench-train's two rows) all_reduces the uncompressed tensors, P and Q after backward
    (with DDP's buckets, the other row: that chain per bucket, during backward); ``powersgd`` [P(k), Q(k-1)] per
    fusion group and ``signsgd`` per bucket (module docstring); ``deepspeed`` one flat all_reduce of every gradient
    after backward; every other method after backward (``collectives``)."""
    sizes = [4 * numel_of(s) for s in shapes]
    if method in ("allreduce", "half"):  # half: S-SGD's buckets (HalfReducer is an AllreduceReducer), 2-byte wire
        groups = fuse_ordered(sizes, int(opts.bucket_mb * 2**20), int(opts.first_bucket_mb * 2**20))
        wire = 2 if method == "half" else 4
        return [(1.0, [Launch(g, [Collective("all_reduce", wire * sum(sizes[i] for i in g) // 4, n)])
                       for g in groups], [])]
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
    if method == "powersgd":
        return _powersgd_launches(shapes, n, opts)
    if method == "signsgd":
        return _signsgd_launches(shapes, n, opts)
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


def launch_ready(schedule, ready) -> List[float]:
    """Ready fraction of each launch of the first variant (launch order), for printing."""
    out, prev = [], 0.0
    for la in schedule[0][1]:
        prev = max([prev] + [ready[i] for i in la.members])
        out.append(prev)
    return out
