"""Rank-side functions for tests/dist/test_sparse.py (spawned by tests/harness.py).

Each ``drive`` call feeds a sparse reducer random per-rank gradients and records, next to what the
reducer applied, an exact reference computed with plain ``dist.all_reduce`` / ``all_gather``.
"""
from __future__ import annotations

import io

import torch
import torch.distributed as dist

# N = 33,925 >= 32 * 1024: the reference's block layout (block 32, remainder 1,157 to the last partition)
SHAPES = [(128, 256), (300,), (17, 50), (7,)]
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def profile(kind: str) -> torch.Tensor:
    """Per-coordinate gradient scale, identical on every rank (stationary across steps)."""
    if kind == "flat":
        return torch.ones(NUMEL)
    if kind == "left":  # the first eighth is 3x larger: the partition holding it is overloaded
        s = torch.ones(NUMEL)
        s[:NUMEL // 8] = 3.0
        return s
    if kind == "spike":  # nearly all mass in the first 1/16: partition 0 stays overloaded at any size
        s = torch.full((NUMEL,), 0.01)
        s[:NUMEL // 16] = 10.0
        return s
    raise ValueError(kind)


def raw_grads(rank: int, t: int, seed: int, scale: float, prof: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + t)
    return torch.randn(NUMEL, generator=g) * prof * scale


def _build(reducer, options, dtype, meter, comm=None):
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    return params, REDUCERS.build(reducer, options, named, meter=meter,
                                  comm=None if comm is None else comm.with_meter(meter))


def _set_grads(params, flat: torch.Tensor) -> None:
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view(p.shape).to(p.dtype).clone()
        off += n


def _applied(params) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in params])


def _gather_list(t: torch.Tensor, world: int, comm=None):
    """Variable-length all_gather through a padded tensor (reference side, not metered); ``comm``: a
    ``LoopbackWorld`` rank instead of the process group."""
    n = torch.tensor([t.numel()])
    if comm is None:
        ns = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(ns, n)
    else:
        ns = list(comm.all_gather(n))
    m = int(max(x.item() for x in ns))
    pad = torch.zeros(m, dtype=t.dtype)
    pad[:t.numel()] = t
    if comm is None:
        out = [torch.zeros_like(pad) for _ in range(world)]
        dist.all_gather(out, pad)
    else:
        out = list(comm.all_gather(pad))
    return [o[:int(k.item())] for o, k in zip(out, ns)]


def _sum(t: torch.Tensor, comm=None) -> None:
    """In-place sum over the ranks (reference side, not metered)."""
    if comm is None:
        dist.all_reduce(t)
    else:
        comm.all_reduce(t)


def drive(rank, world, reducer, options, steps=8, dtype="fp32", prof="flat", scale=0.01, seed=0,
          resume_at=None, comm=None):
    """Run ``steps`` reducer steps; record applied gradients and the exact references. ``comm``: a
    ``LoopbackWorld`` rank instead of the process group (reducer and references)."""
    from ds_ext.meter import CommMeter

    dt = DTYPES[dtype]
    meter = CommMeter()
    params, red = _build(reducer, options, dt, meter, comm)
    pr = profile(prof)
    rec = {k: [] for k in ("applied", "ref_applied", "mean_raw", "bytes", "stats", "local", "all_local",
                           "union", "ranges", "part", "partition", "threshold", "sel_match", "ks")}
    saved = None
    for t in range(steps):
        raw = raw_grads(rank, t, seed, scale, pr).to(dt)  # what the model produced, in its dtype
        _set_grads(params, raw)
        e_prev = red.error.clone() if red.error is not None else torch.zeros(NUMEL)
        g = e_prev + raw.float()  # the send buffer the reducer must see
        red.finish()
        rec["bytes"].append(meter.end_step())
        applied = _applied(params)
        rec["applied"].append(applied.clone())
        st = red.stats()
        rec["stats"].append(st)
        local = red.last["indices"].clone()
        rec["local"].append(local)
        all_local = _gather_list(local, world, comm)
        rec["all_local"].append(all_local)
        # the exact mean of the raw gradients
        m = raw.float().clone()
        _sum(m, comm)
        rec["mean_raw"].append(m / world)
        # reference applied gradient from everyone's send buffers
        summed = g.clone()
        _sum(summed, comm)
        ref = torch.zeros(NUMEL)
        if reducer == "exdyna" or options.get("exchange") == "union":
            union = torch.unique(torch.cat(all_local))
            ref[union] = summed[union] / world
        else:
            vdt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.get("value_dtype"), torch.float32)
            vals = _gather_list(g[local].to(vdt).float(), world, comm)
            for idx, v in zip(all_local, vals):
                ref.index_add_(0, idx, v)
            ref /= world
            union = torch.unique(torch.cat(all_local))
        rec["ref_applied"].append(ref.to(dt))
        rec["union"].append(union)
        # reference selection from this rank's send buffer
        if reducer == "exdyna":
            s, e = red.last["range"]
            want = (g[s:e].abs() >= red.threshold).nonzero().view(-1) + s
            if want.numel() == 0:
                want = torch.tensor([s + t % (e - s)])
            rec["sel_match"].append(torch.equal(want, local))
            rec["ranges"].append(red.ranges())
            rec["part"].append(list(red.part))
            rec["partition"].append(red.last["partition"])
            rec["threshold"].append(red.threshold)
            rec["ks"].append(list(red.last["ks"]))
        else:
            # a top-k set (ties allowed): k distinct indices, none smaller in |g| than any left out
            out = torch.ones(NUMEL, dtype=torch.bool)
            out[local] = False
            a = g.abs()
            is_topk = not out.any() or bool(a[local].min() >= a[out].max())
            rec["sel_match"].append(local.unique().numel() == red.k and is_topk)
        if resume_at is not None and t == resume_at:
            buf = io.BytesIO()
            torch.save(red.state_dict(), buf)  # a checkpoint round trip, not just a dict copy
            saved = buf.getvalue()
    rec["error"] = red.error.clone() if red.error is not None else None
    rec["numel"] = red.numel
    rec["k"] = red.k
    if reducer == "exdyna":
        rec["layout"] = (red.num_blocks, red.block_size, red.remainder)
        rec["min_blocks"] = red.min_blocks
    if saved is not None:
        params2, red2 = _build(reducer, options, dt, None, comm)
        red2.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False))
        rec["resumed"] = []
        for t in range(resume_at + 1, steps):
            _set_grads(params2, raw_grads(rank, t, seed, scale, pr).to(dt))
            red2.finish()
            rec["resumed"].append(_applied(params2).clone())
        rec["resumed_error"] = red2.error.clone()
        rec["resumed_state"] = {k: v for k, v in red2.state_dict().items() if k != "error"}
        rec["final_state"] = {k: v for k, v in red.state_dict().items() if k != "error"}
    return rec


def density_trace(rank, world, rule, steps=300, density=0.01, scale=0.003):
    """Achieved density / target per step with stationary synthetic gradients."""
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    red = REDUCERS.build("exdyna", {"density": density, "threshold_rule": rule},
                         [(f"p{i}", p) for i, p in enumerate(params)])
    pr = profile("flat")
    out = []
    for t in range(steps):
        _set_grads(params, raw_grads(rank, t, 7, scale, pr))
        red.finish()
        out.append(red.stats()["density"] / density)
    return out


def engine_run(rank, world, reducer, options, steps=6):
    """Train a few steps through a real DeepSpeed engine with the sparse reducer attached."""
    import ds_ext
    from tests.dist import workers

    engine = workers.make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, {"reducer": {"name": reducer, **options}}, check_every=1)
    record = []
    workers.train_steps(engine, att, rank, steps, 1, 8, record)
    return {"record": record, "init": workers.flat_params_of(workers.tiny_model()),
            "stats": att.reducer.stats(), "bytes": att.meter.total_bytes, "steps": att.meter.steps,
            "layout": (att.reducer.num_blocks, att.reducer.block_size, att.reducer.remainder)
            if reducer == "exdyna" else None}


def suite(rank, world, cases, comm=None):
    """Several named runs in one process group (or on ``comm``, a ``LoopbackWorld`` rank: ``drive`` only)."""
    out = {}
    for name, (fn, kw) in cases.items():
        out[name] = globals()[fn](rank, world, **kw) if comm is None else globals()[fn](rank, world, comm=comm, **kw)
    return out
