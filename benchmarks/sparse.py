"""Sparse selection benchmark (not a test): ``bash run/bench-sparse.sh`` or ``python -m benchmarks.sparse``.

1. Selection time for one gradient of ``--numel`` (25.6M) fp32 elements at ``--density`` (0.001), each
   row's median over ``--reps`` runs and its ratio to a plain copy of the same gradient measured in
   the same run, on the CPU and, when available, on CUDA:

   * ``copy``                    ``out.copy_(g)``: the floor any selection pays (one read, one write)
   * ``torch.topk``              ``torch.topk(|g|, k, sorted=False)``
   * ``topk reducer selection``  ``ops.topk_select(g, k)``: the call the ``topk`` reducer makes
   * ``exdyna selection``        ``ops.threshold_select`` over the whole vector (one rank, n = 1)
   * ``exdyna selection n=8``    the same over one rank's partition when 8 ranks share the vector
   * ``exdyna count``            ``ops.threshold_count``: the count the reducer computes first (on the device)
   * ``exdyna select, count given``  ``ops.threshold_select(..., count=)``: the selection sized by that count
     (learned from the step's control exchange), with no host synchronisation
   * ``<reducer> finish()``      the whole step of each reducer on one rank (flatten + error
     feedback + select + write back; no collectives with one rank), measured with the gradient and
     the residual refilled before every call, minus the time of that refill measured alone

   The exdyna threshold is the |g| quantile that selects k elements of this gradient (its settled
   value), so the mask and the ``nonzero`` see a realistic number of hits.

2. Achieved density vs iteration of ``exdyna`` for both threshold rules on a stationary synthetic
   gradient stream (``--trace-steps`` iterations, one rank, error feedback on), written as CSV and,
   when matplotlib is importable, as a PNG.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from ds_ext import ops
from ds_ext.registry import REDUCERS, load_builtin


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _reducer(name: str, numel: int, density: float, device: torch.device, threshold: float):
    load_builtin()
    p = torch.nn.Parameter(torch.zeros(numel, device=device))
    opts = {"density": density}
    if name == "exdyna":
        opts["initial_threshold"] = threshold
        opts["threshold_rule"] = "hold"
    return p, REDUCERS.build(name, opts, [("g", p)])


def selection_table(numel: int, density: float, device: torch.device, reps: int) -> List[Dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(numel, generator=gen, device=device)
    out = torch.empty_like(g)
    k = max(1, int(density * numel))
    # the threshold that selects about k elements of this gradient (kthvalue on a sample of 1M)
    sample = g[torch.randint(0, numel, (min(numel, 1 << 20),), generator=gen, device=device)].abs()
    threshold = sample.kthvalue(max(1, int(sample.numel() * (1 - density)))).values.item()
    part = numel // 8
    hits = int(ops.threshold_count(g, threshold, 0, numel))  # what the reducer learns from its control exchange
    rows = [
        ("copy", lambda: out.copy_(g)),
        ("torch.topk", lambda: torch.topk(g.abs(), k, sorted=False)),
        ("topk reducer selection", lambda: ops.topk_select(g, k)),
        ("exdyna selection", lambda: ops.threshold_select(g, threshold, 0, numel)),
        ("exdyna selection n=8", lambda: ops.threshold_select(g, threshold, 3 * part, 4 * part)),
        ("exdyna count", lambda: ops.threshold_count(g, threshold, 0, numel)),
        ("exdyna select, count given", lambda: ops.threshold_select(g, threshold, 0, numel, count=hits)),
    ]
    res = []
    for name, fn in rows:
        res.append({"op": name, "ms": timeit(fn, device, reps)})
    for name in ("topk", "exdyna"):
        p, red = _reducer(name, numel, density, device, threshold)
        p.grad = g.clone()

        def refill():  # the same gradient and an empty residual before every step
            p.grad.copy_(g)
            red.error.zero_()

        def step():
            refill()
            red.finish()

        ms = timeit(step, device, reps) - timeit(refill, device, reps)
        res.append({"op": f"{name} finish() (1 rank)", "ms": ms})
    hits = ops.threshold_select(g, threshold)[2]
    base = res[0]["ms"]
    for r in res:
        r["ratio"] = r["ms"] / base
    note = f"(threshold {threshold:.4g} selects {hits} of k = {k})"
    res.append({"op": note, "ms": float("nan"), "ratio": float("nan")})
    return res


def print_table(rows: List[Dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'operation':<32} {'median ms':>10} {'x copy':>8}")
    print("-" * 52)
    for r in rows:
        if r["ms"] != r["ms"]:  # nan: a note line
            print(r["op"])
        else:
            print(f"{r['op']:<32} {r['ms']:>10.2f} {r['ratio']:>8.2f}")


def density_trace(rule: str, numel: int, density: float, steps: int, scale: float, seed: int = 0) -> Dict[str, list]:
    """Achieved / target density and the threshold per iteration; one rank, stationary Gaussian
    gradients of std ``scale``, error feedback on."""
    load_builtin()
    p = torch.nn.Parameter(torch.zeros(numel))
    red = REDUCERS.build("exdyna", {"density": density, "threshold_rule": rule}, [("g", p)])
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, list] = {"ratio": [], "threshold": []}
    for _ in range(steps):
        p.grad = torch.randn(numel, generator=gen) * scale
        red.finish()
        out["ratio"].append(red.stats()["density"] / density)
        out["threshold"].append(red.stats()["threshold"])
    return out


def _moving_mean(xs: List[float], w: int = 20) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def write_trace(traces: Dict[str, Dict[str, list]], outdir: Path, density: float) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    csv_path = outdir / "exdyna_density.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration"] + [f"{r}_{c}" for r in traces for c in ("achieved_over_target", "threshold")])
        steps = len(next(iter(traces.values()))["ratio"])
        for i in range(steps):
            w.writerow([i] + [f"{tr[c][i]:.6g}" for tr in traces.values() for c in ("ratio", "threshold")])
    print(f"\nwrote {csv_path}")
    for rule, tr in traces.items():
        last = tr["ratio"][-100:]
        print(f"  {rule:<9} last {len(last)} iterations: achieved/target mean {statistics.mean(last):.3f}, "
              f"min {min(last):.3f}, max {max(last):.3f}; final threshold {tr['threshold'][-1]:.4g}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no PNG written (the CSV above holds the same series)")
        return
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax.axhspan(0.909, 1.1, color="0.88", label="(0.909, 1.1]: on target")
    for (rule, tr), color in zip(traces.items(), ("tab:blue", "tab:orange")):
        ax.plot(tr["ratio"], color=color, lw=0.6, alpha=0.45)
        ax.plot(_moving_mean(tr["ratio"]), color=color, lw=1.8, label=f"{rule} (20-iteration mean)")
        ax2.plot(tr["threshold"], color=color, lw=1.2, label=rule)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0, 2)
    ax.set_ylabel("achieved density / target")
    ax.set_title(f"exdyna threshold rules, target density {density}, stationary synthetic gradients")
    ax.legend(loc="lower right")
    ax2.set_ylabel("threshold")
    ax2.set_xlabel("iteration")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    png = outdir / "exdyna_density.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=25_600_000)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--devices", default="auto", help="comma list (cpu,cuda) or auto")
    ap.add_argument("--trace-steps", type=int, default=300)
    ap.add_argument("--trace-numel", type=int, default=1_000_000)
    ap.add_argument("--trace-density", type=float, default=0.001)
    ap.add_argument("--trace-scale", type=float, default=0.0008,
                    help="std of the synthetic gradients (sets how far the settled threshold is from 1/(2 sqrt k))")
    ap.add_argument("--out", default="runs/bench-sparse")
    args = ap.parse_args(argv)
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), cuda available: {torch.cuda.is_available()}")
    print(f"gradient: {args.numel:,} fp32 elements, density {args.density} (k = {int(args.numel * args.density):,})")
    for d in devices:
        dev = torch.device(d)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
        print_table(selection_table(args.numel, args.density, dev, args.reps), f"[{d}: {name}]")
    traces = {rule: density_trace(rule, args.trace_numel, args.trace_density, args.trace_steps, args.trace_scale)
              for rule in ("faithful", "hold")}
    write_trace(traces, Path(args.out), args.trace_density)


if __name__ == "__main__":
    main()
