"""``python -m benchmarks.train report`` / ``compare``: the bench-train tables (samples/s, ratios to S-SGD and to
DDP's hooks, overlap, post-communication tail, CPU time, first launch, the cost model's check; shaping on vs off),
from the result files of ``benchmarks/train.py`` (arithmetic: ``benchmarks/train_stats.py``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from benchmarks.results import load_dir, merged
from benchmarks.train_stats import BASELINES
from ds_ext.costmodel.presets import TRAIN_METHODS as METHODS
from ds_ext.costmodel.presets import MethodOptions, label_of


def _options(mg: dict) -> MethodOptions:
    """The method options a merged result ran with."""
    return MethodOptions(**{k: v for k, v in mg.get("options", {}).items() if k in MethodOptions.__dataclass_fields__})


def _cell(r: dict, key: str, fmt: str, scale: float = 1.0, spread: bool = True) -> str:
    """``median (min-max)`` over the rounds of one figure; '-' where it was not measured."""
    v = r.get(key)
    if v is None:
        return "-"
    text = format(v * scale, fmt)
    lo, hi = r.get(f"{key}_spread", [None, None])
    if spread and r.get("n_rounds", 1) > 1 and lo is not None and hi is not None:
        text += f" ({format(lo * scale, fmt)}-{format(hi * scale, fmt)})"
    return text


def _first_launch(r: dict) -> str:
    v = r.get("first_launch_frac")
    if v is None:
        return "-"
    return f"{v:.2f}" if v <= 1.0 else f"after ({v:.2f})"


def table_markdown(mg: dict, check: Optional[dict] = None) -> str:
    """The headline table: per method the median over the rounds of each figure and, in parentheses, its min-max
    over the rounds (docs/dev/notes/bench-train.md says what each column is)."""
    rows = mg["rows"]
    any_row = rows.get("allreduce") or next(iter(rows.values()), {})
    al = any_row.get("alone", {})
    n_rounds = mg.get("rounds", 1)
    lines = [f"## End to end: {mg['world']} ranks ({mg['local_size']} per host), links {mg['bandwidth']}, "
             f"{mg['model']} {mg['image_size']}x{mg['image_size']}, batch {mg['batch']}/rank; {n_rounds} round(s), each "
             f"running every method once ({mg['warmup']} warm-up + {mg['steps']} timed steps) in a rotated order; "
             f"median over the rounds (min-max)", "",
             f"Compute alone (plain PyTorch, same core, no communication; once per round, pooled): forward "
             f"{al.get('fwd_ms', 0):.0f} ms, backward {al.get('bwd_ms', 0):.0f} ms, optimizer "
             f"{al.get('opt_ms', 0):.0f} ms = {al.get('step_ms', 0):.0f} ms/step.", ""]
    base = rows.get("allreduce")
    if base is not None and al.get("step_ms"):
        lines += [f"S-SGD's communication (union of in-flight collectives) is {base['comm_ms']:.0f} ms per step = "
                  f"{base['comm_ms'] / al['step_ms']:.2f}x the compute alone.", ""]
    present = [(b, label) for b, label in BASELINES if b in rows]
    head = ("| method | samples/s | " + " | ".join(label for _, label in present)
            + " | step ms | step - compute alone ms | post-comm tail ms | CPU ms/step (all threads) | "
              "CPU ms/step (main) | overlap % | first launch (of backward) | comm ms | payload MB/step |")
    if check:
        head += " model step ms | model err |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for m in METHODS:
        r = rows.get(m)
        if r is None:
            continue
        ratios = " | ".join(_cell(r, f"x_{b}", ".2f") + "x" if r.get(f"x_{b}") is not None else "-"
                            for b, _ in present)
        line = (f"| `{m}` {label_of(m, _options(mg))} | {_cell(r, 'samples_per_s', '.2f')} | {ratios} | "
                f"{_cell(r, 'step_ms', '.0f')} | {_cell(r, 'over_alone_ms', '.0f')} | {_cell(r, 'post_comm_ms', '.0f')} | "
                f"{_cell(r, 'cpu_process_ms', '.0f')} | {_cell(r, 'cpu_main_ms', '.0f', spread=False)} | "
                f"{_cell(r, 'overlap_frac', '.0f', 100.0)} | {_first_launch(r)} | {_cell(r, 'comm_ms', '.0f', spread=False)} | "
                f"{r['payload_bytes'] / 1e6:.2f} |")
        if check:
            c = check["rows"].get(m)
            line += (f" {c['model_step_ms']:.0f} | {100 * c['err']:+.1f} % |" if c else " - | - |")
        lines.append(line)
    lines += ["", "Each figure: per round, each rank's median over its timed steps (local_qsr: per step of each "
                  "whole period), mean over the ranks; then the median over the rounds and (min-max). samples/s = "
                  "ranks x batch / step; x BASELINE = samples/s over the baseline's in the same round; step - "
                  "compute alone = against the compute alone of the same round; post-comm tail = last collective's "
                  "completion to the step's end; overlap = the part of the communication (union of in-flight "
                  "collectives) inside [forward end, last gradient ready], summed over the steps (an overlap, not a "
                  "saving: a slower backward raises it); first launch = when the step's first collective was "
                  "issued, as a fraction of backward (after: issued after the last gradient was ready). "
                  "docs/dev/notes/bench-train.md."]
    seq = mg.get("sequence") or []
    if seq:
        lines += ["", "Run order (round: method, start s, duration s, 1-min load): "
                  + "; ".join(f"{r}: {m} {t:.0f} {d:.0f} {ld:.1f}" for r, m, t, d, *rest in seq
                              for ld in ([rest[0]] if rest else [float('nan')]))]
    return "\n".join(lines)


def report(args) -> int:
    from benchmarks.costmodel_fit import print_train_check, train_check

    results = load_dir(args.dir)
    mg = merged(results)
    check = train_check(mg) if not args.no_check else None
    md = table_markdown(mg, check)
    print(md)
    if check:
        print()
        print_train_check(check)
    out = Path(args.dir)
    (out / "table.md").write_text(md + "\n")
    slim = {k: v for k, v in mg.items() if k != "shapes"}
    for r in slim["rows"].values():
        r["alone"] = {k: v for k, v in r["alone"].items() if k != "ready_frac"}
    (out / "results.json").write_text(json.dumps({"merged": slim, "check": check}, indent=1, default=str))
    print(f"# written: {out / 'table.md'}, {out / 'results.json'}")
    return 0


def compare_markdown(shaped: dict, unshaped: dict) -> str:
    """Step time with the links shaped against unshaped (the same methods, both merged): the extra communication
    shaping adds and how much of it reaches the step (the rest overlapped). Each step is taken above the compute
    alone of its round (``over_alone_ms``; files before the rounds: the one measured right before the method), so
    that a change of the machine's speed between the two runs does not read as communication."""
    lines = [f"## Shaping on ({shaped['bandwidth']}) vs off ({unshaped['bandwidth']}): step time above compute alone, "
             f"and communication", "",
             "| method | step - compute alone, ms, shaped | unshaped | added | comm ms shaped | unshaped | added | "
             "overlap share of the added comm |", "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        a, b = shaped["rows"].get(m), unshaped["rows"].get(m)
        if a is None or b is None:
            continue
        oa, ob = (r["over_alone_ms"] if r.get("over_alone_ms") is not None
                  else r["step_ms"] - r["alone"].get("step_ms", 0.0) for r in (a, b))
        ds, dc = oa - ob, a["comm_ms"] - b["comm_ms"]
        hid = f"{100 * (1 - ds / dc):.0f} %" if dc > 50.0 else "- (added comm < 50 ms)"
        lines.append(f"| `{m}` | {oa:.0f} | {ob:.0f} | {ds:+.0f} | {a['comm_ms']:.0f} | {b['comm_ms']:.0f} | "
                     f"{dc:+.0f} | {hid} |")
    lines += ["", "overlap share = 1 - (added step time above compute alone) / (added communication time): the part of "
                  "the communication that shaping made longer without making the step longer (meaningful where "
                  "shaping adds much communication: the full-gradient methods)."]
    return "\n".join(lines)


def compare(args) -> int:
    md = compare_markdown(merged(load_dir(args.shaped)), merged(load_dir(args.unshaped)))
    print(md)
    return 0
