"""bench-train's headline chart: ``python -m benchmarks.train_chart OUT [OUT ...] --out chart.png``.

Reads each run directory's ``results.json`` (written by ``python -m benchmarks.train report OUT``) and draws, per
method, the median samples/s over the rounds with the min-max over the rounds as an error bar, one bar per run
directory; ds_ext's methods and PyTorch DDP's hooks in two colours. The README's headline picture
(``docs/img/headline.png``) is this chart of the runs its table quotes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Tuple

#: row order of the chart: ds_ext's methods, then DeepSpeed's own reduction, then DDP's hooks
ORDER = ("allreduce", "half", "powersgd", "acpsgd", "signsgd", "topk", "exdyna", "local_qsr", "deepspeed",
         "ddp_allreduce", "ddp_fp16", "ddp_powersgd", "ddp_powersgd_1b")


def samples_per_s(results: dict) -> Dict[str, Tuple[float, float, float]]:
    """method -> (median, min, max) of samples/s over the rounds of one ``results.json``."""
    out = {}
    for m, row in results["merged"]["rows"].items():
        v = row["rounds"]["samples_per_s"]
        out[m] = (statistics.median(v), min(v), max(v))
    return out


def chart(dirs: List[Path], out: Path, title: str = "") -> List[str]:
    """Draw the chart of ``dirs`` into ``out``; returns the methods drawn, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [samples_per_s(json.loads((d / "results.json").read_text())) for d in dirs]
    methods = [m for m in ORDER if any(m in r for r in runs)] + sorted({m for r in runs for m in r} - set(ORDER))
    height = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(methods) + 1.2))
    for j, (d, r) in enumerate(zip(dirs, runs)):
        for i, m in enumerate(methods):
            if m not in r:
                continue
            med, lo, hi = r[m]
            ddp = m.startswith("ddp_")
            ax.barh(i + j * height, med, height * 0.9, xerr=[[med - lo], [hi - med]], capsize=2,
                    color=("#b0b0b0" if ddp else "#2f6db3") if j == 0 else ("#d6d6d6" if ddp else "#8fb3e0"),
                    label=None)
            ax.text(hi + 0.1, i + j * height, f"{med:.2f}", va="center", fontsize=7)
    ax.set_yticks([i + height * (len(runs) - 1) / 2 for i in range(len(methods))], methods, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("samples/s (median over the rounds, min-max bars; one bar per run: " +
                  ", ".join(d.name for d in dirs) + ")", fontsize=8)
    ax.set_title(title or "bench-train: ds_ext (blue) and PyTorch DDP's hooks (grey) on the same links", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return methods


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_chart", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="bench-train output directories (with results.json)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.dirs if not (d / "results.json").is_file()]
    if missing:
        print(f"train_chart: no results.json in {', '.join(missing)} (run: python -m benchmarks.train report DIR)",
              file=sys.stderr)
        return 2
    try:
        methods = chart(args.dirs, args.out, args.title)
    except ImportError:
        print("train_chart: matplotlib is missing (pip install 'ds_ext[plots]')", file=sys.stderr)
        return 1
    print(f"train_chart: {len(methods)} methods from {len(args.dirs)} run(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
