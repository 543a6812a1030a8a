"""``python -m benchmarks.train report`` / ``compare``: the bench-train tables (samples/s, ratios to S-SGD and to
DDP's hooks, hidden communication, the cost model's check; shaping on vs off), from the result files of
``benchmarks/train.py``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from benchmarks.results import load_dir, merged
from ds_ext.costmodel.presets import TRAIN_METHODS as METHODS
from ds_ext.costmodel.presets import MethodOptions, label_of


def _options(mg: dict) -> MethodOptions:
    """The method options a merged result ran with."""
    return MethodOptions(**{k: v for k, v in mg.get("options", {}).items() if k in MethodOptions.__dataclass_fields__})


def table_markdown(mg: dict, check: Optional[dict] = None) -> str:
    rows = mg["rows"]
    base = rows.get("allreduce")
    al = (base or next(iter(rows.values()), {})).get("alone", {})
    lines = [f"## End to end: {mg['world']} ranks ({mg['local_size']} per host), links {mg['bandwidth']}, "
             f"{mg['model']} {mg['image_size']}x{mg['image_size']}, batch {mg['batch']}/rank, "
             f"{mg['steps']} timed steps after {mg['warmup']} warm-up (medians)", "",
             f"Compute alone (plain PyTorch, same core, no communication; measured right before S-SGD): forward "
             f"{al.get('fwd_ms', 0):.0f} ms, backward {al.get('bwd_ms', 0):.0f} ms, optimizer "
             f"{al.get('opt_ms', 0):.0f} ms = {al.get('step_ms', 0):.0f} ms/step.", ""]
    d_ar, d_ps = rows.get("ddp_allreduce"), rows.get("ddp_powersgd")
    if base is not None and al.get("step_ms"):
        lines.append(f"S-SGD's communication (union of in-flight collectives) is {base['comm_ms']:.0f} ms per step = "
                     f"{base['comm_ms'] / al['step_ms']:.2f}x its compute alone.")
        lines.append("")
    head = ("| method | samples/s | step ms | x S-SGD | x DDP allreduce_hook | x DDP powerSGD_hook | comm ms | "
            "hidden behind backward ms | hidden % | exposed ms | backward ms | after backward ms | payload MB/step | "
            "compute alone ms | step - compute alone ms |")
    if check:
        head += " model step ms | model err |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for m in METHODS:
        r = rows.get(m)
        if r is None:
            continue
        ratio = lambda ref: f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else "-"  # noqa: E731
        line = (f"| `{m}` {label_of(m, _options(mg))} | {r['samples_per_s']:.2f} | {r['step_ms']:.0f} | {ratio(base)} | "
                f"{ratio(d_ar)} | {ratio(d_ps)} | {r['comm_ms']:.0f} | {r['hidden_ms']:.0f} | "
                f"{100 * r['hidden_frac']:.0f} % | "
                f"{r['exposed_ms']:.0f} | {r['bwd_ms']:.0f} | {r['tail_ms']:.0f} | {r['payload_bytes'] / 1e6:.2f} | "
                f"{r['alone'].get('step_ms', 0):.0f} | {r['step_ms'] - r['alone'].get('step_ms', 0):.0f} |")
        if check:
            c = check["rows"].get(m)
            line += (f" {c['model_step_ms']:.0f} | {100 * c['err']:+.1f} % |" if c else " - | - |")
        lines.append(line)
    lines.append("")
    lines.append("samples/s = ranks x batch / median step time; hidden = union of the in-flight intervals of the "
                 "step's collectives inside [forward end, last gradient ready]; exposed = comm - hidden; local_qsr: "
                 "per step averaged over each H-step period; compute alone = plain PyTorch forward + backward + "
                 "optimizer on the same core right before the method (where it moves between rows, the machine's "
                 "speed moved: compare 'step - compute alone').")
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
    shaping adds and how much of it reaches the step (the rest was hidden). Each step is taken above its own
    compute alone (measured right before the method), so that a change of the machine's speed between the two
    runs does not read as communication."""
    lines = [f"## Shaping on ({shaped['bandwidth']}) vs off ({unshaped['bandwidth']}): step time above compute alone, "
             f"and communication", "",
             "| method | step - compute alone, ms, shaped | unshaped | added | comm ms shaped | unshaped | added | "
             "hidden share of the added comm |", "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        a, b = shaped["rows"].get(m), unshaped["rows"].get(m)
        if a is None or b is None:
            continue
        oa = a["step_ms"] - a["alone"].get("step_ms", 0.0)
        ob = b["step_ms"] - b["alone"].get("step_ms", 0.0)
        ds, dc = oa - ob, a["comm_ms"] - b["comm_ms"]
        hid = f"{100 * (1 - ds / dc):.0f} %" if dc > 50.0 else "- (added comm < 50 ms)"
        lines.append(f"| `{m}` | {oa:.0f} | {ob:.0f} | {ds:+.0f} | {a['comm_ms']:.0f} | {b['comm_ms']:.0f} | "
                     f"{dc:+.0f} | {hid} |")
    lines += ["", "hidden share = 1 - (added step time above compute alone) / (added communication time): the part of "
                  "the communication that shaping made longer without making the step longer (meaningful where "
                  "shaping adds much communication: the full-gradient methods)."]
    return "\n".join(lines)


def compare(args) -> int:
    md = compare_markdown(merged(load_dir(args.shaped)), merged(load_dir(args.unshaped)))
    print(md)
    return 0
