"""Every method side by side on an emulated multi-host cluster (the body of ``run/bench-cluster.sh``).

    deepspeed --hostfile run/cluster.hostfile --module benchmarks.cluster run --out DIR/N4-1gbit.json \
        --bandwidth 1gbit [--model resnet50] [--methods ...] [--steps 8] [--warmup 1]
    python -m benchmarks.cluster report DIR [--compute-ms 30.5] [--compress-file GPU_OUTPUT]

``run`` (one process per emulated host, started by the DeepSpeed launcher through pdsh/ssh): every
rank holds the gradient shapes of ``--model`` (ResNet-50: 25,557,032 fp32 values) filled with fixed
random values (seeded by rank), builds each method's real reducer and synchronizer from the
registries exactly as ``ds_ext.deepspeed.attach.attach`` does (``ds_ext.costmodel.presets.method_specs``: allreduce,
powersgd rank 4, acpsgd rank 4, topk and exdyna at density 0.001, signsgd, local + QSR, dssync with
2 groups) and drives them as the engine does at an accumulation boundary (``grad_ready`` for every
parameter in reverse order, ``finish``, the synchronizer's ``before_step`` / ``after_step``, the
meter's ``end_step``) for ``--warmup`` + ``--steps`` steps (QSR: whole periods of H steps). No model
compute runs. The gradients are the same every step, so two deliberate deviations keep the input
stationary: the error-feedback residual of ``topk`` / ``exdyna`` / ``signsgd`` is zeroed before each
step (untimed; the reducer still adds it), and ``exdyna`` starts at the threshold that selects its
target density of N(0, 1) values (``initial_threshold``; the seed's ``1/(2 sqrt k)`` start, meant for
real gradient magnitudes, would select almost everything and needs ~1,400 steps to adapt).
Measured per step and rank:

* communication time: wall time inside ``torch.distributed.all_reduce`` / ``all_gather`` (the real
  gloo collectives over the shaped links). Deliberate deviations: the benchmark makes every
  collective synchronous (an ``async_op=True`` call is waited for at once) so that the time inside
  collectives is separable -- there is no backward pass to overlap with here anyway -- and puts an
  untimed ``barrier`` before each collective, so that a rank that finished its compression early
  does not count the wait for a slower one as communication (on these 2 shared cores 4 ranks
  compress at very different speeds; on a real cluster every rank has its own GPU). ``--no-align``
  drops the barrier (the wait then shows up as communication);
* compression time: the main thread's CPU time (``time.thread_time``) during the step outside the
  collectives -- the reducer's own work on one CPU thread (OMP_NUM_THREADS=1), which does not grow
  when the 2 shared cores are oversubscribed as wall time does (wall time is reported too);
* bytes: the communication meter's count per step, the payload of every collective call (checked
  to be equal), and the bytes the host's interface sent / received during the timed steps
  (``/proc/net/dev`` inside the host's network namespace; ``GLOO_SOCKET_IFNAME`` names it), compared
  with the ring-algorithm expectation from the meter: all_reduce 2(g-1)/g x payload, all_gather
  (g-1) x payload (``ds_ext.costmodel.model.wire_factor``).

Each rank's samples are gathered to rank 0, which writes one JSON file (``--out``) and prints the
table. A barrier (not timed) precedes each step. ``report`` prints the tables of one or more such
files as ratios to ``allreduce`` measured in the same run: communication, bytes, and the step time
``compute (input) + compression + communication`` (serial: no overlap assumed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from statistics import NormalDist
import time
from pathlib import Path
from typing import Dict, List, Optional

from ds_ext.comm import barrier as world_barrier
from ds_ext.comm import world as comm_world
from benchmarks.results import parse_rate, read_compress_file
from ds_ext.costmodel.model import wire_factor
from ds_ext.meter import kind_of
from ds_ext.costmodel.presets import ALL_METHODS, MethodOptions, applicable, method_specs


# ------------------------------------------------------------------------------ collective timer
class CollectiveTimer:
    """Observes the communication layer's data collectives (``ds_ext.comm.observe``: every all_reduce and
    all_gather of every method passes a ``Communicator``): each call runs synchronously and is timed; records
    (op, payload bytes, group size, seconds)."""

    OPS = ("all_reduce", "all_gather")

    def __init__(self):
        self.active = False
        self.align = True
        self._remove = None
        self.reset()

    def reset(self):
        self.records: List[tuple] = []
        self.wall = 0.0
        self.cpu = 0.0

    def __call__(self, comm, op, kind, t, async_op, issue):
        if not self.active or op not in self.OPS:
            return issue()
        nbytes = t.numel() * t.element_size()
        if self.align:  # untimed: every rank enters the collective together (see the docstring)
            world_barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        work = issue()
        if work is not None:
            work.wait()
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        self.wall += dt
        self.cpu += dc
        self.records.append((op, nbytes, comm.world_size, dt))
        return work

    def install(self):
        from ds_ext.comm import observe

        self._remove = observe(self)

    def uninstall(self):
        if self._remove is not None:
            self._remove()
            self._remove = None


# ------------------------------------------------------------------------------ interface counters
def iface_counters(name: Optional[str]) -> Optional[tuple]:
    """(tx_bytes, rx_bytes) of interface ``name`` in this process's network namespace."""
    if not name:
        return None
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                dev, _, rest = line.partition(":")
                if dev.strip() == name:
                    v = rest.split()
                    return int(v[8]), int(v[0])
    except OSError:
        pass
    return None


# -------------------------------------------------------------------------------------------- run
def build_method(method: str, named, opts: MethodOptions, meter):
    """(reducer, synchronizer) of ``method`` from the registries, as ``ds_ext.deepspeed.attach.attach`` builds
    them (no engine: the QSR period reads a constant learning rate ``opts.qsr_lr``)."""
    from ds_ext.registry import REDUCERS, SYNCS, load_builtin

    load_builtin()
    rname, ropts, sname, sopts = method_specs(opts)[method]
    if method == "exdyna":  # start at the threshold of the target density on N(0, 1) gradients
        ropts = dict(ropts, initial_threshold=NormalDist().inv_cdf(1 - opts.density / 2))
    kw = dict(group=None, meter=meter)
    reducer = REDUCERS.build(rname, ropts, named, **kw)
    skw = dict(kw, total_steps=None)
    if sname != "none":
        skw["lr_at"] = lambda step: opts.qsr_lr
    return reducer, SYNCS.build(sname, sopts, named, **skw)


def drive_step(reducer, sync, params, meter) -> int:
    """One optimizer step at an accumulation boundary as the engine drives the methods (without the
    optimizer): gradients ready in reverse order, ``finish``, the synchronizer; returns the meter's
    bytes of the step."""
    if sync.reduce_gradients_now():
        for p in reversed(params):
            reducer.grad_ready(p)
        reducer.finish()
    sync.before_step()
    sync.after_step()
    return meter.end_step()


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from ds_ext.comm import init_distributed
    from ds_ext.meter import CommMeter
    from ds_ext.registry import MODELS, load_builtin

    init_distributed(timeout_s=1800)
    rank, world = dist.get_rank(), dist.get_world_size()
    load_builtin()
    torch.manual_seed(0)
    model = MODELS.build(args.model, {})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    shapes = [list(p.shape) for p in params]
    numel = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1000 + rank)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opts = MethodOptions(rank=args.rank, density=args.density, qsr_alpha=args.qsr_alpha, qsr_lr=args.qsr_lr,
                         qsr_h_base=args.qsr_h_base, dssync_groups=args.dssync_groups)
    methods = [m for m in args.methods.split(",") if m]
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    local_size = int(os.environ.get("LOCAL_SIZE", "1"))
    timer = CollectiveTimer()
    timer.align = not args.no_align
    timer.install()
    if rank == 0:
        print(f"# bench-cluster: {world} ranks ({local_size} per host), link {args.bandwidth}, {args.model} "
              f"{numel:,} fp32 values, {args.warmup} warm-up + {args.steps} timed steps, interface "
              f"{ifname or 'unknown'}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)/rank", flush=True)

    per_method: Dict[str, dict] = {}
    for m in methods:
        why = applicable(m, world, opts)
        if why:
            if rank == 0:
                print(f"  {m}: skipped ({why})", flush=True)
            continue
        meter = CommMeter()
        reducer, sync = build_method(m, named, opts, meter)
        period = opts.qsr_h if m == "local_qsr" else 1
        warm, steps = args.warmup * period, args.steps * period
        if m == "dssync":  # both grouping patterns once before timing (process groups are created lazily)
            warm = max(warm, 2)
        samples = []
        c0 = None
        for i in range(warm + steps):
            for p, g in zip(params, grads):
                p.grad.copy_(g)
            if getattr(reducer, "error", None) is not None:
                reducer.error.zero_()  # stationary input: the residual would make g grow step after step
            timer.active = False
            world_barrier()
            if i == warm:
                meter_before = meter.total_bytes
                kinds_before = dict(meter.by_kind)
                c0 = iface_counters(ifname)
            timer.active = True
            timer.reset()
            t0, cpu0 = time.perf_counter(), time.thread_time()
            sent = drive_step(reducer, sync, params, meter)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
            timer.active = False
            if i >= warm:
                samples.append({"wall_ms": 1e3 * wall, "comm_ms": 1e3 * timer.wall,
                                "compress_ms": 1e3 * (cpu - timer.cpu), "meter_bytes": sent,
                                "coll_bytes": sum(r[1] for r in timer.records),
                                "colls": [list(r) for r in timer.records]})
        c1 = iface_counters(ifname)
        timer.active = False
        world_barrier()
        per_method[m] = {"samples": samples, "period": period,
                         "meter_bytes_total": meter.total_bytes - meter_before,
                         "by_kind": {k: v - kinds_before.get(k, 0) for k, v in meter.by_kind.items()},
                         "ops": dict(meter.ops),
                         "iface": None if c0 is None or c1 is None else [c1[0] - c0[0], c1[1] - c0[1]],
                         "stats": {k: float(v) for k, v in reducer.stats().items()
                                   if isinstance(v, (int, float))}}
        del reducer, sync
        if rank == 0:
            s = summarize_method(m, [per_method[m]], world)
            print(f"  {m:<10} rank 0: comm {s['comm_ms']:9.1f} ms  compression {s['compress_ms']:7.1f} ms  wall "
                  f"{s['wall_ms']:9.1f} ms  meter {s['meter_bytes']:14,.0f} B/step", flush=True)

    timer.uninstall()
    gathered = comm_world().all_gather_object(per_method)
    if rank == 0:
        result = {"kind": "benchmarks.cluster", "world": world, "local_size": local_size,
                  "bandwidth": args.bandwidth, "bw_bits": parse_rate(args.bandwidth), "model": args.model,
                  "numel": numel, "shapes": shapes, "steps": args.steps, "warmup": args.warmup,
                  "interface": ifname, "aligned": not args.no_align, "options": opts.__dict__, "torch": torch.__version__,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "methods": {m: summarize_method(m, [g[m] for g in gathered], world)
                              for m in per_method}}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
            print(f"# results: {args.out}", flush=True)
        print_table(result, args.compute_ms, {})
    world_barrier()
    dist.destroy_process_group()
    return 0


def summarize_method(method: str, ranks: List[dict], world: int) -> dict:
    """Median over timed steps (of the mean over ranks; the wall time: of the slowest rank); a period
    (QSR) is averaged per step. Interface bytes: mean over ranks, per step."""
    period = ranks[0]["period"]
    n = len(ranks[0]["samples"])
    def per_step(key, agg):
        vals = [agg([r["samples"][i][key] for r in ranks]) for i in range(n)]
        # whole periods: mean per step of each period, median over periods
        chunks = [sum(vals[j:j + period]) / period for j in range(0, n, period)]
        return statistics.median(chunks)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {"comm_ms": per_step("comm_ms", mean), "compress_ms": per_step("compress_ms", mean),
           "wall_ms": per_step("wall_ms", max), "comm_ms_max": per_step("comm_ms", max),
           "meter_bytes": mean([r["meter_bytes_total"] for r in ranks]) / n,
           "coll_bytes": mean([sum(s["coll_bytes"] for s in r["samples"]) for r in ranks]) / n,
           "steps": n, "period": period,
           "comm_ms_samples": [mean([r["samples"][i]["comm_ms"] for r in ranks]) for i in range(n)]}
    # expected wire bytes from the meter: each kind's bytes x the ring factor of its collective
    g = world
    colls = [c for r in ranks for s in r["samples"] for c in s["colls"]]
    if colls:
        g = max(c[2] for c in colls)  # dssync: its group size
    exp = 0.0
    for r in ranks:  # the meter's bytes of the timed steps, by kind
        for kind, b in r["by_kind"].items():
            exp += b * wire_factor(r.get("ops", {}).get(kind) or kind_of(kind).op or "all_reduce", g)
    out["expected_wire_bytes"] = exp / len(ranks) / n
    out["records_wire_bytes"] = mean([sum(wire_factor(op, gs) * b for s in r["samples"] for op, b, gs, *_ in s["colls"])
                                      for r in ranks]) / n
    if all(r["iface"] is not None for r in ranks):
        out["iface_tx_bytes"] = mean([r["iface"][0] for r in ranks]) / n
        out["iface_rx_bytes"] = mean([r["iface"][1] for r in ranks]) / n
    # rank 0's collectives: (op, payload bytes, group size, calls per step, median ms of one call)
    by: Dict[tuple, List[float]] = {}
    for smp in ranks[0]["samples"]:
        for op, b, gs, *dt in smp["colls"]:
            by.setdefault((op, b, gs), []).append(1e3 * dt[0] if dt else float("nan"))
    out["collectives"] = [[op, b, gs, len(v) / n, statistics.median(v)] for (op, b, gs), v in by.items()]
    out["stats"] = ranks[0]["stats"]
    return out


# ----------------------------------------------------------------------------------------- report
def print_table(result: dict, compute_ms: float, gpu_compress: Dict[str, float]) -> None:
    ms = result["methods"]
    if "allreduce" not in ms:
        print("(no allreduce row: ratios need the S-SGD baseline)")
        return
    def step(m):
        return compute_ms + gpu_compress.get(m, ms[m]["compress_ms"]) + ms[m]["comm_ms"]
    base = ms["allreduce"]
    bstep = step("allreduce")
    print(f"\n## N={result['world']} hosts, links {result['bandwidth']} ({result['model']}, {result['numel']:,} values; "
          f"{result['steps']} timed steps, medians)")
    print(f"# measured: comm (time in collectives), compression (CPU thread time"
          f"{'; GPU file for ' + ', '.join(gpu_compress) if gpu_compress else ''}), wire bytes (interface "
          f"counters), meter bytes; input: compute {compute_ms:g} ms/step; step = compute + compression + comm")
    print(f"{'method':<10} {'comm ms':>9} {'x S-SGD':>8} {'compr ms':>9} {'step ms':>9} {'speedup':>8} "
          f"{'wall ms':>9} {'wire MB/step':>12} {'x S-SGD':>8} {'meter B/step':>13} {'wire/exp':>8}")
    for m in ALL_METHODS:
        if m not in ms:
            continue
        r = ms[m]
        wire = r.get("iface_tx_bytes")
        bw = base.get("iface_tx_bytes")
        ratio = (f"{wire / r['expected_wire_bytes']:8.3f}" if wire is not None and r["expected_wire_bytes"] > 0
                 else f"{'-':>8}")
        cm = gpu_compress.get(m, r["compress_ms"])
        print(f"{m:<10} {r['comm_ms']:9.1f} {r['comm_ms'] / base['comm_ms']:8.3f} {cm:9.1f} {step(m):9.1f} "
              f"{bstep / step(m):7.2f}x {r['wall_ms']:9.1f} "
              f"{'-' if wire is None else f'{wire / 1e6:.2f}':>12} "
              f"{'-' if wire is None or not bw else f'{wire / bw:.4f}':>8} {r['meter_bytes']:13,.0f} {ratio}")
    if "allreduce" in ms and ms["allreduce"].get("iface_tx_bytes"):
        a = ms["allreduce"]
        gbit = 8 * a["iface_tx_bytes"] / (a["comm_ms"] / 1e3) / 1e9
        print(f"# allreduce: {gbit:.3f} Gbit/s sent per host while in collectives (link: {result['bandwidth']})")


def report(args) -> int:
    from benchmarks.results import load_results

    results = load_results(args.results)
    gpu = read_compress_file(args.compress_file) if args.compress_file else {}
    for r in sorted(results, key=lambda x: (x["bw_bits"], -x["world"])):
        print_table(r, args.compute_ms, gpu)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one measurement (every rank; under the deepspeed launcher)")
    r.add_argument("--methods", default=",".join(ALL_METHODS))
    r.add_argument("--model", default="resnet50")
    r.add_argument("--steps", type=int, default=8, help="timed steps per method (QSR: timed periods)")
    r.add_argument("--warmup", type=int, default=1, help="untimed steps first (QSR: periods)")
    r.add_argument("--rank", type=int, default=4)
    r.add_argument("--density", type=float, default=0.001)
    r.add_argument("--qsr-alpha", type=float, default=0.0175)
    r.add_argument("--qsr-lr", type=float, default=0.008)
    r.add_argument("--qsr-h-base", type=int, default=4)
    r.add_argument("--dssync-groups", type=int, default=2)
    r.add_argument("--no-align", action="store_true", help="no untimed barrier before each collective")
    r.add_argument("--bandwidth", default="unknown", help="link rate label of this run (tc syntax: 1gbit)")
    r.add_argument("--compute-ms", type=float, default=30.5)
    r.add_argument("--out", default=None, help="JSON result file (written by rank 0)")
    r.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("report", help="print the tables of result files")
    p.add_argument("results", nargs="+", help="result JSON files or directories")
    p.add_argument("--compute-ms", type=float, default=30.5,
                   help="per-step compute time, an input (default: ResNet-50 bf16 batch 64 on an H100)")
    p.add_argument("--compress-file", default=None,
                   help="run/bench-compress.sh output from a GPU machine: its CUDA compression times replace "
                        "the CPU ones for allreduce/powersgd/acpsgd")
    args, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if not x.startswith("--local_rank") and not x.startswith("--local-rank")]
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "run":
        bad = [m for m in args.methods.split(",") if m and m not in ALL_METHODS]
        if bad:
            ap.error(f"--methods: unknown {', '.join(bad)}; known: {', '.join(ALL_METHODS)}")
        return run(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
