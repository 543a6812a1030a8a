"""Methods x seeds on real text for a fixed budget: final loss, paired statistics, bytes, step time, time-to-loss.

    python -m benchmarks.convergence [--recipe recipes/pytext-gpt.yaml] [--methods all | S-SGD,topk-0.01,...]
        [--seeds 0..2] [--world-size 2] [--epochs 10 --steps-per-epoch 40] --out DIR [--set k=v ...]
        [--bws 1,10,100] [--gpus 8,16,32,64] [--compute-ms MS] [--report-only] [--fresh] [--timeout S]

Each cell (method, seed) is one trainer run (``python -m ds_ext.train`` on ``--world-size`` local processes, launched
and read as ``benchmarks.orders`` does: ``launch_command``, ``execute``, ``read_summary``) with ``train.seed=<seed>``,
the method's ``--set`` overrides (``METHODS``), ``train.epochs`` x ``train.steps_per_epoch`` optimizer steps and a
validation after every epoch. Cells run one after the other; a cell whose ``summary.json`` exists is reused
(resumable; ``--fresh`` reruns it). A progress line per cell says which, how long, and the final loss.

Clipping under one meaning for every method: the recipe's threshold ``deepspeed.gradient_clipping`` with its
``method.clip`` (the pytext recipes: ``before``, each rank clips its own gradient before compression;
``ds_ext/deepspeed/clipping.py``); the parameter-averaging methods (Local SGD, DS-Sync), which refuse DeepSpeed's
clipping, get the same threshold as ``method.sync.clip_grad_norm`` (their local gradient: the ``before`` meaning);
CD-GraB, whose reducer exchanges each microbatch gradient during backward, clips ``after`` (``before`` is refused).

Whole epochs for the orders: D-GraB and CD-GraB reorder the same examples every epoch, so they and their baseline
D-RR train on ``data.max_train_windows`` = steps per epoch x global batch windows, one whole pass per epoch. (Under
``train.steps_per_epoch`` alone the balanced order revisits the same first units every epoch while random
reshuffling draws fresh windows: that measured data, not order.) The other methods see the whole training split.

Printed (and written to ``DIR/report.txt``; every number in ``DIR/results.json``): per method the final validation
loss in bits per byte (mean and sample sd over seeds), the paired comparison against the baseline by seed
(``S-SGD``; for the data orders ``D-RR``, allreduce with random reshuffling on the same whole-epoch data) computed with
``benchmarks.orders.compare`` (wins, mean ratio with its t-based 95 % interval, paired t and exact sign tests),
bytes sent per rank per step (the trainer's meter) and the median step time on this machine. Time-to-loss: every
method's step time modelled by the cost model (``ds_ext.costmodel.model.collectives`` and ``comm_seconds`` with the
default constants; compute ``--compute-ms``, default the measured S-SGD step; compression time not included;
overlap with backward as ``step_ms``; D-GraB's and CD-GraB's per-microbatch all_gather of the gradient added here,
the cost model has no preset for orders) at each link rate and GPU count, and the modelled time each method's mean
validation curve first reaches the baseline's final mean loss, and the baseline's mean loss at the first validation
at or after half the budget (a target the compressed methods can reach; "never" within the budget otherwise). One PNG
per command (``DIR/convergence.png``): loss against step, bytes sent per rank and modelled time (10 Gbit/s, the largest
``--gpus``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.orders import compare, execute, mean_sd, parse_seeds, read_summary

LN2 = math.log(2.0)
VAL_LINE = re.compile(r"\[ds_ext\] epoch (\d+)/(\d+) step (\d+): val acc ([-\d.eE+naif]+) loss ([-\d.eE+naif]+)")
PY_LINE = re.compile(r"pytext: Python (\S+),")
#: the trainer's line when an order leaves examples of its epoch unvisited or drops an odd last step
PARTIAL_EPOCH = re.compile(r"\b[1-9]\d* of the \d+ examples of each local shard are not used|the last step of every "
                           r"epoch is dropped")


@dataclass
class Method:
    label: str
    sets: Tuple[str, ...]       #: recipe overrides (``--set``)
    cost: Optional[str]         #: cost-model preset (``ds_ext.costmodel.presets.PRESETS``), None: S-SGD + order
    cost_opts: dict = field(default_factory=dict)   #: ``MethodOptions`` fields
    baseline: str = "S-SGD"
    sync: bool = False          #: a parameter-averaging method (clips through sync.clip_grad_norm)
    order_gather: int = 0       #: D-GraB / CD-GraB: all_gathers of the gradient per microbatch pair (cost model)
    full_epochs: bool = False   #: a data order and its D-RR baseline: every epoch one whole pass over the same data

    def sets_for(self, clip: float) -> List[str]:
        """The overrides of this cell (``benchmarks.orders.train_args`` calls ``order.sets()``)."""
        out = list(self.sets)
        if self.sync:
            out = [s.replace("}", f", clip_grad_norm: {clip}}}") if s.startswith("method.sync=") and clip > 0 else s
                   for s in out] + ["deepspeed.gradient_clipping=0.0"]
        return out


def _r(name, **kw):
    return "method.reducer={" + ", ".join([f"name: {name}"] + [f"{k}: {v}" for k, v in kw.items()]) + "}"


# The grid of issue 31. QSR: H = max(h_base, floor((alpha / lr)^2)); alpha = 2 x the pytext-gpt peak lr 2e-3, so H
# is h_base = 4 at the peak and grows as the cosine schedule decays (capped at the remaining steps).
METHODS: Dict[str, Method] = {m.label: m for m in [
    Method("S-SGD", (_r("allreduce"),), "allreduce"),
    Method("PowerSGD-r1", (_r("powersgd", rank=1, start_powerSGD_iter=0),), "powersgd", {"rank": 1}),
    Method("PowerSGD-r4", (_r("powersgd", rank=4, start_powerSGD_iter=0),), "powersgd", {"rank": 4}),
    Method("ACP-SGD-r1", (_r("acpsgd", rank=1),), "acpsgd", {"rank": 1}),
    Method("ACP-SGD-r4", (_r("acpsgd", rank=4),), "acpsgd", {"rank": 4}),
    Method("topk-0.01", (_r("topk", density=0.01),), "topk", {"density": 0.01}),
    Method("topk-0.001", (_r("topk", density=0.001),), "topk", {"density": 0.001}),
    Method("ExDyna-0.01", (_r("exdyna", density=0.01),), "exdyna", {"density": 0.01}),
    Method("ExDyna-0.001", (_r("exdyna", density=0.001),), "exdyna", {"density": 0.001}),
    Method("signSGD", (_r("signsgd"),), "signsgd"),
    Method("LocalSGD-H4", (_r("none"), "method.sync={name: local, period: constant, h: 4}"), "local_qsr",
           {"qsr_alpha": 0.0, "qsr_h_base": 4}, sync=True),
    Method("LocalSGD-QSR", (_r("none"), "method.sync={name: local, period: qsr, alpha: 0.004, h_base: 4}"),
           "local_qsr", {"qsr_alpha": 0.004, "qsr_h_base": 4, "qsr_lr": 1e-3}, sync=True),
    Method("DS-Sync", (_r("none"), "method.sync={name: dssync, groups: 2, grouping: patterns, h: 1}"), "dssync",
           {"dssync_groups": 2}, sync=True),
    # The orders reorder the SAME examples every epoch, so they and their baseline (D-RR: allreduce with random
    # reshuffling) train on data.max_train_windows = steps per epoch x global batch windows: each epoch is one whole
    # pass. Under a bare train.steps_per_epoch cap the order would revisit its first units every epoch (the rest of
    # its shard "not used") while rr draws fresh windows each epoch: not a comparison of orders.
    Method("D-RR", (_r("allreduce"), "method.order={name: rr}"), "allreduce", baseline="D-RR", full_epochs=True),
    Method("D-GraB", (_r("allreduce"), "method.order={name: dgrab}"), None, baseline="D-RR", order_gather=1,
           full_epochs=True),
    # CD-GraB exchanges every microbatch gradient during backward: it can only clip the mean it applies
    Method("CD-GraB", (_r("cdgrab"), "method.order={name: cdgrab}", "method.clip=after"), None, baseline="D-RR",
           order_gather=2, full_epochs=True),
]}


@dataclass
class Cell:
    """One (method, seed) run, shaped for ``benchmarks.orders.execute`` (``cell.order.sets()``)."""
    method: Method
    seed: int
    dir: Path
    clip: float = 0.0
    summary: Optional[dict] = None
    error: Optional[str] = None
    seconds: float = 0.0
    curve: List[Tuple[int, float]] = field(default_factory=list)    #: (step, val loss in bits per byte)
    bytes_at: List[Tuple[int, float]] = field(default_factory=list)  #: (step, bytes sent per rank so far)
    step_ms: float = float("nan")
    python: Optional[str] = None
    epoch_windows: Optional[int] = None  #: data.max_train_windows of a full-epochs method (``epoch_windows``)

    @property
    def order(self):
        return self

    def sets(self) -> List[str]:
        if not self.method.full_epochs:
            return self.method.sets_for(self.clip)
        if not self.epoch_windows:
            raise ValueError(f"{self.method.label} needs whole epochs: set train.steps_per_epoch (--steps-per-epoch)")
        return self.method.sets_for(self.clip) + [f"data.max_train_windows={self.epoch_windows}"]

    @property
    def log(self) -> Path:
        return self.dir / "train.log"


def read_cell(cell: Cell) -> None:
    """Its summary (``orders.read_summary``), validation curve (the trainer's per-epoch lines in train.log),
    bytes and step times (history.jsonl) and the Python version the data set reported."""
    read_summary(cell)
    if cell.summary is None:
        return
    text = cell.log.read_text(errors="replace") if cell.log.is_file() else ""
    cell.curve = [(int(m.group(3)), float(m.group(5)) / LN2) for m in VAL_LINE.finditer(text)]
    partial = PARTIAL_EPOCH.search(text) if cell.method.full_epochs else None
    if partial:  # the order trained on part of its epoch: not the whole-epoch comparison this row claims
        cell.error, cell.summary = f"not whole epochs: {partial.group(0)} (an even --steps-per-epoch fixes it)", None
        return
    py = PY_LINE.search(text)
    cell.python = py.group(1) if py else None
    hist = cell.dir / "history.jsonl"
    recs = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()] if hist.is_file() else []
    cell.bytes_at = [(int(r["step"]), float(r["comm/bytes_total"])) for r in recs if "comm/bytes_total" in r]
    times = [float(r["train/step_time_s"]) for r in recs if r.get("train/step_time_s")]
    cell.step_ms = 1e3 * statistics.median(times) if times else float("nan")
    if not cell.curve:
        cell.error = "no validation lines in train.log"


def bytes_at_step(cell: Cell, step: int) -> float:
    """Bytes sent per rank up to ``step`` (linear between logged steps; the summary's total at the end)."""
    pts = [(0, 0.0)] + cell.bytes_at + [(int(cell.summary["steps"]), float(cell.summary["comm_bytes_total"]))]
    pts = sorted(dict(pts).items())
    for (s0, b0), (s1, b1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return b0 + (b1 - b0) * (step - s0) / max(s1 - s0, 1)
    return pts[-1][1]


# ---- the cost model: step time on emulated links -------------------------------------------------------

def model_shapes_of(recipe: str, sets: Sequence[str]) -> List[Tuple[int, ...]]:
    """The trainable parameter shapes of the recipe's model (built on the meta device)."""
    import torch

    from ds_ext.registry import MODELS, load_builtin
    from ds_ext.trainer.recipe import load_recipe

    load_builtin()
    r = load_recipe(recipe, list(sets))
    with torch.device("meta"):
        model = MODELS.build(r.model.name, r.model.params)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def modelled_step_ms(method: Method, shapes, n: int, bw_gbit: float, compute_ms: float,
                     micro_per_step: int) -> Optional[float]:
    """The cost model's step time (ms) of ``method`` on ``n`` GPUs at ``bw_gbit``; None where it cannot run."""
    from ds_ext.comm import Collective
    from ds_ext.costmodel.model import DEFAULT_CONSTANTS, collectives, comm_seconds, step_ms
    from ds_ext.costmodel.presets import MethodOptions, applicable

    opts = MethodOptions(**method.cost_opts)
    key = method.cost or "allreduce"
    if applicable(key, n, opts):
        return None
    colls = [] if method.order_gather == 2 else list(collectives(key, shapes, n, opts))
    if method.order_gather:  # the order's all_gather of the flat fp32 gradient, once per microbatch pair (D-GraB)
        numel = sum(math.prod(s) for s in shapes)  # or of every microbatch's gradient (CD-GraB: also the mean)
        calls = micro_per_step / 2.0 if method.order_gather == 1 else float(micro_per_step)
        colls.append(Collective("all_gather", 4.0 * numel, n, calls))
    t = comm_seconds(colls, bw_gbit * 1e9, DEFAULT_CONSTANTS)
    return step_ms(key if method.order_gather != 2 else "cdgrab", t, compute_ms, 0.0, True)


# ---- the report ----------------------------------------------------------------------------------------

def _f(x: float, d: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def mean_curve(cells: List[Cell]) -> List[Tuple[int, float]]:
    """The mean validation curve over seeds, at the steps every seed evaluated."""
    steps = sorted(set.intersection(*(set(s for s, _ in c.curve) for c in cells))) if cells else []
    return [(s, sum(dict(c.curve)[s] for c in cells) / len(cells)) for s in steps]


def first_reach(curve: List[Tuple[int, float]], target: float) -> Optional[int]:
    return next((s for s, v in curve if v <= target), None)


def table(cells: List[Cell], methods: List[Method], seeds: List[int]) -> Tuple[List[str], dict]:
    """The per-method lines (final loss, paired comparison against its baseline, bytes, step time) and their
    numbers. Pure: the unit test calls it on hand-made cells."""
    by = {(c.method.label, c.seed): c for c in cells if c.summary is not None and c.curve}
    lines = [f"{'method':<14} {'n':>2} {'bpb mean':>9} {'sd':>7}  {'vs':<5} {'wins':>5} {'ratio [95% CI]':>26} "
             f"{'p(t)':>8} {'p(sign)':>8} {'bytes/rank/step':>16} {'step ms':>8}"]
    out = {}
    for m in methods:
        mine = [by[(m.label, s)].curve[-1][1] for s in seeds if (m.label, s) in by]
        if not mine:
            lines.append(f"{m.label:<14}  no finished cell")
            continue
        mu, sd = mean_sd(mine)
        pairs = [s for s in seeds if (m.label, s) in by and (m.baseline, s) in by]
        cmp = None
        if m.label != m.baseline and pairs:
            cmp = compare([by[(m.baseline, s)].curve[-1][1] for s in pairs], [by[(m.label, s)].curve[-1][1]
                                                                              for s in pairs], False)
        cs = [by[(m.label, s)] for s in seeds if (m.label, s) in by]
        bps = statistics.mean(float(c.summary["comm_bytes_per_step"]) for c in cs)
        ms = statistics.mean(c.step_ms for c in cs)
        rest = (f"{m.baseline:<5} {cmp['wins']:>2}/{cmp['n']:<2} {_f(cmp['ratio_mean'])} "
                f"[{_f(cmp['ratio_ci'][0])}, {_f(cmp['ratio_ci'][1])}]".ljust(40) + f" {_p(cmp['p_t']):>8} "
                f"{_p(cmp['p_sign']):>8}" if cmp else f"{'(baseline)':<40} {'':>8} {'':>8}")
        lines.append(f"{m.label:<14} {len(mine):>2} {mu:>9.4f} {_f(sd):>7}  {rest} {bps:>16,.0f} {ms:>8.1f}")
        out[m.label] = {"n": len(mine), "final_bpb": mine, "mean": mu, "sd": sd, "baseline": m.baseline,
                        "compare": cmp, "bytes_per_rank_step": bps, "step_ms": ms}
    return lines, out


def time_to_loss(cells, methods, seeds, shapes, bws, gpus, compute_ms, micro_per_step,
                 compute_source: str = "given", fraction: float = 1.0) -> Tuple[List[str], dict]:
    """Modelled seconds until each method's mean validation curve reaches its baseline's mean loss (S-SGD; D-RR for
    the orders) at ``fraction`` of the budget (1.0: the final loss; 0.5: the first validation at or after half the
    steps)."""
    curves = {m.label: mean_curve([c for c in cells if c.method.label == m.label and c.summary is not None
                                   and c.curve]) for m in methods}
    targets = {}
    for label in dict.fromkeys(m.baseline for m in methods):
        base = curves.get(label) or []
        if base:
            at, v = next((s, v) for s, v in base if s >= fraction * base[-1][0])
            targets[label] = (at, v, "final mean loss" if at == base[-1][0] else f"mean loss at step {at} of "
                                                                                  f"{base[-1][0]}")
    if "S-SGD" not in targets:
        return ["time-to-loss: no finished S-SGD cell, no target"], {}
    at, target, what = targets["S-SGD"]
    also = "".join(f"; for the orders {b}'s {w} {v:.4f}" for b, (_, v, w) in targets.items() if b != "S-SGD")
    lines = [f"time to reach S-SGD's {what} {target:.4f} bits/byte{also} (modelled seconds; compute "
             f"{compute_ms:.1f} ms/step ({compute_source}), cost-model default constants, compression time not "
             f"included)"]
    head = f"{'method':<14} " + " ".join(f"{f'{bw:g}G/{n}':>10}" for bw in bws for n in gpus)
    lines.append(head)
    out = {"target_bpb": target, "target_step": at, "compute_ms": compute_ms, "rows": {},
           "targets": {b: {"step": t[0], "bpb": t[1]} for b, t in targets.items()}}
    for m in methods:
        goal = targets.get(m.baseline)
        step = first_reach(curves.get(m.label) or [], goal[1]) if goal else None
        row, cols = {}, []
        for bw in bws:
            for n in gpus:
                ms = modelled_step_ms(m, shapes, n, bw, compute_ms, micro_per_step)
                sec = None if ms is None or step is None else step * ms / 1e3
                row[f"{bw:g}G/{n}"] = {"step_ms": ms, "seconds": sec}
                cols.append("n/a" if ms is None else "never" if step is None else f"{sec:.1f}")
        out["rows"][m.label] = {"step": step, "target": m.baseline, **row}
        lines.append(f"{m.label:<14} " + " ".join(f"{c:>10}" for c in cols))
    lines.append("never: the mean curve did not reach the target within the budget; n/a: the method cannot run "
                 "there (DS-Sync: 2 groups need >= 4 ranks)")
    return lines, out


def plot(cells, methods, shapes, path: Path, bw: float, n: int, compute_ms: float, micro_per_step: int):
    """Loss against step, bytes per rank and modelled time: one PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    colors = plt.get_cmap("tab20").colors  # 20 colours: the first 10 methods dark, the next 10 their light pairs
    for i, m in enumerate(methods):
        cs = [c for c in cells if c.method.label == m.label and c.summary is not None and c.curve]
        curve = mean_curve(cs)
        if not curve:
            continue
        steps, loss = [s for s, _ in curve], [v for _, v in curve]
        sent = [statistics.mean(bytes_at_step(c, s) for c in cs) / 2 ** 20 for s in steps]
        ms = modelled_step_ms(m, shapes, n, bw, compute_ms, micro_per_step)
        kw = {"linestyle": "--" if m.baseline == "D-RR" else "-", "color": colors[2 * (i % 10) + (i // 10) % 2],
              "label": m.label, "linewidth": 2.2 if m.label in ("S-SGD", "D-RR") else 1.3}
        axes[0].plot(steps, loss, **kw)
        axes[1].plot([max(b, 1e-3) for b in sent], loss, **kw)
        if ms is not None:
            axes[2].plot([s * ms / 1e3 for s in steps], loss, **kw)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("MiB sent per rank")
    axes[1].set_xscale("log")
    axes[2].set_xlabel(f"modelled seconds ({bw:g} Gbit/s, {n} GPUs)")
    for a in axes:
        a.set_ylabel("validation bits per byte")
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the command ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/pytext-gpt.yaml")
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0..2")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="validations (train.epochs; default: the recipe's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="optimizer steps between validations")
    p.add_argument("--set", action="append", default=[], dest="sets", help="recipe override for every cell")
    p.add_argument("--out", required=True)
    p.add_argument("--bws", default="1,10,100", help="link rates in Gbit/s for time-to-loss")
    p.add_argument("--gpus", default="8,16,32,64", help="GPU counts for time-to-loss")
    p.add_argument("--compute-ms", type=float, default=None, help="compute per step (default: measured S-SGD step)")
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    p.add_argument("--fresh", action="store_true", help="rerun cells whose summary.json exists")
    p.add_argument("--report-only", action="store_true", help="launch nothing, report what is there")
    return p


def _methods(text: str) -> List[Method]:
    names = list(METHODS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
    need = {METHODS[n].baseline for n in names} | {"S-SGD"}
    return [METHODS[n] for n in names] + [METHODS[b] for b in sorted(need - set(names))]  # baselines always run


def _recipe_numbers(recipe: str, sets: Sequence[str], world: int) -> Tuple[float, int, str, Optional[int]]:
    """The clipping threshold, microbatches per step per rank, the clipping meaning of the recipe and the training
    windows of one epoch, steps per epoch x global batch (None without ``train.steps_per_epoch``)."""
    from ds_ext.trainer.recipe import load_recipe

    r = load_recipe(recipe, list(sets))
    _, gas = r.batch_plan(world)  # a batch the world size cannot split: refused here, before any cell is launched
    windows = r.train.steps_per_epoch * r.train.global_batch_size if r.train.steps_per_epoch else None
    return float(r.deepspeed.get("gradient_clipping", 0) or 0), gas, r.method.clip, windows


def run_cells(cells: List[Cell], args, budget: List[str]) -> None:
    """Train (or reuse) every cell in turn, one progress line before and after each. Each cell's ``settings.json``
    keeps what it was launched with (recipe, overrides, world size); a reused cell launched otherwise is an error
    (``--fresh`` reruns it, or use another ``--out``), so one report never mixes budgets."""
    total = len(cells)
    for i, c in enumerate(cells, 1):
        done = (c.dir / "summary.json").is_file() and not args.fresh
        settings = {"recipe": args.recipe, "sets": c.sets() + budget + args.sets, "world": args.world_size}
        if not done and not args.report_only:
            print(f"[{i}/{total}] {c.method.label} seed {c.seed}: training ({c.dir})", flush=True)
            c.dir.mkdir(parents=True, exist_ok=True)
            for stale in ("history.jsonl", "summary.json"):  # a failed or --fresh cell's records: this run's own
                (c.dir / stale).unlink(missing_ok=True)
            (c.dir / "settings.json").write_text(json.dumps(settings))
            execute(c, args.recipe, budget + args.sets, args.world_size, args.launcher, args.timeout)
        read_cell(c)
        kept = c.dir / "settings.json"
        if done and c.summary is not None and kept.is_file() and json.loads(kept.read_text()) != settings:
            c.error = f"stale cell: launched with other settings ({kept}); --fresh reruns it, or use another --out"
            c.summary = None
        state = ("reused" if done else "missing" if args.report_only else f"{c.seconds:.0f} s")
        what = (f"error: {c.error} (log {c.log})" if c.error else
                f"final {c.curve[-1][1]:.4f} bits/byte, {c.summary['comm_bytes_per_step']:,.0f} B/rank/step, "
                f"step {c.step_ms:.0f} ms")
        print(f"[{i}/{total}] {c.method.label} seed {c.seed} ({state}): {what}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods, seeds = _methods(args.methods), parse_seeds(args.seeds)
        bws = [float(x) for x in args.bws.split(",")]
        gpus = [int(x) for x in args.gpus.split(",")]
        budget = ([f"train.epochs={args.epochs}"] if args.epochs else []) + \
                 ([f"train.steps_per_epoch={args.steps_per_epoch}"] if args.steps_per_epoch else [])
        budget += ["log.every_steps=" + str(min(10, args.steps_per_epoch or 10))]
        clip, gas, meaning, epoch_windows = _recipe_numbers(args.recipe, budget + args.sets, args.world_size)
        shapes = model_shapes_of(args.recipe, budget + args.sets)
    except (ValueError, FileNotFoundError) as e:
        print(f"benchmarks.convergence: {e}", file=sys.stderr)
        return 2
    if args.world_size < 4 and any(m.label == "DS-Sync" for m in methods):  # 2 groups of one rank: no exchange
        print(f"DS-Sync left out: its 2 groups need >= 4 ranks (--world-size {args.world_size})", flush=True)
        methods = [m for m in methods if m.label != "DS-Sync"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_EXT_CURVES", "0")  # the trainer's per-run curves.png: this command draws its own
    # seed-major: an interrupted run holds whole seeds of every method, not every seed of the first methods
    cells = [Cell(m, s, out / m.label / f"seed{s}", clip, epoch_windows=epoch_windows) for s in seeds for m in methods]
    t0 = time.perf_counter()
    run_cells(cells, args, budget)
    base = [c.step_ms for c in cells if c.method.label == "S-SGD" and c.summary is not None]
    compute_ms = args.compute_ms if args.compute_ms is not None else (statistics.median(base) if base else 100.0)
    pythons = sorted({c.python for c in cells if c.python})
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    header = [f"benchmarks.convergence: {args.recipe} {' '.join(budget + args.sets)}; world {args.world_size}; "
              f"seeds {','.join(map(str, seeds))}; clipping at {clip:g} ({meaning}: "
              f"{'each rank its own gradient' if meaning == 'before' else 'the reduced gradient'}; Local SGD / "
              f"DS-Sync: sync.clip_grad_norm; CD-GraB: after); data Python {', '.join(pythons) or 'unknown'}; "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the report; "
              f"{time.perf_counter() - t0:.0f} s"
              + (f"; D-RR / D-GraB / CD-GraB on data.max_train_windows={epoch_windows} (whole epochs)"
                 if any(m.full_epochs for m in methods) else ""),
              "final validation loss in bits per byte (lower is better); ratio = method / baseline per seed"]
    t_lines, t_out = table(cells, methods, seeds)
    source = ("--compute-ms" if args.compute_ms is not None else
              "the median S-SGD step measured here" if base else "no S-SGD step measured: a placeholder")
    l_lines, l_out = time_to_loss(cells, methods, seeds, shapes, bws, gpus, compute_ms, gas, source)
    h_lines, h_out = time_to_loss(cells, methods, seeds, shapes, bws, gpus, compute_ms, gas, source, fraction=0.5)
    l_lines += [""] + h_lines
    failed = [c for c in cells if c.error]
    text = "\n".join(header + [""] + t_lines + [""] + l_lines
                     + [f"failed: {c.method.label} seed {c.seed}: {c.error} ({c.log})" for c in failed])
    print(text)
    (out / "report.txt").write_text(text + "\n")
    png = plot(cells, methods, shapes, out / "convergence.png", 10.0 if 10.0 in bws else bws[0], max(gpus),
               compute_ms, gas)
    results = {"header": header, "methods": t_out, "time_to_loss": l_out, "time_to_loss_half": h_out, "python": pythons,
               "cells": [{"method": c.method.label, "seed": c.seed, "curve": c.curve, "error": c.error,
                          "step_ms": c.step_ms, "bytes_total": (c.summary or {}).get("comm_bytes_total")}
                         for c in cells]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'report.txt'}, {out / 'results.json'}" + (f", {png}" if png else " (no matplotlib: no plot)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
