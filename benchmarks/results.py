"""Readers of the benchmark result files: bench-cluster JSON (``load_results``), bench-compress output
(``read_compress_file``), bench-train JSON (``load_dir``, ``merged`` and its summaries), tc link rates."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ds_ext.costmodel.presets import TRAIN_METHODS as METHODS


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
def union_length(intervals: Sequence[Sequence[float]], lo: float = float("-inf"), hi: float = float("inf")) -> float:
    """Length of the union of [a, b] intervals clipped to [lo, hi]."""
    iv = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, cur_a, cur_b = 0.0, None, None
    for a, b in iv:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


# ------------------------------------------------------------------------------------ the training loop


# ------------------------------------------------------------------------------------------ summaries
def step_values(smp: dict) -> dict:
    """Per-step derived values (ms) of one sample."""
    iv = [(c[2], c[3]) for c in smp["colls"]]
    comm = union_length(iv)
    hidden = union_length(iv, smp["t_fwd"], smp["t_ready"])
    return {"step_ms": smp["t_end"], "fwd_ms": smp["t_fwd"], "bwd_ms": smp["t_ready"] - smp["t_fwd"],
            "tail_ms": smp["t_end"] - smp["t_ready"], "comm_ms": comm, "hidden_ms": hidden,
            "exposed_ms": comm - hidden, "cpu_bwd_ms": smp["cpu_bwd"], "cpu_tail_ms": smp["cpu_tail"],
            "cpu_process_ms": smp["cpu_process"], "cpu_fwd_ms": smp["cpu_fwd"],
            "payload_bytes": float(sum(c[1] for c in smp["colls"])), "collectives": float(len(smp["colls"])),
            "other_fwd_ms": smp.get("other_fwd", 0.0), "other_bwd_ms": smp.get("other_bwd", 0.0),
            "other_tail_ms": smp.get("other_tail", 0.0)}


def summarize_rank(rec: dict) -> dict:
    """Median over steps (whole periods: the mean per step of each period, median over periods)."""
    period = rec["period"]
    vals = [step_values(s) for s in rec["samples"]]
    n = len(vals)
    out = {}
    for key in vals[0]:
        col = [v[key] for v in vals]
        chunks = [sum(col[j:j + period]) / len(col[j:j + period]) for j in range(0, n, period)]
        out[key] = statistics.median(chunks)
    tot_c = sum(v["comm_ms"] for v in vals)
    out["hidden_frac"] = sum(v["hidden_ms"] for v in vals) / tot_c if tot_c > 0 else 0.0
    out["mean_step_ms"] = sum(v["step_ms"] for v in vals) / n
    # launch of each during-backward collective as a fraction of backward (median over steps, by index)
    fr = []
    for s in rec["samples"]:
        b0, b1 = s["t_fwd"], s["t_ready"]
        fr.append([(c[2] - b0) / (b1 - b0) for c in s["colls"] if b0 <= c[2] <= b1 and b1 > b0])
    k = min((len(f) for f in fr), default=0)
    out["launch_frac"] = [statistics.median(f[i] for f in fr) for i in range(k)] if period == 1 else []
    return out


def summarize(result: dict) -> Dict[str, dict]:
    """Per method: the mean over ranks of each rank's summary; samples/s from the median step."""
    out = {}
    methods = [m for m in METHODS if all(m in r["methods"] for r in result["ranks"])]
    for m in methods:
        per = [summarize_rank(r["methods"][m]) for r in result["ranks"]]
        s = {k: sum(p[k] for p in per) / len(per) for k in per[0] if k != "launch_frac"}
        s["launch_frac"] = per[0]["launch_frac"]
        s["samples_per_s"] = result["world"] * result["batch"] / (s["step_ms"] / 1e3)
        s["info"] = result["ranks"][0]["methods"][m]["info"]
        s["period"] = result["ranks"][0]["methods"][m]["period"]
        out[m] = s
    return out


def alone_summary(result: dict, method: Optional[str] = None) -> dict:
    """Compute alone, mean over ranks: the run's first measurement (with the readiness profile), or, for
    ``method``, the one taken right before it (the readiness profile from the first)."""
    first = [r["alone"] for r in result["ranks"]]
    al = first
    if method is not None and all("alone" in r["methods"].get(method, {}) for r in result["ranks"]):
        al = [r["methods"][method]["alone"] for r in result["ranks"]]
    keys = [k for k in al[0] if isinstance(al[0][k], (int, float))]
    out = {k: sum(a[k] for a in al) / len(al) for k in keys}
    n = len(first[0]["ready_frac"])
    out["ready_frac"] = [sum(a["ready_frac"][i] for a in first) / len(first) for i in range(n)]
    return out


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
    base = results[0]
    return {"world": base["world"], "local_size": base["local_size"], "bandwidth": base["bandwidth"],
            "model": base["model"], "image_size": base["image_size"], "batch": base["batch"], "steps": base["steps"],
            "warmup": base["warmup"], "shapes": base["shapes"], "options": base["options"], "rows": rows,
            "files": {Path(r["_file"]).name: {"ddp": r["ddp"], "deepspeed_imported": r["deepspeed_imported"],
                                                "time": r["time"], "pinned": r["pinned"],
                                                "cores": [x["core"] for x in r["ranks"]],
                                                "masks": [x["masks"] for x in r["ranks"]]} for r in results}}
