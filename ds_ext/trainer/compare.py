"""Pictures of runs: ``ds-ext compare RUN_DIR ... --out cmp.png`` (also ``python -m ds_ext.compare``) and the
``curves.png`` the trainer writes into each run directory at the end.

    ds-ext compare runs/allreduce runs/powersgd runs/acpsgd --out cmp.png

Each run is read from its run directory (``log.dir``): ``history.jsonl`` (the logged records; see
ds_ext/trainer/records.py) and, for a finished run, ``summary.json``. The picture has four panels: the training
loss against the optimizer step, the same loss against the cumulative bytes each rank sent (``comm/bytes_total``;
log scale when the runs differ by more than 20x), the bytes per step by collective kind (``comm_bytes_by_kind``
of ``summary.json`` divided by the metered steps), and the step time (``train/step_time_s``, host timers,
checkpoint saves and evaluation left out). The text table has one line per run: method, steps, final training
loss (rank 0's last logged value), validation accuracy, bytes per rank (total and per step) and the median
samples per second of the logged windows.

The plots need matplotlib (the ``plots`` extra: ``pip install 'ds_ext[plots]'``); without it the table is still
printed. Exit codes: 0 done; 1 the picture could not be drawn (matplotlib missing, or a write that failed:
the reason is printed); 2 a run directory that does not exist or holds no records.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

HISTORY_FILE, SUMMARY_FILE, CURVES_FILE = "history.jsonl", "summary.json", "curves.png"
INSTALL_HINT = "pip install 'ds_ext[plots]' (or pip install matplotlib)"


@dataclass
class Run:
    """One run's records: its label, the logged records in step order and its summary (empty while unfinished)."""

    label: str
    history: List[dict]
    summary: Dict = field(default_factory=dict)

    def series(self, key: str) -> tuple:
        """``(steps, values)`` of the records that hold ``key``."""
        pts = [(r["step"], r[key]) for r in self.history if isinstance(r.get(key), (int, float)) and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def bytes_per_step_by_kind(self) -> Dict[str, float]:
        """Bytes per rank per metered step of each collective kind, from ``summary.json``."""
        s = self.summary
        per, total = s.get("comm_bytes_per_step") or 0, s.get("comm_bytes_total") or 0
        steps = total / per if per else max(int(s.get("steps") or 1), 1)
        return {k: v / steps for k, v in (s.get("comm_bytes_by_kind") or {}).items()}


class NoRecords(ValueError):
    """A run directory that does not exist or holds neither ``history.jsonl`` nor ``summary.json``."""


def read_history(path: Path) -> List[dict]:
    """The records of a ``history.jsonl``, one per step (the last one logged for a step), in step order; a
    line cut short by a killed process is skipped."""
    kept: Dict[int, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
            kept[int(rec["step"])] = rec
        except (ValueError, TypeError, KeyError):
            continue
    return [kept[k] for k in sorted(kept)]


def read_run(run_dir, label: Optional[str] = None) -> Run:
    """A run from its directory: ``history.jsonl`` when it has records, else the ``history`` that
    ``summary.json`` keeps. Raises ``NoRecords``."""
    d = Path(run_dir)
    if not d.is_dir():
        raise NoRecords(f"{d}: no such run directory")
    summary: Dict = {}
    try:
        summary = json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    history = read_history(d / HISTORY_FILE) or [r for r in summary.get("history", []) if isinstance(r, dict)]
    if not history and not summary:
        raise NoRecords(f"{d}: no {HISTORY_FILE} or {SUMMARY_FILE} (not a run directory, or a run that logged "
                        f"nothing yet)")
    return Run(label or d.name, history, summary if isinstance(summary, dict) else {})


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def method_of(run: Run) -> str:
    s = run.summary
    if not s:
        return "?"
    return "+".join(str(s[k]) for k in ("reducer", "sync") if s.get(k) not in (None, "none")) or "none"


def table(runs: Sequence[Run]) -> str:
    """The text table: one line per run."""
    head = ["run", "method", "steps", "final loss", "val acc", "bytes/rank", "bytes/step", "samples/s"]
    rows = [head]
    for r in runs:
        steps, loss = r.series("train/loss")
        _, sps = r.series("train/samples_per_s")
        s = r.summary
        last_step = s.get("steps", steps[-1] if steps else None)
        total = s.get("comm_bytes_total")
        if total is None:
            _, tot = r.series("comm/bytes_total")
            total = tot[-1] if tot else None
        per = s.get("comm_bytes_per_step")
        rows.append([r.label, method_of(r), "-" if last_step is None else str(last_step),
                     f"{loss[-1]:.4f}" if loss else "-",
                     f"{s['val_acc']:.4f}" if isinstance(s.get("val_acc"), (int, float)) else "-",
                     "-" if total is None else _human(total), "-" if per is None else _human(per),
                     f"{statistics.median(sps):.0f}" if sps else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in rows)


def draw(runs: Sequence[Run], out, title: Optional[str] = None, size=(11, 7.5), dpi: int = 90) -> Path:
    """The four panels of ``runs`` into the PNG ``out`` (matplotlib, Agg backend; ImportError without
    matplotlib). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=size, dpi=dpi)
    try:
        _panels(ax, runs)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = Path(out)
        fig.savefig(out)
        return out
    finally:
        plt.close(fig)


def _panels(ax, runs: Sequence[Run]) -> None:
    colors = [f"C{i % 10}" for i in range(len(runs))]
    top = []
    for r, c in zip(runs, colors):
        st, loss = r.series("train/loss")
        ax[0, 0].plot(st, loss, color=c, label=r.label)
        # cumulative bytes at each logged step; a record without it (none logged yet) is left out
        by_step = {s: b for s, b in zip(*r.series("comm/bytes_total"))}
        pts = [(by_step[s], v) for s, v in zip(st, loss) if s in by_step]
        if pts:
            ax[0, 1].plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], color=c, label=r.label)
            top.append(max(p[0] for p in pts))
        st2, dt = r.series("train/step_time_s")
        ax[1, 1].plot(st2, [1e3 * t for t in dt], color=c, label=r.label)
    positive = [t for t in top if t > 0]
    if positive and max(positive) > 20 * min(positive):
        ax[0, 1].set_xscale("log")
    ax[0, 0].set(xlabel="optimizer step", ylabel="training loss (rank 0)", title="loss against step")
    ax[0, 1].set(xlabel="MiB sent per rank (cumulative)", ylabel="training loss (rank 0)",
                 title="loss against bytes sent")
    ax[1, 1].set(xlabel="optimizer step", ylabel="ms per step", title="step time (logged windows)")
    _kind_bars(ax[1, 0], runs, colors)
    for a in (ax[0, 0], ax[0, 1], ax[1, 1]):
        a.grid(alpha=0.3)
        if len(runs) > 1:
            a.legend(fontsize="small")


def _kind_bars(a, runs: Sequence[Run], colors) -> None:
    kinds = sorted({k for r in runs for k in r.bytes_per_step_by_kind()})
    a.set(title="bytes per step by kind (per rank)", ylabel="KiB per step")
    if not kinds:
        a.text(0.5, 0.5, "no summary.json (unfinished run)" if not any(r.summary for r in runs) else "nothing sent",
               ha="center", va="center", transform=a.transAxes)
        a.set_xticks([])
        return
    width = 0.8 / len(runs)
    for i, (r, c) in enumerate(zip(runs, colors)):
        per = r.bytes_per_step_by_kind()
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(kinds))]
        a.bar(xs, [per.get(k, 0.0) / 1024 for k in kinds], width=width, color=c, label=r.label)
    a.set_xticks(range(len(kinds)))
    a.set_xticklabels(kinds, rotation=20, ha="right", fontsize="small")
    a.grid(alpha=0.3, axis="y")
    if len(runs) > 1:
        a.legend(fontsize="small")


def write_curves(run_dir, history: List[dict], summary: dict, title: Optional[str] = None) -> Path:
    """``<run_dir>/curves.png``: the four panels of one run (the trainer's end of run, rank 0). Raises
    ImportError without matplotlib, OSError when the file cannot be written."""
    run = Run(Path(run_dir).name, history, summary)
    return draw([run], Path(run_dir) / CURVES_FILE, title=title, size=(9, 6), dpi=80)


def _labels(dirs: Sequence[str], given: Optional[str]) -> List[Optional[str]]:
    if given:
        labels = [x.strip() for x in given.split(",")]
        if len(labels) != len(dirs):
            raise NoRecords(f"--labels: {len(labels)} labels for {len(dirs)} run directories")
        return labels
    names = [Path(d).name for d in dirs]
    # two runs of the same name in different places: name them by their parent too
    return [f"{Path(d).parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def main(argv: Optional[Sequence[str]] = None, prog: str = "ds-ext compare") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Compare runs: loss against step and against bytes sent, bytes per step by kind, step time (a PNG), and "
        "a table of final loss, bytes per rank and samples/s. Each RUN_DIR is a run's log.dir."))
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", default=None, help="the PNG to write (default: the table only)")
    ap.add_argument("--labels", default=None, help="comma-separated names for the runs (default: directory names)")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    try:
        runs = [read_run(d, lab) for d, lab in zip(a.runs, _labels(a.runs, a.labels))]
    except NoRecords as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(runs))
    if a.out is None:
        return 0
    try:
        path = draw(runs, a.out, a.title)
    except ImportError:
        print(f"no picture: matplotlib is not installed; {INSTALL_HINT}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
