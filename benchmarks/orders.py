"""Data orders x seeds on a recipe: train every pair, then the paired comparison against a baseline order.

    python -m benchmarks.orders --recipe R --orders rr,dgrab --seeds 0..9 [--set k=v ...] [--world-size 4]
        --out DIR [--order 'LABEL={name: dgrab, remainder: visit}'] [--baseline rr] [--reuse | --report-only]

For every order and seed it launches the trainer (``python -m ds_ext.train``) on ``--world-size`` local
processes through the ``deepspeed`` launcher (as ``run/quickstart.sh``; ``--launcher torchrun`` for
``torch.distributed.run``), one run after the other, with ``train.seed=<seed>``, ``method.order=<order>``
(plus ``method.reducer={name: cdgrab}`` for ``cdgrab``), ``log.dir=DIR/<order>/seed<seed>`` (its log:
``train.log`` there), wandb disabled, no progress bar and no checkpoints; ``--set`` overrides come last and
win. It then reads every run's ``summary.json`` and prints, for each order against the baseline (the first
order unless ``--baseline``), paired by seed, per metric:

* ``final train loss``: the last epoch's training loss averaged over ALL ranks (``epoch_losses[-1]``, logged
  as ``train/epoch_loss_all_ranks``; rank 0's ``train/loss`` is a one-rank sample, biased for orders);
* ``val accuracy`` and ``val loss`` at the end of training;

wins (lower loss, higher accuracy; ties are not wins), the mean of the per-seed ratios order / baseline with
a t-based 95% confidence interval over seeds, the mean difference with its interval, the two-sided paired
t-test p-value and the exact two-sided sign-test p-value (ties left out). Everything is computed here with
``math`` (no scipy). It writes ``DIR/report.txt`` (what it printed), ``DIR/comparison.json`` (every number)
and ``DIR/loss_per_epoch.png``: the mean all-rank training loss per epoch of every order (band: min to max
over seeds) and the per-epoch ratio to the baseline (mean over seeds, 95% interval).

A run that fails (non-zero exit, past ``--timeout``, no ``summary.json`` or no ``epoch_losses``) is one line
naming its log; it leaves its seed out of that order's pairs, and the command exits 1. ``--reuse`` keeps the
runs whose ``summary.json`` exists (a stale one is the user's call); ``--report-only`` launches nothing. A
summary.json from an earlier launch of the same run is deleted before the run starts, so a failed run is never
read as a finished one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

METRICS = (  # (key in the report, label, higher is better)
    ("final_train_loss", "final train loss (all ranks)", False),
    ("val_acc", "val accuracy", True),
    ("val_loss", "val loss", False),
)


# ---- statistics (math only) -----------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: float, level: float = 0.95) -> float:
    """The two-sided critical value: P(|T| >= c) = 1 - level (bisection on ``t_two_sided_p``)."""
    alpha = 1.0 - level
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def mean_ci(xs: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): the t-based ``level`` confidence interval of the mean (nan bounds for n < 2)."""
    m, sd = mean_sd(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = t_critical(len(xs) - 1, level) * sd / math.sqrt(len(xs))
    return m, m - half, m + half


def paired_t(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Paired t-test of b against a (differences b - a): (t, two-sided p). All differences equal: t = +-inf
    and p = 0 when they are not zero, t = 0 and p = 1 when they are; n < 2: nan."""
    d = [y - x for x, y in zip(a, b)]
    if len(d) < 2:
        return float("nan"), float("nan")
    m, sd = mean_sd(d)
    if sd == 0.0:
        return (0.0, 1.0) if m == 0.0 else (math.copysign(math.inf, m), 0.0)
    t = m / (sd / math.sqrt(len(d)))
    return t, t_two_sided_p(t, len(d) - 1)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test (binomial, p = 1/2) of ``wins`` against ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


# ---- runs -------------------------------------------------------------------------------------------

@dataclass
class OrderSpec:
    label: str
    spec: str  # YAML of method.order
    name: str  # the registered order

    def sets(self) -> List[str]:
        out = [f"method.order={self.spec}"]
        if self.name == "cdgrab":  # cdgrab is both the order and the reducer
            out.append("method.reducer={name: cdgrab}")
        return out


@dataclass
class Run:
    order: OrderSpec
    seed: int
    dir: Path
    summary: Optional[dict] = None
    error: Optional[str] = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.dir / "train.log"


def parse_seeds(text: str) -> List[int]:
    """``0..9`` (inclusive), ``0,3,5`` or a mix (``0..2,7``)."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            a, b = part.split("..", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"seed range {part!r} is empty")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--seeds {text!r}: give distinct seeds, e.g. 0..9 or 0,1,2")
    return out


def parse_orders(names: Optional[str], custom: Sequence[str]) -> List[OrderSpec]:
    import yaml

    out: List[OrderSpec] = []
    for n in (names or "").split(","):
        n = n.strip()
        if n:
            out.append(OrderSpec(n, f"{{name: {n}}}", n))
    for c in custom:
        if "=" not in c:
            raise ValueError(f"--order {c!r}: expected LABEL=YAML, e.g. 'dgrab-visit={{name: dgrab, remainder: visit}}'")
        label, spec = c.split("=", 1)
        val = yaml.safe_load(spec)
        if not isinstance(val, dict) or "name" not in val:
            raise ValueError(f"--order {c!r}: the YAML must be a mapping with a name")
        out.append(OrderSpec(label.strip(), spec.strip(), str(val["name"])))
    labels = [o.label for o in out]
    if len(out) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"give at least two orders with distinct labels (got {labels})")
    bad = [lab for lab in labels if not lab or "/" in lab or lab.startswith(".")]
    if bad:
        raise ValueError(f"order labels name directories: {bad} cannot")
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, world: int, train_args: List[str]) -> List[str]:
    port = str(_free_port())
    if launcher == "deepspeed":
        exe = Path(sys.executable).parent / "deepspeed"
        ds = str(exe) if exe.is_file() else shutil.which("deepspeed")
        if ds is None:
            raise FileNotFoundError("no deepspeed launcher next to this Python nor on PATH (use --launcher torchrun)")
        return [ds, "--num_gpus", str(world), "--master_port", port, "--module", "ds_ext.train", *train_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", port,
            "-m", "ds_ext.train", *train_args]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    if not env.get("DS_ACCELERATOR"):  # run/env.sh: DeepSpeed's CPU accelerator (gloo) without a GPU
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        if not gpu:
            env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_args(recipe: str, run: Run, sets: Sequence[str]) -> List[str]:
    # log.overwrite: a launched run replaces its own directory's earlier records on purpose (execute() deletes the
    # stale summary.json first); without it the trainer refuses a fresh run over another run's history.jsonl
    base = [f"train.seed={run.seed}", *run.order.sets(), f"log.dir={run.dir}", "log.overwrite=true",
            "log.wandb.mode=disabled", "log.progress=false", "checkpoint.every_epochs=0", "checkpoint.every_steps=0",
            "checkpoint.resume=false"]
    return ["--recipe", recipe] + [x for s in [*base, *sets] for x in ("--set", s)]


def execute(run: Run, recipe: str, sets: Sequence[str], world: int, launcher: str, timeout: float) -> None:
    """Launch one run (its output to ``run.log``); sets ``run.error`` when it fails."""
    run.dir.mkdir(parents=True, exist_ok=True)
    stale = run.dir / "summary.json"
    if stale.exists():
        stale.unlink()
    cmd = launch_command(launcher, world, train_args(recipe, run, sets))
    t0 = time.perf_counter()
    with open(run.log, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: this run's own session
            proc.wait()
            rc = None
    run.seconds = time.perf_counter() - t0
    if rc is None:
        run.error = f"killed after {timeout:.0f} s (--timeout)"
    elif rc != 0:
        run.error = f"exit {rc}"


def read_summary(run: Run) -> None:
    """``run.summary`` from its summary.json, or ``run.error``."""
    if run.error:
        return
    p = run.dir / "summary.json"
    try:
        s = json.loads(p.read_text())
    except FileNotFoundError:
        run.error = "no summary.json"
        return
    except (OSError, ValueError) as e:
        run.error = f"unreadable summary.json ({e})"
        return
    losses = s.get("epoch_losses")
    if not losses:
        run.error = "summary.json has no epoch_losses (a trainer without the all-rank epoch loss?)"
        return
    run.summary = s


def value(run: Run, key: str) -> float:
    if key == "final_train_loss":
        return float(run.summary["epoch_losses"][-1])
    return float(run.summary[key])


# ---- the comparison --------------------------------------------------------------------------------

def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _p(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def compare(base: List[float], other: List[float], higher_better: bool) -> dict:
    """The paired comparison of ``other`` against ``base`` (same seeds, same positions)."""
    n = len(base)
    wins = sum(1 for a, b in zip(base, other) if (b > a if higher_better else b < a))
    ties = sum(1 for a, b in zip(base, other) if a == b)
    ratios = [b / a for a, b in zip(base, other) if a != 0]
    r_mean, r_lo, r_hi = mean_ci(ratios) if ratios else (float("nan"),) * 3
    d_mean, d_lo, d_hi = mean_ci([b - a for a, b in zip(base, other)]) if n else (float("nan"),) * 3
    t, p = paired_t(base, other)
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "base_mean": sum(base) / n if n else float("nan"), "mean": sum(other) / n if n else float("nan"),
            "ratio_mean": r_mean, "ratio_ci": [r_lo, r_hi], "diff_mean": d_mean, "diff_ci": [d_lo, d_hi],
            "t": t, "p_t": p, "p_sign": sign_test_p(wins, n - wins - ties)}


def report(runs: List[Run], orders: List[OrderSpec], seeds: List[int], baseline: str, header: str) -> Tuple[str, dict]:
    """The printed report and the JSON of every number."""
    by = {(r.order.label, r.seed): r for r in runs}
    ok = {k: r for k, r in by.items() if r.summary is not None}
    lines = [header]
    out: dict = {"baseline": baseline, "seeds": seeds, "orders": [o.label for o in orders], "runs": [],
                 "comparisons": {}}
    for r in runs:
        out["runs"].append({"order": r.order.label, "spec": r.order.spec, "seed": r.seed, "dir": str(r.dir),
                            "ok": r.summary is not None, "error": r.error, "seconds": r.seconds,
                            **({"epoch_losses": r.summary["epoch_losses"], "val_acc": r.summary.get("val_acc"),
                                "val_loss": r.summary.get("val_loss")} if r.summary is not None else {})})
    lines.append("")
    lines.append("per run: final all-rank training loss (last epoch) / val accuracy")
    lines.append("| order | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    lines.append("|---|" + "---:|" * (len(seeds) + 1))
    for o in orders:
        cells, fl, va = [], [], []
        for s in seeds:
            r = ok.get((o.label, s))
            if r is None:
                cells.append("failed")
                continue
            fl.append(value(r, "final_train_loss"))
            va.append(value(r, "val_acc"))
            cells.append(f"{fl[-1]:.4f} / {va[-1]:.4f}")
        mean = f"{sum(fl) / len(fl):.4f} / {sum(va) / len(va):.4f}" if fl else "n/a"
        lines.append(f"| {o.label} | " + " | ".join(cells) + f" | {mean} |")
    lines.append("")
    lines.append(f"paired against {baseline} by seed (a win: lower loss, higher accuracy; ratio = order / {baseline}, "
                 f"mean over seeds with its t-based 95% CI; p: two-sided paired t-test, exact sign test)")
    lines.append(f"| order | metric | n | {baseline} mean | order mean | wins | ratio [95% CI] | "
                 f"difference [95% CI] | p (t) | p (sign) |")
    lines.append("|---|---|---:|---:|---:|---:|---|---|---:|---:|")
    for o in orders:
        if o.label == baseline:
            continue
        pairs = [s for s in seeds if (o.label, s) in ok and (baseline, s) in ok]
        out["comparisons"][o.label] = {"seeds": pairs}
        for key, label, higher in METRICS:
            if not pairs:
                lines.append(f"| {o.label} | {label} | 0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
                continue
            try:
                base = [value(ok[(baseline, s)], key) for s in pairs]
                other = [value(ok[(o.label, s)], key) for s in pairs]
            except (KeyError, TypeError, ValueError):
                lines.append(f"| {o.label} | {label} | {len(pairs)} | (not in summary.json) | | | | | | |")
                continue
            c = compare(base, other, higher)
            out["comparisons"][o.label][key] = c
            tie = f" ({c['ties']} tied)" if c["ties"] else ""
            lines.append(
                f"| {o.label} | {label} | {c['n']} | {_fmt(c['base_mean'])} | {_fmt(c['mean'])} | {c['wins']}/{c['n']}{tie} | "
                f"{_fmt(c['ratio_mean'], 3)} [{_fmt(c['ratio_ci'][0], 3)}, {_fmt(c['ratio_ci'][1], 3)}] | "
                f"{_fmt(c['diff_mean'])} [{_fmt(c['diff_ci'][0])}, {_fmt(c['diff_ci'][1])}] | {_p(c['p_t'])} | "
                f"{_p(c['p_sign'])} |")
    n_pairs = min((len(v["seeds"]) for v in out["comparisons"].values()), default=0)
    if n_pairs < 10:
        lines.append(f"({n_pairs} paired seeds: a small sample; the intervals are wide and a p-value above 0.05 is no "
                     f"evidence of no difference)")
    return "\n".join(lines), out


def plot(runs: List[Run], orders: List[OrderSpec], baseline: str, path: Path) -> Optional[Path]:
    """Mean all-rank training loss per epoch per order (band: min..max over seeds) and the per-epoch ratio to
    the baseline (mean over paired seeds, 95% CI band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {o.label: {r.seed: r.summary["epoch_losses"] for r in runs
                        if r.order.label == o.label and r.summary is not None} for o in orders}
    if not any(curves.values()):
        return None
    from matplotlib.ticker import MaxNLocator

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a_ in (ax, bx):
        a_.xaxis.set_major_locator(MaxNLocator(integer=True))
    for o in orders:
        c = curves[o.label]
        if not c:
            continue
        E = min(len(v) for v in c.values())
        xs = list(range(1, E + 1))
        cols = [[v[e] for v in c.values()] for e in range(E)]
        line, = ax.plot(xs, [sum(col) / len(col) for col in cols], marker="o", ms=3,
                        label=f"{o.label} ({len(c)} seeds)")
        ax.fill_between(xs, [min(col) for col in cols], [max(col) for col in cols], alpha=0.15,
                        color=line.get_color())
        if o.label == baseline:
            continue
        base = curves.get(baseline, {})
        seeds = [s for s in c if s in base]
        if not seeds:
            continue
        E2 = min(E, min(len(base[s]) for s in seeds))
        stats = [mean_ci([c[s][e] / base[s][e] for s in seeds if base[s][e] != 0]) for e in range(E2)]
        xs2 = list(range(1, E2 + 1))
        bx.plot(xs2, [m for m, _, _ in stats], marker="o", ms=3, color=line.get_color(), label=o.label)
        if len(seeds) > 1:
            bx.fill_between(xs2, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], alpha=0.15,
                            color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss, mean over all ranks")
    ax.set_title("mean over seeds (band: min..max)")
    ax.legend()
    bx.axhline(1.0, color="gray", lw=0.8)
    bx.set_xlabel("epoch")
    bx.set_ylabel(f"loss ratio to {baseline}")
    bx.set_title("paired by seed: mean ratio, 95% CI")
    if bx.lines[1:]:
        bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.orders", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--orders", default=None, help="comma-separated order names, e.g. rr,dgrab")
    ap.add_argument("--order", dest="custom", action="append", default=[], metavar="LABEL=YAML",
                    help="an order with options, e.g. 'dgrab-visit={name: dgrab, remainder: visit}' (repeatable)")
    ap.add_argument("--baseline", default=None, help="the order every other one is paired against (default: the first)")
    ap.add_argument("--seeds", default="0..2", help="0..9, 0,1,2 or a mix (default 0..2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every run (repeatable; after the command's own)")
    ap.add_argument("--world-size", type=int, default=2, help="local processes per run (default 2)")
    ap.add_argument("--out", required=True, help="directory: one run directory per order and seed, report, plot")
    ap.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--reuse", action="store_true", help="keep runs whose summary.json exists; launch the others")
    g.add_argument("--report-only", action="store_true", help="launch nothing: report on the summary.json files in --out")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        seeds = parse_seeds(a.seeds)
        orders = parse_orders(a.orders, a.custom)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = [o.label for o in orders]
    baseline = a.baseline or labels[0]
    if baseline not in labels:
        print(f"error: --baseline {baseline!r} is not one of the orders {labels}", file=sys.stderr)
        return 2
    recipe = str(Path(a.recipe).resolve()) if Path(a.recipe).exists() else a.recipe
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(o, s, out / o.label / f"seed{s}") for o in orders for s in seeds]
    if not a.report_only:
        if a.world_size < 1:
            print("error: --world-size must be at least 1", file=sys.stderr)
            return 2
        # check the recipe once (every order) before hours of runs: the trainer's own --check
        for o in orders:
            args = ["--recipe", recipe, "--check", "--world-size", str(a.world_size)]
            for s in [*o.sets(), *a.overrides]:
                args += ["--set", s]
            chk = subprocess.run([sys.executable, "-m", "ds_ext.train", *args], capture_output=True, text=True,
                                 env=_env())
            if chk.returncode != 0:
                print(f"error: order {o.label}: the recipe check failed:\n{chk.stderr.strip() or chk.stdout.strip()}",
                      file=sys.stderr)
                return 2
        todo = [r for r in runs if not (a.reuse and (r.dir / "summary.json").is_file())]
        for i, r in enumerate(todo, 1):
            execute(r, recipe, a.overrides, a.world_size, a.launcher, a.timeout)
            read_summary(r)
            got = (f"final loss {value(r, 'final_train_loss'):.4f}, val acc {r.summary.get('val_acc', float('nan')):.4f}"
                   if r.summary is not None else f"FAILED ({r.error})")
            print(f"[{i}/{len(todo)}] {r.order.label} seed {r.seed}: {r.seconds:.1f} s, {got}", flush=True)
    for r in runs:
        if r.summary is None and r.error is None:
            read_summary(r)
    header = (f"orders x seeds on {a.recipe}: {len(orders)} orders ({', '.join(labels)}) x {len(seeds)} seeds "
              f"({','.join(map(str, seeds))}), world {a.world_size}"
              + (f"; --set {' --set '.join(a.overrides)}" if a.overrides else "")
              + f"; {sum(r.summary is not None for r in runs)} of {len(runs)} runs finished")
    text, data = report(runs, orders, seeds, baseline, header)
    failed = [r for r in runs if r.summary is None]
    for r in failed:
        text += f"\nfailed: {r.order.label} seed {r.seed}: {r.error}; log {r.log}"
    png = None
    try:
        png = plot(runs, orders, baseline, out / "loss_per_epoch.png")
    except Exception as e:  # the numbers above stand without the figure
        text += f"\nplot not written: {type(e).__name__}: {e}"
    if png is not None:
        text += f"\nplot: {png}"
    text += f"\nreport: {out / 'report.txt'}, numbers: {out / 'comparison.json'}"
    print(text)
    (out / "report.txt").write_text(text + "\n")
    data.update(recipe=a.recipe, overrides=a.overrides, world_size=a.world_size)
    (out / "comparison.json").write_text(json.dumps(data, indent=1, default=float))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
