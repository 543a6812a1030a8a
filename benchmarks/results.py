"""Readers of the benchmark result files: bench-cluster JSON (``load_results``), bench-compress output
(``read_compress_file``), bench-train JSON (``load_dir``, ``merged`` and its summaries), tc link rates."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from benchmarks.train_stats import BASELINES


# ------------------------------------------------------------------------------- measured results
def load_results(paths: Sequence[str]) -> List[dict]:
    """Bench result files (``benchmarks.cluster`` JSON), from files or directories."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise SystemExit(f"{p}: no such file or directory (run: sudo bash run/bench-cluster.sh)")
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"{f}: not a readable bench-cluster result ({e})") from None
            if isinstance(d, dict) and d.get("kind") == "benchmarks.cluster":
                d["_file"] = str(f)
                out.append(d)
    if not out:
        raise SystemExit(f"no bench-cluster results in {', '.join(paths)} (run: sudo bash run/bench-cluster.sh)")
    return out


def has_results(path: str) -> bool:
    """Whether ``path`` holds bench-cluster results (without raising, unlike ``load_results``)."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else ([p] if p.is_file() else [])
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("kind") == "benchmarks.cluster":
            return True
    return False


def read_compress_file(path: str) -> Dict[str, float]:
    """ms/step of allreduce / powersgd / acpsgd from ``run/bench-compress.sh`` output: the section
    measured on a CUDA device (the last one when there are several)."""
    cur, rows = None, {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"--compress-file {path}: cannot read ({e})") from None
    for line in text.splitlines():
        if line.startswith("# "):
            cur = "cuda" if "device cuda" in line else "cpu"
            if cur == "cuda":
                rows = {}
            continue
        parts = line.split()
        if cur == "cuda" and len(parts) >= 2 and parts[0] in ("allreduce", "powersgd", "acpsgd"):
            try:
                rows[parts[0]] = float(parts[1])
            except ValueError:
                pass
    if not rows:
        raise SystemExit(f"--compress-file {path}: no CUDA rows (allreduce/powersgd/acpsgd) found; it must be "
                         f"the output of run/bench-compress.sh on a machine with a GPU")
    return rows


def parse_rate(s: str) -> float:
    """tc rate ('1gbit', '10gbit', '500mbit') -> bits per second; 0 for 'unlimited'/unknown."""
    s = s.strip().lower()
    for unit, mult in (("tbit", 1e12), ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if s.endswith(unit):
            try:
                return float(s[: -len(unit)]) * mult
            except ValueError:
                break
    return 0.0


# ---------------------------------------------------------------------------------------- bench-train
# the per-step and per-round arithmetic: benchmarks/train_stats.py
from benchmarks.train_stats import alone_summary, summarize, union_length  # noqa: E402,F401


def load_dir(path) -> List[dict]:
    out = []
    for f in sorted(Path(path).glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("kind") == "benchmarks.train":
            d["_file"] = str(f)
            out.append(d)
    if not out:
        raise SystemExit(f"no bench-train results in {path} (run: bash run/bench-train.sh)")
    return out


def merged(results: List[dict]) -> dict:
    """The ds_ext and DDP files of one directory as one table: per method its summary and its file's compute
    alone."""
    rows: Dict[str, dict] = {}
    for r in results:
        for m, s in summarize(r).items():
            rows[m] = dict(s, alone=alone_summary(r, m), file=Path(r["_file"]).name, world=r["world"],
                           batch=r["batch"])
    # a baseline measured in another file of the directory (results written before the rounds): its ratio from the
    # medians (no per-round pairing)
    for m, row in rows.items():
        for base, _ in BASELINES:
            if row.get(f"x_{base}") is None and base in rows and rows[base]["file"] != row["file"]:
                row[f"x_{base}"] = row["samples_per_s"] / rows[base]["samples_per_s"]
    base = results[0]
    return {"world": base["world"], "rounds": base.get("rounds", 1), "sequence": base.get("sequence", []),
            "local_size": base["local_size"], "bandwidth": base["bandwidth"],
            "model": base["model"], "image_size": base["image_size"], "batch": base["batch"], "steps": base["steps"],
            "warmup": base["warmup"], "shapes": base["shapes"], "options": base["options"], "rows": rows,
            "files": {Path(r["_file"]).name: {"ddp": r["ddp"], "deepspeed_imported": r["deepspeed_imported"],
                                                "time": r["time"], "pinned": r["pinned"],
                                                "cores": [x["core"] for x in r["ranks"]],
                                                "masks": [x["masks"] for x in r["ranks"]]} for r in results}}
