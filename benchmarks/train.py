"""Real training steps of every method on the emulated cluster, beside PyTorch DDP's own hooks, alternated in one
sequence (the body of ``run/bench-train.sh``; the cluster run is root only, ``--local`` is not; the method and
every column: docs/dev/notes/bench-train.md).

    deepspeed --hostfile H --module benchmarks.train run --out DIR/train.json [--methods ...] [--rounds 3]
        [--steps 3] [--warmup 2] [--model resnet50] [--image-size 128] [--batch 4] [--bandwidth 500mbit]
    deepspeed --hostfile H --module benchmarks.train run --ddp --out DIR/ddp.json   # DDP's hooks only, no DeepSpeed
    python -m benchmarks.train report DIR                   # DIR/table.md, DIR/results.json, the model check

``run`` (every rank, one process per emulated host, started by the DeepSpeed launcher through pdsh/ssh, or
locally by ``tests/harness.run``) trains a real model -- forward, cross-entropy loss, backward, optimizer step
(SGD, lr 0.008, momentum 0.9, fp32) -- on a fixed synthetic batch per rank (``--batch`` images of
``--image-size`` pixels, seeded by rank; the same batch every step), with each method from the same initial
weights:

* ds_ext's methods through DeepSpeed (``deepspeed.initialize`` + ``ds_ext.attach``, ZeRO 0, the user loop
  ``loss = f(engine(x)); engine.backward(loss); engine.step()`` unchanged), at the settings of
  ``ds_ext.costmodel.presets.method_specs``, and ``deepspeed``: DeepSpeed's own ZeRO-0 reduction (one flat
  all_reduce inside ``engine.backward``, after autograd);
* PyTorch ``DistributedDataParallel`` (its defaults: 25 MiB buckets, first bucket 1 MiB, rebuilt in the ready
  order after step 1, buffers broadcast at forward) on the same gloo process group, never calling DeepSpeed,
  with ``ddp.register_comm_hook`` given PyTorch's own hook functions, unmodified (``ddp_hook``):
  ``default_hooks.allreduce_hook`` (``ddp_allreduce``), ``default_hooks.fp16_compress_hook`` (``ddp_fp16``, beside
  our ``half``), and ``powerSGD_hook.powerSGD_hook`` at rank 4, ``start_powerSGD_iter`` 2, otherwise PyTorch's
  defaults (error feedback, warm start, min_compression_rate 2: our compression rule) twice: ``ddp_powersgd``
  with DDP's default buckets, each bucket's call made after the previous bucket's future completed
  (``benchmarks.ddp_powersgd_gloo.serialized_hook``: without it PyTorch's hook aborts on gloo with several
  buckets, a race between its callbacks' collectives and backward's, reproduced in that module), and
  ``ddp_powersgd_1b`` in one bucket (the chain after backward). The registered hook is checked to be (or to
  wrap) the very function object (``ddp._comm_hooks``) and recorded.

**Alternation.** The methods and a ``compute alone`` entry (the plain model, no communication) run in ``--rounds``
rounds; every round runs each of them once: a fresh engine from the same weights, ``--warmup`` untimed steps (the
PowerSGD hooks: at least ``start_powerSGD_iter`` + 1, so its first compressed step, which allocates, is untimed),
a barrier, ``--steps`` timed steps (``local_qsr``: whole periods). The order is ``ORDER`` (each method next to its
baseline) rotated by round / rounds of its length, and reversed in every other round (A B, B A: a drift that is
linear in time hits both alike). ``--ddp`` runs DDP's hooks alone without importing DeepSpeed (a check that
DeepSpeed in the process changes nothing; its ratios then come from medians, not rounds).

Each rank is pinned to one core (``--no-pin`` leaves it): ``os.sched_setaffinity`` on every thread of the
process (``/proc/self/task``), core = its global rank modulo the cores it may use, before the process group
starts (gloo's threads inherit it) and again after every engine is built; the threads' masks are recorded.

Measured per step and rank (``benchmarks.train_measure``): forward end, gradients ready (the last
``post_accumulate_grad`` hook), step end; the main thread's and the process's CPU time per phase; every
collective's launch and completion (ds_ext's through ``ds_ext.comm.observe``, DDP's and DeepSpeed's through a
wrapped ``torch.distributed.all_reduce``; completion = the work's future). No barrier inside the timed steps. The
report's arithmetic (medians over rounds, spreads, ratios within a round, overlap, first launch, tail):
``benchmarks.train_stats``.

Before the rounds, a longer compute alone (``--warmup`` + ``--steps`` x ``--rounds`` steps) measures the readiness
profile (when each gradient is ready, as a fraction of backward: the cost model's overlap input) and ``exdyna``'s
starting threshold: the |g| quantile of its target density (mean over ranks of a 1M-value sample quantile; the
seed's ``1/(2 sqrt k)`` start is far off for real gradient magnitudes) -- a deliberate deviation, as in
``benchmarks.cluster``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.results import merged
from benchmarks.train_measure import (CollectiveRecorder, ReadyClock, _loop, pin_threads,  # noqa: F401
                                      thread_masks)
from benchmarks.train_report import compare, report, table_markdown
from benchmarks.train_stats import rank_round
from ds_ext.comm import barrier as world_barrier
from ds_ext.comm import world as comm_world
from ds_ext.costmodel.presets import ALL_METHODS, DDP_METHODS, TRAIN_METHODS, MethodOptions, applicable, method_specs

#: ds_ext's methods (the presets and DeepSpeed's own reduction) and PyTorch DDP's hooks, from the one roster
DS_METHODS = tuple(m for m in TRAIN_METHODS if m not in DDP_METHODS)
METHODS = TRAIN_METHODS
#: the run order of one round before rotation: each method next to the baseline it is compared with
ORDER = ("allreduce", "ddp_allreduce", "powersgd", "ddp_powersgd", "acpsgd", "ddp_powersgd_1b", "half", "ddp_fp16",
         "topk", "exdyna", "signsgd", "local_qsr", "dssync", "deepspeed")
ALONE = "alone"     #: the compute-alone entry of each round
LR = 0.008           # the QSR recipe's peak LR: H = max(4, floor((0.0175 / 0.008)^2)) = 4
MOMENTUM = 0.9
DDP_START_POWERSGD_ITER = 2  # PyTorch's minimum with error feedback / warm start (its first 2 steps: allreduce)
DDP_POWERSGD = ("ddp_powersgd", "ddp_powersgd_1b")


def default_methods(ddp: bool = False) -> List[str]:
    """Every method of the roster in ``ORDER`` (then any other preset), or DDP's alone."""
    known = list(DDP_METHODS if ddp else METHODS)
    return [m for m in ORDER if m in known] + [m for m in known if m not in ORDER]


def sequence(methods: List[str], rounds: int) -> List[List[str]]:
    """The run order of every round: compute alone and ``methods``, rotated by ``round * len // rounds`` and
    reversed in odd rounds."""
    entries = [ALONE] + list(methods)
    n = len(entries)
    out = []
    for r in range(rounds):
        k = (r * n) // rounds
        order = entries[k:] + entries[:k]
        out.append(order[::-1] if r % 2 else order)
    return out


def ddp_hook(method: str, process_group=None, rank: int = 4):
    """(hook, state) handed to ``DistributedDataParallel.register_comm_hook`` for a DDP method: PyTorch's own hook
    functions, unmodified (``ddp_powersgd``: called through ``serialized_hook``)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from benchmarks.ddp_powersgd_gloo import serialized_hook

    if method == "ddp_allreduce":
        return default_hooks.allreduce_hook, process_group
    if method == "ddp_fp16":
        return default_hooks.fp16_compress_hook, process_group
    if method in DDP_POWERSGD:
        state = powerSGD_hook.PowerSGDState(process_group=process_group, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=DDP_START_POWERSGD_ITER)
        hook = powerSGD_hook.powerSGD_hook
        return (serialized_hook(hook) if method == "ddp_powersgd" else hook), state
    raise ValueError(f"not a DDP method: {method!r} (known: {', '.join(DDP_METHODS)})")


def method_block(method: str, opts: MethodOptions) -> dict:
    """The ``ds_ext.attach`` method dict of a ds_ext method (``deepspeed``: DeepSpeed's own reduction)."""
    if method == "deepspeed":
        return {"reducer": {"name": "deepspeed"}, "sync": {"name": "none"}}
    rname, ropts, sname, sopts = method_specs(opts)[method]
    return {"reducer": {"name": rname, **ropts}, "sync": {"name": sname, **sopts}}


def make_batch(rank: int, batch: int, image: int, classes: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(batch, 3, image, image, generator=g), torch.randint(0, classes, (batch,), generator=g)


def build_model(name: str, classes: int):
    import torch

    from ds_ext.registry import MODELS, load_builtin

    load_builtin()
    torch.manual_seed(0)
    opts = {"num_classes": classes} if classes else {}
    return MODELS.build(name, opts)


def compute_alone(cfg, x, y, warmup: Optional[int] = None, steps: Optional[int] = None, grad: bool = True,
                  raw: bool = False):
    """Forward, backward and optimizer of the plain model on this core, no communication (``warmup`` + ``steps``
    steps; default the run's): the medians and the readiness profile, or with ``raw`` the timed samples."""
    import torch

    model = build_model(cfg["model"], cfg["classes"])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    params = [p for p in model.parameters() if p.requires_grad]
    clock = ReadyClock(params)
    ce = torch.nn.functional.cross_entropy

    def fwd():
        return ce(model(x), y)

    def step():
        opt.step()
        opt.zero_grad()

    _loop((fwd, lambda loss: loss.backward(), step), clock, None, cfg["warmup"] if warmup is None else warmup)
    samples = _loop((fwd, lambda loss: loss.backward(), step), clock, None, cfg["steps"] if steps is None else steps)
    if raw:
        clock.remove()
        for s in samples:
            s["ready_frac"] = None
        return samples, None
    grad_abs = None
    if grad:  # one more gradient, for exdyna's starting threshold
        loss = fwd()
        loss.backward()
        grad_abs = torch.cat([p.grad.reshape(-1) for p in params]).abs()
    clock.remove()
    med = lambda k: statistics.median(s[k] for s in samples)  # noqa: E731
    ready = [statistics.median(s["ready_frac"][i] for s in samples) for i in range(len(params))]
    out = {"fwd_ms": med("t_fwd"), "bwd_ms": statistics.median(s["t_ready"] - s["t_fwd"] for s in samples),
           "opt_ms": statistics.median(s["t_end"] - s["t_ready"] for s in samples), "step_ms": med("t_end"),
           "cpu_fwd_ms": med("cpu_fwd"), "cpu_bwd_ms": med("cpu_bwd"), "cpu_opt_ms": med("cpu_tail"),
           "other_bwd_ms": med("other_bwd"), "other_tail_ms": med("other_tail"),
           "ready_frac": ready, "steps": len(samples)}
    return out, grad_abs


def exdyna_threshold(grad_abs, density: float) -> float:
    """The |g| quantile that selects ``density`` of a 1M-value sample of this rank's gradient."""
    import torch

    g = torch.Generator().manual_seed(7)
    n = grad_abs.numel()
    sample = grad_abs[torch.randint(0, n, (min(n, 1 << 20),), generator=g)] if n > (1 << 20) else grad_abs
    k = max(1, int(round((1 - density) * sample.numel())))
    return float(sample.kthvalue(k).values)


def _ds_method(method, cfg, opts, x, y, world):
    import deepspeed
    import torch

    import ds_ext

    model = build_model(cfg["model"], cfg["classes"])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    config = {"train_batch_size": cfg["batch"] * world, "train_micro_batch_size_per_gpu": cfg["batch"],
              "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "steps_per_print": 10**12,
              "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    block = method_block(method, opts)
    if method == "exdyna" and cfg.get("exdyna_threshold") is not None:
        block["reducer"]["initial_threshold"] = cfg["exdyna_threshold"]
    att = ds_ext.attach(engine, block)
    ce = torch.nn.functional.cross_entropy
    parts = (lambda: ce(engine(x), y), engine.backward, engine.step)
    info = {"reducer": type(att.reducer).__name__, "sync": type(att.sync).__name__}

    def stats():
        out = {k: float(v) for k, v in att.reducer.stats().items() if isinstance(v, (int, float))}
        out.update({f"sync_{k}": float(v) for k, v in att.sync.stats().items() if isinstance(v, (int, float))})
        out["meter_bytes_total"] = float(att.meter.total_bytes)
        out["meter_steps"] = float(att.meter.steps)
        return out

    def close():
        att.detach()

    return engine.module, parts, info, stats, close


def _ddp_method(method, cfg, opts, x, y, world):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(cfg["model"], cfg["classes"])
    kw = {}
    if method == "ddp_powersgd_1b":  # one bucket: the whole gradient (the chain runs after backward)
        grad_mib = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        kw["bucket_cap_mb"] = int(grad_mib) + 1
    ddp = DistributedDataParallel(model, **kw)
    hook, state = ddp_hook(method, None, opts.rank)
    buckets: Dict[int, int] = {}

    def counted(st, bucket, hook=hook):  # the bucket layout the hook sees (DDP's logging keeps the first one)
        buckets[bucket.index()] = bucket.buffer().numel() * bucket.buffer().element_size()
        return hook(st, bucket)

    ddp.register_comm_hook(state, counted)
    registered = ddp._comm_hooks[-1][0]
    torch_fn = getattr(hook, "__wrapped__", hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    ce = torch.nn.functional.cross_entropy

    def step():
        opt.step()
        opt.zero_grad()

    info = {"hook": f"{torch_fn.__module__}.{torch_fn.__qualname__}", "serialized": hasattr(hook, "__wrapped__"),
            "hook_is_torch_function": registered is counted and torch_fn.__module__.startswith("torch."),
            "state": type(state).__name__ if state is not None and not hasattr(state, "size") else None,
            "matrix_approximation_rank": getattr(state, "matrix_approximation_rank", None),
            "start_powerSGD_iter": getattr(state, "start_powerSGD_iter", None),
            "min_compression_rate": getattr(state, "min_compression_rate", None),
            "gradient_as_bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False)),
            "bucket_bytes_cap": int(getattr(ddp, "bucket_bytes_cap", 0)),
            "bucket_cap_mb_given": kw.get("bucket_cap_mb")}

    def stats():
        return {"bucket_bytes": [buckets[k] for k in sorted(buckets)],
                "iteration": float(getattr(state, "iter", 0) or 0)}

    def close():
        pass

    return ddp, (lambda: ce(ddp(x), y), lambda loss: loss.backward(), step), info, stats, close


def _measure(m, cfg, opts, x, y, world, rec, align, core) -> dict:
    """One method once (one round): build, warm up, align, time ``cfg["steps"]`` steps (periods), close."""
    if m == ALONE:
        s, _ = compute_alone(cfg, x, y, cfg["warmup"], cfg["steps"], grad=False, raw=True)
        return {"samples": s, "period": 1}
    build = _ddp_method if m in DDP_METHODS else _ds_method
    module, parts, info, stats, close = build(m, cfg, opts, x, y, world)
    if core is not None:
        pin_threads(core)
    clock = ReadyClock([p for p in module.parameters() if p.requires_grad])
    period = opts.qsr_h if m == "local_qsr" else 1
    warm = max(cfg["warmup"], DDP_START_POWERSGD_ITER + 1 if m in DDP_POWERSGD else 0) * period
    rec.active = False
    _loop(parts, clock, None, warm)
    align()
    rec.active = True
    samples = _loop(parts, clock, rec, cfg["steps"] * period)
    rec.active = False
    clock.remove()
    info.update(stats())
    close()
    del module, parts
    return {"samples": samples, "period": period, "info": info, "masks": thread_masks()}


def bench(cfg: dict) -> Optional[dict]:
    """Every method of ``cfg["methods"]`` on this rank, in ``cfg["rounds"]`` rounds (module docstring; the process
    group is up); rank 0 returns the result (every rank's samples), the others None."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    core = cfg.get("core")
    torch.set_num_threads(1)
    opts = MethodOptions()
    rounds = int(cfg.get("rounds", 1))
    x, y = make_batch(rank, cfg["batch"], cfg["image_size"], cfg["classes"] or 1000)
    alone, grad_abs = compute_alone(cfg, x, y, steps=cfg["steps"] * rounds)
    thr = None
    if any(m == "exdyna" for m in cfg["methods"]):
        t = torch.tensor([exdyna_threshold(grad_abs, opts.density)], dtype=torch.float64)
        thr = float(comm_world().all_reduce(t)) / world
    del grad_abs
    cfg = dict(cfg, exdyna_threshold=thr)
    # a DDP-only launch (--ddp) has no DeepSpeed comm layer while it measures (DDP's collectives keep its ranks in
    # step) and imports DeepSpeed only afterwards, to gather the results
    align = (lambda: None) if cfg["ddp"] else world_barrier
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    skipped = {m: applicable(m, world, opts) for m in cfg["methods"] if m in ALL_METHODS}
    methods = [m for m in cfg["methods"] if not skipped.get(m)]
    order = sequence(methods, rounds)
    say(f"# bench-train: {world} ranks ({os.environ.get('LOCAL_SIZE', '?')} per host), link {cfg['bandwidth']}, "
        f"{cfg['model']} {cfg['image_size']}px batch {cfg['batch']}/rank, {rounds} rounds of {cfg['warmup']} warm-up "
        f"+ {cfg['steps']} timed steps per method, {'DDP only (no DeepSpeed)' if cfg['ddp'] else 'ds_ext + DDP'}, "
        f"torch {torch.__version__}; compute alone: fwd {alone['fwd_ms']:.0f} bwd {alone['bwd_ms']:.0f} opt "
        f"{alone['opt_ms']:.0f} ms")
    for m, why in skipped.items():
        if why:
            say(f"  {m}: skipped ({why})")
    rec = CollectiveRecorder()
    rec.install()
    per_method: Dict[str, dict] = {}
    reference = {"samples": [], "period": 1}
    seq_log: List[list] = []
    t_start = time.perf_counter()
    try:
        for r, names in enumerate(order):
            for m in names:
                t0 = time.perf_counter()
                got = _measure(m, cfg, opts, x, y, world, rec, align, core)
                for s in got["samples"]:
                    s["round"] = r
                seq_log.append([r, m, round(t0 - t_start, 3), round(time.perf_counter() - t0, 3),
                                round(os.getloadavg()[0], 2)])
                if m == ALONE:
                    reference["samples"] += got["samples"]
                else:
                    have = per_method.setdefault(m, dict(got, samples=[], info={}))
                    have["samples"] += got["samples"]
                    have["info"] = got["info"]
                gc.collect()
                if rank == 0:
                    s = rank_round(got["samples"], got["period"])
                    say(f"  {m:<15} rank 0 round {r}: step {s['step_ms']:8.1f} ms  fwd {s['fwd_ms']:6.1f}  bwd "
                        f"{s['bwd_ms']:7.1f}  after bwd {s['tail_ms']:7.1f}  comm {s['comm_ms']:8.1f}  overlap "
                        f"{s['overlap_ms']:7.1f} ms")
                align()
    finally:
        rec.uninstall()
    deepspeed_imported = "deepspeed" in sys.modules  # while measuring
    mine = {"rank": rank, "core": core, "masks": thread_masks(), "alone": alone, "methods": per_method,
            "reference": reference}
    if world > 1:
        import deepspeed.comm as dc

        if not dc.is_initialized():  # a DDP-only launch: DeepSpeed's comm layer over the existing process group
            from ds_ext.comm import init_distributed

            init_distributed(timeout_s=1800)
    gathered = comm_world().all_gather_object(mine)
    if rank != 0:
        return None
    return {"kind": "benchmarks.train", "world": world, "local_size": int(os.environ.get("LOCAL_SIZE", "1")),
            "bandwidth": cfg["bandwidth"], "model": cfg["model"], "image_size": cfg["image_size"],
            "batch": cfg["batch"], "classes": cfg["classes"] or 1000, "steps": cfg["steps"], "warmup": cfg["warmup"],
            "rounds": rounds, "order": order, "sequence": seq_log,
            "ddp": cfg["ddp"], "deepspeed_imported": deepspeed_imported, "pinned": core is not None,
            "options": opts.__dict__, "lr": LR, "momentum": MOMENTUM, "exdyna_threshold": thr,
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "shapes": [list(p.shape) for p in build_model(cfg["model"], cfg["classes"]).parameters()],
            "ranks": gathered}


# ------------------------------------------------------------------------------------------ entry points
def _cfg(args) -> dict:
    return {"methods": [m for m in args.methods.split(",") if m], "model": args.model, "image_size": args.image_size,
            "batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "bandwidth": args.bandwidth, "ddp": args.ddp}


def worker(rank: int, world: int, **cfg) -> Optional[dict]:
    """``tests/harness.run`` entry (the process group is up): ``bench`` with ``cfg`` (keys of ``_cfg``; the
    defaults of ``main``'s ``run``)."""
    base = {"model": "resnet18", "image_size": 32, "batch": 2, "classes": 10, "steps": 2, "warmup": 2, "rounds": 1,
            "bandwidth": "local", "ddp": False, "core": None}
    base.update(cfg)
    if base.get("pin"):
        cores = sorted(os.sched_getaffinity(0))
        base["core"] = cores[rank % len(cores)]
        pin_threads(base["core"])
    return bench(base)


def run(args) -> int:
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    core = None
    if not args.no_pin:
        cores = sorted(os.sched_getaffinity(0))
        core = cores[rank % len(cores)]
        pin_threads(core)
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(seconds=1800))  # torch's own group: DDP's and DeepSpeed's
    if not args.ddp:  # DeepSpeed's comm layer over it (a DDP-only launch imports no DeepSpeed while measuring)
        from ds_ext.comm import init_distributed

        init_distributed(timeout_s=1800)
    if core is not None:
        pin_threads(core)
    cfg = dict(_cfg(args), core=core)
    result = bench(cfg)
    if result is not None and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result))
        print(f"# results: {args.out}", flush=True)
        mg = merged([dict(result, _file=args.out)])
        print(table_markdown(mg), flush=True)
    world_barrier()
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one measurement (every rank; under the deepspeed launcher)")
    r.add_argument("--methods", default=None, help=f"comma list, run in this order before rotation (default: "
                                                   f"{','.join(default_methods())}; with --ddp: {','.join(DDP_METHODS)})")
    r.add_argument("--ddp", action="store_true", help="DDP's hooks only, without importing DeepSpeed")
    r.add_argument("--model", default="resnet50")
    r.add_argument("--image-size", type=int, default=128)
    r.add_argument("--batch", type=int, default=4, help="images per rank and step")
    r.add_argument("--classes", type=int, default=0, help="model classes (0: the model's default)")
    r.add_argument("--rounds", type=int, default=3, help="alternations: every method runs once per round")
    r.add_argument("--steps", type=int, default=3, help="timed steps per method and round (local_qsr: periods)")
    r.add_argument("--warmup", type=int, default=2, help="untimed steps per method and round (local_qsr: periods)")
    r.add_argument("--bandwidth", default="unknown", help="link rate label of this run (tc syntax: 500mbit)")
    r.add_argument("--no-pin", action="store_true", help="do not pin each rank to a core")
    r.add_argument("--out", default=None, help="JSON result file (written by rank 0)")
    r.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("report", help="table.md, results.json and the cost model's check of a result directory")
    p.add_argument("dir")
    p.add_argument("--no-check", action="store_true", help="the table only")
    c = sub.add_parser("compare", help="step and communication time with the links shaped vs unshaped")
    c.add_argument("shaped")
    c.add_argument("unshaped")
    args, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if not x.startswith("--local_rank") and not x.startswith("--local-rank")]
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "run":
        if args.methods is None:
            args.methods = ",".join(default_methods(args.ddp))
        ms = [m for m in args.methods.split(",") if m]
        bad = [m for m in ms if m not in METHODS]
        if bad:
            ap.error(f"--methods: unknown {', '.join(bad)}; known: {', '.join(METHODS)}")
        if args.ddp and any(m not in DDP_METHODS for m in ms):
            ap.error(f"--methods: {', '.join(m for m in ms if m not in DDP_METHODS)} cannot run with --ddp "
                     f"(DDP's hooks only, without DeepSpeed)")
        if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
            ap.error("--rounds and --steps must be >= 1, --warmup >= 0")
        return run(args)
    if args.cmd == "compare":
        return compare(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
