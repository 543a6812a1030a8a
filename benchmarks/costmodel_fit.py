"""The cost model (``ds_ext.costmodel``) against measurements: fitting alpha and eta (and compression times)
on bench-cluster results, the model check per method (``check_rows``), and the launch-overlap term against
bench-train steps (``train_check``)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ds_ext.comm import Collective
from ds_ext.costmodel.model import EMULATION_FIT_ALPHA_SOURCE, EMULATION_FIT_CONSTANTS, Constants, collectives, comm_seconds, fmt_bw, step_ms
from ds_ext.costmodel.overlap import Launch, backward_schedule, launch_ready, overlap_step
from benchmarks.results import has_results, load_dir, load_results, merged, parse_rate, read_compress_file
from ds_ext.costmodel.project import DEFAULT_COMPUTE_MS, write_constants, write_readiness
from ds_ext.costmodel.project import main as project_main
from ds_ext.costmodel.presets import (CALLBACK_COMPRESSION, COMPRESS_SCALING, SERIAL_TRAIN_METHODS, TRAIN_METHODS,
                                      Compression, MethodOptions)


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


def train_inputs(method: str, row: dict) -> Tuple[float, float, float]:
    """(work added to forward, to backward, and after backward) of one bench-train row, ms, from CPU time beyond
    the compute alone's (the rounds' compute-alone entries, pooled): in forward, the main thread's (the engine's
    or DDP's wrappers); in backward, the main thread's (compression or bucket copies in the gradient hooks) plus
    the other threads' (gloo's socket and reduction work for collectives launched during backward takes the same
    pinned core from autograd); after backward, the main thread's beyond the optimizer's, plus, for
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


def train_schedule(method: str, shapes, n: int, opts: MethodOptions):
    """``overlap.backward_schedule`` for a bench-train row: DDP's PowerSGD hook with DDP's buckets
    (``ddp_powersgd``) or one bucket (``ddp_powersgd_1b``), DDP's fp16 hook as ``ddp_allreduce`` at 2 bytes a
    value; every other method as ``backward_schedule`` prices it."""
    if method in ("ddp_powersgd", "ddp_powersgd_1b"):
        return backward_schedule("ddp_powersgd", shapes, n, opts, ddp_one_bucket=method == "ddp_powersgd_1b")
    if method == "ddp_fp16":
        return [(w, [Launch(la.members, [replace(c, nbytes=c.nbytes // 2) for c in la.colls]) for la in launches],
                 [replace(c, nbytes=c.nbytes // 2) for c in after])
                for w, launches, after in backward_schedule("ddp_allreduce", shapes, n, opts)]
    return backward_schedule(method, shapes, n, opts)


def train_check(mg: dict, consts: Optional[Constants] = None, ready: Optional[Sequence[float]] = None) -> dict:
    """The overlap model against a merged bench-train result (``benchmarks.train.merged``): per method the
    modelled step (compute alone + compression + communication, the launch term for collectives launched during
    backward) and its error, the window term's (``step_ms``, 2/3 of compute) for comparison, and the modelled
    communication inside backward (overlap). ``consts`` None: alpha and eta fitted on the measured communication of the methods that
    communicate after backward (``SERIAL_TRAIN_METHODS``); ``ready`` None: the measured readiness profile."""
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
            colls = [c for _, la, after in train_schedule(m, shapes, n, opts) for c in after]
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
        sched = train_schedule(m, shapes, n, opts)
        mod = overlap_step(al["fwd_ms"] + c_fwd, al["bwd_ms"], al["opt_ms"], prof, sched, comm_ms_of, c_bwd, c_post)
        # the window term (before issue 19): compute + compression + comm beyond 2/3 of compute for allreduce/acpsgd
        comm_all = sum(w * comm_ms_of([c for la in launches for c in la.colls] + after) for w, launches, after in sched)
        compute = al["fwd_ms"] + al["bwd_ms"] + al["opt_ms"]
        win = step_ms("allreduce" if m in ("allreduce", "acpsgd", "ddp_allreduce", "half", "ddp_fp16") else "powersgd", comm_all / 1e3,
                      compute, c_fwd + c_bwd + c_post, True, 2.0 / 3.0)
        out[m] = {"meas_step_ms": r["step_ms"], "model_step_ms": mod["step_ms"],
                  "err": (mod["step_ms"] - r["step_ms"]) / r["step_ms"], "window_step_ms": win,
                  "window_err": (win - r["step_ms"]) / r["step_ms"], "meas_comm_ms": r["comm_ms"],
                  "model_comm_ms": mod["comm_ms"], "meas_overlap_ms": r["overlap_ms"],
                  "model_overlap_ms": mod["hidden_ms"],
                  "extra_fwd_ms": c_fwd, "compress_bwd_ms": c_bwd, "compress_post_ms": c_post,
                  "serial_fit": m in SERIAL_TRAIN_METHODS, "alone_step_ms": al.get("step_ms", 0.0),
                  "launch_ready": launch_ready(sched, prof) if sched[0][1] else [],
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
    print("# model step = compute alone (fwd + bwd + opt; the rounds' compute-alone entries, pooled) + CPU beyond it "
          "(train_inputs: +fwd, +bwd, +post) + communication not overlapped (queue of launches against backward); "
          "window = the earlier term (comm beyond 2/3 of compute overlapped for allreduce/acpsgd/ddp_allreduce)")
    print(f"{'method':<14} {'step meas':>9} {'model':>8} {'err':>7} {'window':>8} {'err':>7} {'comm meas':>9} "
          f"{'model':>8} {'overlap meas':>12} {'model':>8} {'alone':>6} {'+fwd':>5} {'+bwd':>5} {'+post':>6}")
    for m in TRAIN_METHODS:
        x = rows.get(m)
        if x is None:
            continue
        print(f"{m:<14} {x['meas_step_ms']:9.0f} {x['model_step_ms']:8.0f} {100 * x['err']:+6.1f}% "
              f"{x['window_step_ms']:8.0f} {100 * x['window_err']:+6.1f}% {x['meas_comm_ms']:9.0f} "
              f"{x['model_comm_ms']:8.0f} {x['meas_overlap_ms']:12.0f} {x['model_overlap_ms']:8.0f} "
              f"{x['alone_step_ms']:6.0f} {x['extra_fwd_ms']:5.0f} {x['compress_bwd_ms']:5.0f} "
              f"{x['compress_post_ms']:6.0f}" + ("  (constants fitted on it)" if x["serial_fit"] else ""))
    errs = [abs(x["err"]) for x in rows.values()]
    print(f"# largest |error| {100 * max(errs):.1f}%; within 15%: {sum(e <= 0.15 for e in errs)}/{len(errs)} methods")
    for m in TRAIN_METHODS:
        x = rows.get(m)
        if x and x["launch_ready"]:
            print(f"# {m}: launches ready at " + ", ".join(f"{v:.2f}" for v in x["launch_ready"])
                  + " of backward (readiness profile); measured launch times: "
                  + (", ".join(f"{v:.2f}" for v in x["meas_launch_frac"]) or "-"))


# ------------------------------------------------------------------------------------------------ CLI
def _fit_constants_file(fit_paths: List[str], compute_ms: float, out: str) -> str:
    """Fit (or, with no results given and none in runs/bench-cluster, the fit recorded in the README), print the
    model check, and write the constants file ``python -m ds_ext.costmodel --constants`` reads."""
    if not fit_paths and not has_results("runs/bench-cluster"):
        print("# --fit: no bench-cluster results in runs/bench-cluster: the CPU emulation's fit recorded in the "
              "README (run: sudo bash run/bench-cluster.sh to fit your own)")
        return write_constants(out, replace(EMULATION_FIT_CONSTANTS))
    results = load_results(fit_paths or ["runs/bench-cluster"])
    consts, compression = fit_from_results(results)
    opts = options_of(next((r for r in results if r["world"] == 4), results[0]))
    bw = fit_bandwidth(results, 4)
    comp_src = "fitted on " + ", ".join(sorted({Path(r["_file"]).name for r in results if r["bw_bits"] == bw}))
    print_check(results, consts, compute_ms)
    return write_constants(out, consts, compression, comp_src, opts)


def _readiness_file(bench_train_dir: str, model: str, out: str) -> Optional[str]:
    """Print the launch-term check against bench-train results; their readiness profile as a file when they
    trained ``model``."""
    mg = merged(load_dir(bench_train_dir))
    print_train_check(train_check(mg))
    print()
    if mg["model"] != model:
        return None
    ready = list(next(iter(mg["rows"].values()))["alone"]["ready_frac"])
    src = f"measured in {bench_train_dir} ({mg['model']} {mg['image_size']}px, compute alone on this CPU)"
    return write_readiness(out, ready, src, model)


def main(argv=None) -> int:
    """``python -m benchmarks.costmodel_fit [--fit [RESULTS ...]] [--overlap-from DIR] [--compress-file F]
    [projection options]``: the benchmark side of the cost model, then the projection
    (``python -m ds_ext.costmodel``, every other option passed on) with what it produced."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.costmodel_fit",
                                 description="Fit the cost model's constants on bench-cluster results and check it "
                                             "against them (--fit), check its launch term against bench-train "
                                             "results (--overlap-from), then project with them; other options "
                                             "go to python -m ds_ext.costmodel")
    ap.add_argument("--fit", nargs="*", default=None, metavar="RESULTS",
                    help="fit alpha and eta on bench-cluster result files/directories (default runs/bench-cluster; "
                         "without results there, the fit recorded in the README), compression on every N, and print "
                         "the model's error at every N")
    ap.add_argument("--overlap-from", default=None, metavar="BENCH_TRAIN_DIR",
                    help="run/bench-train.sh results: check the launch term against them (per method) and project "
                         "with it, using their measured readiness profile when they trained --model")
    ap.add_argument("--compress-file", default=None,
                    help="run/bench-compress.sh output from a GPU machine: its CUDA times replace allreduce/"
                         "powersgd/acpsgd compression")
    ap.add_argument("--write-constants", default=None, metavar="FILE",
                    help="keep the constants file (--fit) here (default: a temporary file)")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--compute-ms", type=float, default=DEFAULT_COMPUTE_MS)
    args, rest = ap.parse_known_args(argv)
    rest = rest + ["--model", args.model, "--compute-ms", repr(args.compute_ms)]
    with tempfile.TemporaryDirectory(prefix="costmodel_fit_") as tmp:
        if args.fit is not None:
            out = args.write_constants or str(Path(tmp) / "constants.json")
            rest += ["--constants", _fit_constants_file(args.fit, args.compute_ms, out)]
        if args.compress_file:
            given = read_compress_file(args.compress_file)
            rest = ["--compress-ms", ",".join(f"{k}={v!r}" for k, v in given.items())] + rest
        if args.overlap_from is not None:
            ready = _readiness_file(args.overlap_from, args.model, str(Path(tmp) / "readiness.json"))
            rest += ["--overlap", "launch"] + (["--readiness", ready] if ready else [])
        return project_main(rest)


if __name__ == "__main__":
    sys.exit(main())
