"""Real training steps of every method on the emulated cluster, beside PyTorch DDP's own hooks (the body of
``run/bench-train.sh``; the cluster run is root only, ``--local`` is not).

    deepspeed --hostfile H --module benchmarks.train run --out DIR/ds.json [--methods ...] [--model resnet50]
        [--image-size 128] [--batch 4] [--steps 8] [--warmup 2] [--bandwidth 500mbit]
    deepspeed --hostfile H --module benchmarks.train run --ddp --out DIR/ddp.json      # PyTorch DDP, no DeepSpeed
    python -m benchmarks.train report DIR                   # DIR/table.md, DIR/results.json, the model check

``run`` (every rank, one process per emulated host, started by the DeepSpeed launcher through pdsh/ssh, or
locally by ``tests/harness.run``) trains a real model -- forward, cross-entropy loss, backward, optimizer step
(SGD, lr 0.008, momentum 0.9, fp32) -- on a fixed synthetic batch per rank (``--batch`` images of
``--image-size`` pixels, seeded by rank; the same batch every step), once per method, each from the same
initial weights:

* ds_ext's methods through DeepSpeed (``deepspeed.initialize`` + ``ds_ext.attach``, ZeRO 0, the user loop
  ``loss = f(engine(x)); engine.backward(loss); engine.step()`` unchanged): ``allreduce`` (S-SGD, 25 MiB
  buckets launched during backward), ``powersgd`` rank 4, ``acpsgd`` rank 4, ``topk`` and ``exdyna`` at
  density 0.001, ``signsgd``, ``local_qsr`` (reducer ``none`` + ``local``, period ``qsr``, alpha 0.0175 at
  lr 0.008: H = 4; timed over whole periods), ``dssync`` (2 groups; needs 4 ranks) -- the settings of
  ``ds_ext.costmodel.presets.method_specs`` -- and ``deepspeed``: DeepSpeed's own ZeRO-0 reduction (one flat
  all_reduce inside ``engine.backward``, after autograd);
* with ``--ddp``: PyTorch ``DistributedDataParallel`` without DeepSpeed (the process group from
  ``torch.distributed.init_process_group("gloo")``; ``deepspeed`` is not imported while measuring, which the result
  records as ``deepspeed_imported``, and no barrier is added: DDP's own collectives keep the ranks in step;
  afterwards DeepSpeed's comm layer is started over the same process group only to gather the results, because
  every collective of ds_ext goes through ``ds_ext.comm``)
  and its defaults (25 MiB buckets, first bucket 1 MiB, buffers broadcast at forward), with
  ``ddp.register_comm_hook`` given PyTorch's own hook functions, unmodified:
  ``default_hooks.allreduce_hook`` (``ddp_allreduce``) and ``powerSGD_hook.powerSGD_hook`` (``ddp_powersgd``,
  ``PowerSGDState(matrix_approximation_rank=4, start_powerSGD_iter=2)``, otherwise PyTorch's defaults: error
  feedback, warm start, min_compression_rate 2, the same rule as ours; one DDP bucket, because PyTorch's hook
  races on gloo with more: ``DDP_POWERSGD_ONE_BUCKET``); the registered hook is checked to be the very function
  object (``ddp._comm_hooks``) and recorded.

Each rank is pinned to one core (``--no-pin`` leaves it): ``os.sched_setaffinity`` on every thread of the
process (``/proc/self/task``), core = its global rank modulo the cores it may use, before the process group
starts (gloo's threads inherit it) and again after every engine is built; the threads' masks are recorded.
With 2 hosts x 1 rank on 2 cores every rank has a core of its own; 4 ranks on 2 cores put 2 ranks on each
core (oversubscribed: compute and communication of two ranks share it).

Measured per step and rank (``time.perf_counter``; timed steps only, after ``--warmup`` untimed ones):

* the step's timestamps: forward start, forward end (loss computed), gradients ready (the last
  ``post_accumulate_grad`` hook of any parameter: autograd's work is done), backward call returns, step
  returns (``engine.step()`` / ``optimizer.step()`` + ``zero_grad``); the main thread's CPU time
  (``time.thread_time``) of each phase and the process's (every thread: gloo's too);
* every collective's launch and completion: ds_ext's all_reduces and all_gathers through the communication
  layer's observer (``ds_ext.comm.observe``), DeepSpeed's reduction and both DDP hooks through a wrapped
  ``torch.distributed.all_reduce`` (the hooks themselves are not touched): launch = the call, completion = the work's future
  completing (a callback on ``work.get_future()``), or the return of a synchronous call. Nothing is made
  synchronous and no barrier runs inside the timed steps (one untimed barrier after the warm-up, DeepSpeed
  launches only): the collectives run as the methods launch them, so a collective's time includes waiting for a
  slower peer, as in real training;
* **communication** = the length of the union of the collectives' [launch, completion] intervals;
  **hidden behind backward** = the part of that union inside [forward end, gradients ready]; exposed =
  the rest (after backward: waits in ``finish``, DDP's end-of-backward wait, post-backward methods).

Before the methods, ``compute alone``: the same model, batch and optimizer in plain PyTorch (no process group
use at all) on the same pinned core, ``--warmup`` + ``--steps`` steps: forward, backward and optimizer times,
and the fraction of backward elapsed when each parameter's gradient was ready (the readiness profile the cost
model's overlap term reads); and again, 1 + ``--alone-steps`` steps, right before each method (its reference:
the machine's speed can drift between methods when it is shared). ``exdyna`` starts at the threshold that
selects its target density of the compute-alone gradients (mean over ranks of a 1M-value sample quantile; the
seed's ``1/(2 sqrt k)`` start is far off for real gradient magnitudes and adapts over ~1,000 steps) -- a
deliberate deviation, as in ``benchmarks.cluster``.

Summaries (``summarize``): per rank the median over timed steps (``local_qsr``: the mean per step of each
whole period, median over periods), then the mean over ranks; samples/s = world x batch / median step time.
``report`` merges the result files of one directory into ``table.md`` / ``results.json`` and runs the cost
model's check (``benchmarks.costmodel_fit.train_check``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from ds_ext.comm import barrier as world_barrier
from ds_ext.comm import world as comm_world
from benchmarks.results import merged, summarize_rank
from benchmarks.train_report import compare, report, table_markdown
from ds_ext.costmodel.presets import ALL_METHODS, DDP_METHODS, TRAIN_METHODS, MethodOptions, applicable, method_specs

#: ds_ext's methods (the presets and DeepSpeed's own reduction) and PyTorch DDP's hooks, from the one roster
DS_METHODS = tuple(m for m in TRAIN_METHODS if m not in DDP_METHODS)
METHODS = TRAIN_METHODS
LR = 0.008           # the QSR recipe's peak LR: H = max(4, floor((0.0175 / 0.008)^2)) = 4
MOMENTUM = 0.9
DDP_START_POWERSGD_ITER = 2  # PyTorch's minimum with error feedback / warm start (its first 2 steps: allreduce)
#: Why ``ddp_powersgd`` runs with one DDP bucket (``bucket_cap_mb`` above the gradient size): PyTorch's
#: ``powerSGD_hook`` launches each bucket's P and Q all_reduces from future callbacks (``.then``), which gloo runs
#: on its own threads, while the main thread's backward launches the next bucket's all_reduce; gloo tags
#: collectives in the order they are enqueued, so with more than one bucket the order can differ between ranks.
#: Measured with DDP's default buckets (2 ranks, ResNet-18): ``gloo::EnforceNotMet ... Received data size doesn't
#: match expected size`` at the first compressed step, and the process aborts. With one bucket the chain is the
#: only collective in flight (the main thread waits for it at the end of backward), so no overlap with backward.
DDP_POWERSGD_ONE_BUCKET = True


def ddp_hook(method: str, process_group=None, rank: int = 4):
    """(hook, state) handed to ``DistributedDataParallel.register_comm_hook`` for a DDP method: PyTorch's
    own hook functions, unmodified."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if method == "ddp_allreduce":
        return default_hooks.allreduce_hook, process_group
    if method == "ddp_powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=process_group, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=DDP_START_POWERSGD_ITER)
        return powerSGD_hook.powerSGD_hook, state
    raise ValueError(f"not a DDP method: {method!r} (known: {', '.join(DDP_METHODS)})")


def method_block(method: str, opts: MethodOptions) -> dict:
    """The ``ds_ext.attach`` method dict of a ds_ext method (``deepspeed``: DeepSpeed's own reduction)."""
    if method == "deepspeed":
        return {"reducer": {"name": "deepspeed"}, "sync": {"name": "none"}}
    rname, ropts, sname, sopts = method_specs(opts)[method]
    return {"reducer": {"name": rname, **ropts}, "sync": {"name": sname, **sopts}}


# ------------------------------------------------------------------------------------------ pinning
def pin_threads(core: int) -> None:
    """Every thread of this process (and the threads it starts later) on ``core``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that just ended
            pass


def thread_masks() -> List[List[int]]:
    """The distinct CPU masks of this process's threads."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            out.add(tuple(sorted(os.sched_getaffinity(int(tid)))))
        except OSError:
            pass
    return [list(m) for m in sorted(out)]


# ------------------------------------------------------------------------------------- collectives
class CollectiveRecorder:
    """Launch and completion times of every collective (module docstring): ds_ext's own through the communication
    layer's observer (``ds_ext.comm.observe``), and DDP's and DeepSpeed's own reductions, which do not pass a
    ``Communicator``, by wrapping ``torch.distributed.all_reduce`` (an all_reduce inside an observed call is not
    counted twice)."""

    def __init__(self):
        self.records: List[list] = []   # [op, payload bytes, launch, completion (None until done)]
        self.active = False
        self._local = threading.local()
        self._orig = {}
        self._remove = None

    def _note(self, op, nbytes, fn, args, kwargs, async_op):
        if not self.active or getattr(self._local, "inside", False):
            return fn(*args, **kwargs)
        rec = [op, int(nbytes), time.perf_counter(), None]
        self.records.append(rec)
        self._local.inside = True
        try:
            work = fn(*args, **kwargs)
        finally:
            self._local.inside = False
        if not async_op or work is None:
            rec[3] = time.perf_counter()
            return work
        try:
            fut = work.get_future()
        except Exception:  # a backend without futures: completion when waited for
            fut = None
        if fut is None:
            rec[3] = rec[2]
            return work

        def done(_f, rec=rec):
            rec[3] = time.perf_counter()

        fut.add_done_callback(done)
        return work

    def __call__(self, comm, op, kind, t, async_op, issue):
        """The ``Communicator`` observer: ds_ext's all_reduce and all_gather calls (broadcasts are not recorded)."""
        if op == "broadcast":
            return issue()
        return self._note(op, t.numel() * t.element_size(), issue, (), {}, async_op)

    def install(self) -> None:
        import torch.distributed as dist

        from ds_ext.comm import observe  # imports no DeepSpeed

        orig_ar = dist.all_reduce
        self._orig["all_reduce"] = orig_ar
        rec = self

        def all_reduce(tensor, *args, **kwargs):  # DDP's hooks and DeepSpeed's own reduction: not ours
            async_op = kwargs.get("async_op", args[2] if len(args) > 2 else False)
            return rec._note("all_reduce", tensor.numel() * tensor.element_size(), orig_ar, (tensor,) + args, kwargs,
                             async_op)

        dist.all_reduce = all_reduce
        self._remove = observe(self)

    def uninstall(self) -> None:
        import torch.distributed as dist

        if "all_reduce" in self._orig:
            dist.all_reduce = self._orig.pop("all_reduce")
        if self._remove is not None:
            self._remove()
            self._remove = None

    def take(self) -> List[list]:
        out, self.records = self.records, []
        return out


class ReadyClock:
    """``post_accumulate_grad`` hooks on every parameter: when each gradient was ready (and the main thread's CPU
    time at the last one)."""

    def __init__(self, params):
        self.params = list(params)
        self.times = [0.0] * len(self.params)
        self.last = 0.0
        self.last_cpu = 0.0
        self.last_proc = 0.0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i):
        def hook(_p):
            t = time.perf_counter()
            self.times[i] = t
            if t > self.last:
                self.last, self.last_cpu, self.last_proc = t, time.thread_time(), time.process_time()
        return hook

    def reset(self):
        self.times = [0.0] * len(self.params)
        self.last = 0.0

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _loop(step_parts, clock: ReadyClock, recorder: Optional[CollectiveRecorder], n: int) -> List[dict]:
    """``n`` steps of ``step_parts = (forward -> loss, backward(loss), step())``; one sample per step."""
    fwd, bwd, opt_step = step_parts
    samples = []
    for _ in range(n):
        clock.reset()
        if recorder is not None:
            recorder.take()
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        loss = fwd()
        t1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
        bwd(loss)
        t2, c2, p2 = time.perf_counter(), time.thread_time(), time.process_time()
        opt_step()
        t3, c3, p3 = time.perf_counter(), time.thread_time(), time.process_time()
        ready = clock.last if clock.last > 0 else t2
        ready_cpu = clock.last_cpu if clock.last > 0 else c2
        ready_proc = clock.last_proc if clock.last > 0 else p2
        colls = recorder.take() if recorder is not None else []
        ms = lambda t: 1e3 * (t - t0)  # noqa: E731
        samples.append({
            "t_fwd": ms(t1), "t_ready": ms(ready), "t_bwd": ms(t2), "t_end": ms(t3),
            "cpu_fwd": 1e3 * (c1 - c0), "cpu_bwd": 1e3 * (ready_cpu - c1), "cpu_tail": 1e3 * (c3 - ready_cpu),
            "cpu_process": 1e3 * (p3 - p0), "loss": float(loss.detach()),
            # CPU of the process's other threads (gloo's: sockets, reductions, future callbacks) in each phase
            "other_fwd": 1e3 * ((p1 - p0) - (c1 - c0)), "other_bwd": 1e3 * ((ready_proc - p1) - (ready_cpu - c1)),
            "other_tail": 1e3 * ((p3 - ready_proc) - (c3 - ready_cpu)),
            "ready_frac": ([(t - t1) / (ready - t1) if ready > t1 and t > 0 else 1.0 for t in clock.times]
                           if recorder is None else None),
            "colls": [[op, b, ms(a), ms(d if d is not None else t3)] for op, b, a, d in colls]})
    return samples


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


def compute_alone(cfg, x, y, warmup: Optional[int] = None, steps: Optional[int] = None, grad: bool = True):
    """Forward, backward and optimizer of the plain model on this core, no communication (``warmup`` + ``steps``
    steps; default the run's)."""
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
    del model, opt
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
    if method == "ddp_powersgd" and not cfg.get("ddp_default_buckets"):
        # one bucket: the only race-free layout of PyTorch's hook on gloo (DDP_POWERSGD_ONE_BUCKET)
        grad_mib = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        kw["bucket_cap_mb"] = int(grad_mib) + 1
    ddp = DistributedDataParallel(model, **kw)
    hook, state = ddp_hook(method, None, opts.rank)
    ddp.register_comm_hook(state, hook)
    registered = ddp._comm_hooks[-1][0]
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    ce = torch.nn.functional.cross_entropy

    def step():
        opt.step()
        opt.zero_grad()

    info = {"hook": f"{registered.__module__}.{registered.__qualname__}", "hook_is_torch_function": registered is hook,
            "state": type(state).__name__ if state is not None else None,
            "matrix_approximation_rank": getattr(state, "matrix_approximation_rank", None),
            "start_powerSGD_iter": getattr(state, "start_powerSGD_iter", None),
            "min_compression_rate": getattr(state, "min_compression_rate", None),
            "gradient_as_bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False)),
            "bucket_bytes_cap": int(getattr(ddp, "bucket_bytes_cap", 0)),
            "bucket_cap_mb_given": kw.get("bucket_cap_mb")}

    def stats():
        try:
            data = ddp._get_ddp_logging_data()
            return {"bucket_sizes": str(data.get("bucket_sizes", "")),
                    "iteration": float(getattr(state, "iter", 0) or 0)}
        except Exception:
            return {}

    def close():
        pass

    return ddp, (lambda: ce(ddp(x), y), lambda loss: loss.backward(), step), info, stats, close


def bench(cfg: dict) -> Optional[dict]:
    """Every method of ``cfg["methods"]`` on this rank (the process group is up); rank 0 returns the result
    (every rank's samples), the others None."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    core = cfg.get("core")
    torch.set_num_threads(1)
    opts = MethodOptions()
    x, y = make_batch(rank, cfg["batch"], cfg["image_size"], cfg["classes"] or 1000)
    alone, grad_abs = compute_alone(cfg, x, y)
    thr = None
    if any(m == "exdyna" for m in cfg["methods"]):
        t = torch.tensor([exdyna_threshold(grad_abs, opts.density)], dtype=torch.float64)
        thr = float(comm_world().all_reduce(t)) / world
    del grad_abs
    cfg = dict(cfg, exdyna_threshold=thr)
    # ds_ext's collectives (barriers, the result gather) go through ds_ext.comm, i.e. DeepSpeed's comm layer: a DDP
    # launch has none while it measures (DDP's own collectives keep its ranks in step) and imports DeepSpeed only
    # afterwards, to gather the results
    align = (lambda: None) if cfg["ddp"] else world_barrier
    rec = CollectiveRecorder()
    rec.install()
    per_method: Dict[str, dict] = {}
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"# bench-train: {world} ranks ({os.environ.get('LOCAL_SIZE', '?')} per host), link {cfg['bandwidth']}, "
        f"{cfg['model']} {cfg['image_size']}px batch {cfg['batch']}/rank, {cfg['warmup']} warm-up + {cfg['steps']} "
        f"timed steps, {'DDP (no DeepSpeed)' if cfg['ddp'] else 'DeepSpeed + ds_ext'}, torch {torch.__version__}; "
        f"compute alone: fwd {alone['fwd_ms']:.0f} bwd {alone['bwd_ms']:.0f} opt {alone['opt_ms']:.0f} ms")
    try:
        for m in cfg["methods"]:
            why = applicable(m, world, opts) if m in ALL_METHODS else None
            if why:
                say(f"  {m}: skipped ({why})")
                continue
            # compute alone again right before the method: the reference of its step, at the machine's load now
            m_alone, _ = compute_alone(cfg, x, y, 1, cfg.get("alone_steps", 3), grad=False)
            m_alone.pop("ready_frac")
            build = _ddp_method if m in DDP_METHODS else _ds_method
            module, parts, info, stats, close = build(m, cfg, opts, x, y, world)
            if core is not None:
                pin_threads(core)
            clock = ReadyClock([p for p in module.parameters() if p.requires_grad])
            period = opts.qsr_h if m == "local_qsr" else 1
            warm = max(cfg["warmup"], DDP_START_POWERSGD_ITER if m == "ddp_powersgd" else 0) * period
            rec.active = False
            _loop(parts, clock, None, warm)
            align()
            rec.active = True
            samples = _loop(parts, clock, rec, cfg["steps"] * period)
            rec.active = False
            clock.remove()
            info.update(stats())
            close()
            per_method[m] = {"samples": samples, "period": period, "info": info, "masks": thread_masks(),
                             "alone": m_alone}
            del module, parts, close, stats
            gc.collect()
            if rank == 0:
                s = summarize_rank(per_method[m])
                say(f"  {m:<13} rank 0: step {s['step_ms']:8.1f} ms  fwd {s['fwd_ms']:6.1f}  bwd {s['bwd_ms']:7.1f}  "
                    f"after bwd {s['tail_ms']:7.1f}  comm {s['comm_ms']:8.1f}  hidden {s['hidden_ms']:7.1f} ms")
            align()
    finally:
        rec.uninstall()
    deepspeed_imported = "deepspeed" in sys.modules  # while measuring
    mine = {"rank": rank, "core": core, "masks": thread_masks(), "alone": alone, "methods": per_method}
    if world > 1:
        import deepspeed.comm as dc

        if not dc.is_initialized():  # a DDP launch: DeepSpeed's comm layer over the existing process group
            from ds_ext.comm import init_distributed

            init_distributed(timeout_s=1800)
    gathered = comm_world().all_gather_object(mine)
    if rank != 0:
        return None
    return {"kind": "benchmarks.train", "world": world, "local_size": int(os.environ.get("LOCAL_SIZE", "1")),
            "bandwidth": cfg["bandwidth"], "model": cfg["model"], "image_size": cfg["image_size"],
            "batch": cfg["batch"], "classes": cfg["classes"] or 1000, "steps": cfg["steps"], "warmup": cfg["warmup"],
            "ddp": cfg["ddp"], "deepspeed_imported": deepspeed_imported, "pinned": core is not None,
            "options": opts.__dict__, "lr": LR, "momentum": MOMENTUM, "exdyna_threshold": thr,
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "shapes": [list(p.shape) for p in build_model(cfg["model"], cfg["classes"]).parameters()],
            "ranks": gathered}


# ------------------------------------------------------------------------------------------ entry points
def _cfg(args) -> dict:
    return {"methods": [m for m in args.methods.split(",") if m], "model": args.model, "image_size": args.image_size,
            "batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup,
            "bandwidth": args.bandwidth, "ddp": args.ddp, "ddp_default_buckets": args.ddp_default_buckets,
            "alone_steps": args.alone_steps}


def worker(rank: int, world: int, **cfg) -> Optional[dict]:
    """``tests/harness.run`` entry (the process group is up): ``bench`` with ``cfg`` (keys of ``_cfg``; the
    defaults of ``main``'s ``run``)."""
    base = {"model": "resnet18", "image_size": 32, "batch": 2, "classes": 10, "steps": 2, "warmup": 2,
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
    if args.ddp:  # PyTorch alone: no DeepSpeed in this process
        from datetime import timedelta

        dist.init_process_group("gloo", timeout=timedelta(seconds=1800))
    else:
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
    r.add_argument("--methods", default=None, help=f"comma list (default: {','.join(DS_METHODS)}; with --ddp: "
                                                   f"{','.join(DDP_METHODS)})")
    r.add_argument("--ddp", action="store_true", help="PyTorch DDP with its own hooks, no DeepSpeed")
    r.add_argument("--model", default="resnet50")
    r.add_argument("--image-size", type=int, default=128)
    r.add_argument("--batch", type=int, default=4, help="images per rank and step")
    r.add_argument("--classes", type=int, default=0, help="model classes (0: the model's default)")
    r.add_argument("--steps", type=int, default=8, help="timed steps per method (local_qsr: periods)")
    r.add_argument("--warmup", type=int, default=2, help="untimed steps first (local_qsr: periods)")
    r.add_argument("--bandwidth", default="unknown", help="link rate label of this run (tc syntax: 500mbit)")
    r.add_argument("--alone-steps", type=int, default=3, help="compute-alone steps right before each method")
    r.add_argument("--no-pin", action="store_true", help="do not pin each rank to a core")
    r.add_argument("--ddp-default-buckets", action="store_true",
                   help="ddp_powersgd with DDP's default buckets (races on gloo: see DDP_POWERSGD_ONE_BUCKET)")
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
            args.methods = ",".join(DDP_METHODS if args.ddp else DS_METHODS)
        ms = [m for m in args.methods.split(",") if m]
        bad = [m for m in ms if m not in METHODS]
        if bad:
            ap.error(f"--methods: unknown {', '.join(bad)}; known: {', '.join(METHODS)}")
        wrong = [m for m in ms if (m in DDP_METHODS) != args.ddp]
        if wrong:
            ap.error(f"--methods: {', '.join(wrong)} {'need' if not args.ddp else 'cannot run with'} --ddp "
                     f"(DDP runs in its own launch, without DeepSpeed)")
        return run(args)
    if args.cmd == "compare":
        return compare(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
