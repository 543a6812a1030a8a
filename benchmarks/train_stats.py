"""The arithmetic of bench-train's report (docs/dev/notes/bench-train.md): per-step values from the raw samples of
``benchmarks/train.py``, one figure per method and round (the alternations), and per method the median over the
rounds with its spread (min and max over the rounds), ratios against the baselines taken within each round.

A result file (``kind: benchmarks.train``) holds per rank ``methods[m]["samples"]`` (each sample a step: ``t_fwd``,
``t_ready``, ``t_end`` ms from the step's start, CPU times, ``colls`` = [op, bytes, launch ms, completion ms], and the
``round`` it ran in) and ``reference["samples"]``: the compute-alone steps (plain PyTorch, no communication) that run
once per round in the same rotation as the methods. Files written before the rounds existed (no ``round``, a
compute alone per method) read as one round.
"""
from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Optional, Sequence

from ds_ext.costmodel.presets import TRAIN_METHODS as METHODS

#: the baselines every method is compared with, within each round (a ratio > 1: faster than the baseline)
BASELINES = (("allreduce", "x S-SGD"), ("ddp_allreduce", "x DDP allreduce_hook"),
             ("ddp_powersgd", "x DDP powerSGD_hook"), ("ddp_powersgd_1b", "x DDP powerSGD_hook 1 bucket"))


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


def step_values(smp: dict) -> dict:
    """Per-step values (ms unless named otherwise) of one sample. ``first_launch_frac``: when the step's first
    collective was issued, as a fraction of backward (forward end 0, last gradient ready 1; above 1: after
    backward); ``post_comm_ms``: from the last collective's completion to the step's end. Both None in a step
    without collectives (local SGD between synchronisations)."""
    colls = smp["colls"]
    iv = [(c[2], c[3]) for c in colls]
    comm = union_length(iv)
    overlap = union_length(iv, smp["t_fwd"], smp["t_ready"])
    bwd = smp["t_ready"] - smp["t_fwd"]
    first = min((c[2] for c in colls), default=None)
    last_done = max((c[3] for c in colls), default=None)
    return {"step_ms": smp["t_end"], "fwd_ms": smp["t_fwd"], "bwd_ms": bwd, "tail_ms": smp["t_end"] - smp["t_ready"],
            "comm_ms": comm, "overlap_ms": overlap, "exposed_ms": comm - overlap,
            "cpu_fwd_ms": smp["cpu_fwd"], "cpu_bwd_ms": smp["cpu_bwd"], "cpu_tail_ms": smp["cpu_tail"],
            "cpu_main_ms": smp["cpu_fwd"] + smp["cpu_bwd"] + smp["cpu_tail"], "cpu_process_ms": smp["cpu_process"],
            "other_fwd_ms": smp.get("other_fwd", 0.0), "other_bwd_ms": smp.get("other_bwd", 0.0),
            "other_tail_ms": smp.get("other_tail", 0.0),
            "payload_bytes": float(sum(c[1] for c in colls)), "collectives": float(len(colls)),
            "first_launch_frac": (first - smp["t_fwd"]) / bwd if first is not None and bwd > 0 else None,
            "post_comm_ms": smp["t_end"] - last_done if last_done is not None else None}


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def rank_round(samples: List[dict], period: int = 1) -> dict:
    """One rank's figures of one round: the median over its steps (``period`` > 1: the mean per step of each whole
    period, median over periods), ``overlap_frac`` = overlap / communication summed over the steps."""
    vals = [step_values(s) for s in samples]
    out: Dict[str, Optional[float]] = {}
    for key in vals[0]:
        col = [v[key] for v in vals]
        if period > 1 and all(c is not None for c in col):
            col = [sum(col[j:j + period]) / len(col[j:j + period]) for j in range(0, len(col), period)]
        out[key] = _median(col)
    tot = sum(v["comm_ms"] for v in vals)
    out["overlap_frac"] = sum(v["overlap_ms"] for v in vals) / tot if tot > 0 else 0.0
    return out


def _mean(values: List[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def rounds_of(samples: List[dict]) -> List[int]:
    return sorted({int(s.get("round", 0)) for s in samples})


def method_rounds(result: dict, method: str) -> Dict[int, dict]:
    """round -> the method's figures in that round: each rank's ``rank_round``, mean over ranks; samples/s =
    ranks x batch / step."""
    ranks = [r["methods"][method] for r in result["ranks"]]
    out = {}
    for k in rounds_of(ranks[0]["samples"]):
        per = [rank_round([s for s in rec["samples"] if int(s.get("round", 0)) == k], rec.get("period", 1))
               for rec in ranks]
        fig = {key: _mean([p[key] for p in per]) for key in per[0]}
        fig["samples_per_s"] = result["world"] * result["batch"] / (fig["step_ms"] / 1e3)
        out[k] = fig
    return out


def alone_rounds(result: dict, method: Optional[str] = None) -> Dict[int, dict]:
    """round -> compute alone in that round (``reference`` samples, mean over ranks of the medians). A file without
    ``reference`` (one round): the compute alone measured before ``method`` (or the run's first)."""
    if all("reference" in r for r in result["ranks"]):
        out = {}
        for k in rounds_of(result["ranks"][0]["reference"]["samples"]):
            per = [rank_round([s for s in r["reference"]["samples"] if int(s.get("round", 0)) == k])
                   for r in result["ranks"]]
            out[k] = {key: _mean([p[key] for p in per]) for key in per[0]}
        return out
    als = [r["methods"].get(method, {}).get("alone") or r["alone"] for r in result["ranks"]]
    return {0: {"step_ms": sum(a["step_ms"] for a in als) / len(als)}}


def alone_summary(result: dict, method: Optional[str] = None) -> dict:
    """Compute alone for the cost model's check (mean over ranks): the reference steps of every round pooled
    (median per rank), or, in a file without them, the one before ``method``; the readiness profile from the
    run's first compute alone."""
    first = [r["alone"] for r in result["ranks"]]
    if all("reference" in r for r in result["ranks"]):
        per = []
        for r in result["ranks"]:
            v = rank_round(r["reference"]["samples"])
            per.append({"fwd_ms": v["fwd_ms"], "bwd_ms": v["bwd_ms"], "opt_ms": v["tail_ms"], "step_ms": v["step_ms"],
                        "cpu_fwd_ms": v["cpu_fwd_ms"], "cpu_bwd_ms": v["cpu_bwd_ms"], "cpu_opt_ms": v["cpu_tail_ms"],
                        "other_bwd_ms": v["other_bwd_ms"], "other_tail_ms": v["other_tail_ms"]})
    else:
        per = [r["methods"].get(method, {}).get("alone") or r["alone"] for r in result["ranks"]]
    keys = [k for k in per[0] if isinstance(per[0][k], (int, float))]
    out = {k: sum(a[k] for a in per) / len(per) for k in keys}
    n = len(first[0]["ready_frac"])
    out["ready_frac"] = [sum(a["ready_frac"][i] for a in first) / len(first) for i in range(n)]
    return out


def spread(values: List[Optional[float]]) -> dict:
    """{"median", "min", "max", "n"} over the rounds' values (None: not measured in that round)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


#: the figures the table reports per method, each the median over the rounds with its spread
FIGURES = ("samples_per_s", "step_ms", "over_alone_ms", "comm_ms", "overlap_ms", "overlap_frac", "exposed_ms",
           "post_comm_ms", "cpu_process_ms", "cpu_main_ms", "first_launch_frac", "fwd_ms", "bwd_ms", "tail_ms",
           "payload_bytes", "collectives", "cpu_fwd_ms", "cpu_bwd_ms", "cpu_tail_ms", "other_fwd_ms",
           "other_bwd_ms", "other_tail_ms")


def launch_fracs(result: dict, method: str) -> List[float]:
    """Rank 0's launches inside backward as fractions of backward, by index, median over the steps."""
    rec = result["ranks"][0]["methods"][method]
    if rec.get("period", 1) != 1:
        return []
    fr = []
    for s in rec["samples"]:
        b0, b1 = s["t_fwd"], s["t_ready"]
        fr.append([(c[2] - b0) / (b1 - b0) for c in s["colls"] if b0 <= c[2] <= b1 and b1 > b0])
    k = min((len(f) for f in fr), default=0)
    return [statistics.median(f[i] for f in fr) for i in range(k)]


def summarize(result: dict) -> Dict[str, dict]:
    """Per method: every figure of ``FIGURES`` as the median over the rounds (key), its spread (``key + "_spread"``:
    [min, max]) and the per-round values (``rounds[key]``); ``over_alone_ms`` = step - compute alone of the same
    round; ratios to each baseline of ``BASELINES`` measured in the same run (``x_<baseline>``: samples/s over the
    baseline's in the same round, then median and spread)."""
    methods = [m for m in METHODS if all(m in r["methods"] for r in result["ranks"])]
    figs = {m: method_rounds(result, m) for m in methods}
    out = {}
    for m in methods:
        alone = alone_rounds(result, m)
        per_round = {}
        for k, f in figs[m].items():
            a = alone.get(k) or next(iter(alone.values()))
            f = dict(f, over_alone_ms=f["step_ms"] - a["step_ms"], alone_step_ms=a["step_ms"])
            for base, _ in BASELINES:
                b = figs.get(base, {}).get(k)
                f[f"x_{base}"] = f["samples_per_s"] / b["samples_per_s"] if b else None
            per_round[k] = f
        keys = list(FIGURES) + ["alone_step_ms"] + [f"x_{b}" for b, _ in BASELINES]
        row = {"rounds": {key: [per_round[k].get(key) for k in sorted(per_round)] for key in keys}}
        for key in keys:
            s = spread(row["rounds"][key])
            row[key] = s["median"]
            row[f"{key}_spread"] = [s["min"], s["max"]]
        row["n_rounds"] = len(per_round)
        row["launch_frac"] = launch_fracs(result, m)
        rec0 = result["ranks"][0]["methods"][m]
        row["info"], row["period"] = rec0["info"], rec0.get("period", 1)
        out[m] = row
    return out
