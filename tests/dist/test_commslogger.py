"""DeepSpeed's comms logger sees ds_ext's traffic: for every gradient reducer, a real 2-rank DeepSpeed
engine with ``"comms_logger": {"enabled": true, "prof_all": true}`` trains a few steps through
``ds_ext.attach``, and the bytes DeepSpeed logged under our ``ds_ext/<kind>`` log names (msg_size x
count; ``ds_ext/control``, our unmetered control data, excluded) agree with ``att.meter.total_bytes``
within 5%. For reducer ``deepspeed`` (DeepSpeed's own allreduce, whose bytes our meter derives) the
comparison is with DeepSpeed's own ``all_reduce`` entries. How DeepSpeed sizes a message, and why no
world-size conversion is needed for ``all_gather_into_tensor``: see ``tests/dist/workers_commslogger.py``.

All reducers run in one spawned 2-rank run (module fixture); ``-s`` shows the table.
"""
from __future__ import annotations

import pytest

from tests import harness
from tests.dist import workers_commslogger as W

TOLERANCE = 0.05
STEPS = 4
CONTROL_BYTES_PER_STEP = 64  # the engine's two int64 non-finite flags (16 B) plus a method's counts

@pytest.fixture(scope="module")
def runs():
    res = harness.run_pooled(W.compare, 2, steps=STEPS, timeout=240)
    print("\n" + table(res))
    return res


def figures(rec: dict, name: str) -> dict:
    """logger bytes (ours: ds_ext/<kind> but control; DeepSpeed's own all_reduce for reducer deepspeed),
    meter bytes, control bytes, and any other log entries."""
    logged = rec["logged"]
    if name == "deepspeed":
        log_bytes = logged.get("all_reduce", [0, 0])[0]
        meter = rec["by_kind"].get("allreduce", 0)
        others = {k: v for k, v in logged.items() if k not in ("all_reduce", "ds_ext/control")}
    else:
        log_bytes = sum(b for k, (b, _) in logged.items() if k.startswith("ds_ext/") and k != "ds_ext/control")
        meter = rec["total"]
        others = {k: v for k, v in logged.items() if not k.startswith("ds_ext/")}
    control = logged.get("ds_ext/control", [0, 0])[0]
    return {"logger": log_bytes, "meter": meter, "ratio": log_bytes / meter if meter else float("nan"),
            "control": control, "others": others}


def table(results) -> str:
    lines = [f"DeepSpeed comms logger vs ds_ext meter, {STEPS} steps, 2 ranks (rank 0; rank 1 in parentheses "
             "when it differs)",
             f"{'reducer':<10} {'logger B':>9} {'meter B':>9} {'ratio':>7} {'control B':>9}  per kind (logger/meter)"]
    for name in results[0]:
        rec = results[0][name]
        if rec["error"]:
            lines.append(f"{name:<10} ERROR {rec['error'].splitlines()[0]}")
            continue
        f = figures(rec, name)
        f1 = figures(results[1][name], name)
        alt = f" ({f1['logger']}/{f1['meter']})" if (f1["logger"], f1["meter"]) != (f["logger"], f["meter"]) else ""
        kinds = sorted(set(rec["by_kind"]) | {k[len("ds_ext/"):] for k in rec["logged"] if k.startswith("ds_ext/")})
        per = ", ".join(f"{k} {rec['logged'].get('ds_ext/' + k, [0])[0]}/{rec['by_kind'].get(k, '-')}" for k in kinds)
        if name == "deepspeed":
            per = f"all_reduce (DeepSpeed's own) {f['logger']} / allreduce (derived) {f['meter']}, control " \
                  f"{f['control']}/-"
        lines.append(f"{name:<10} {f['logger']:>9} {f['meter']:>9} {f['ratio']:>7.3f} {f['control']:>9}  {per}{alt}")
    return "\n".join(lines)


PARAMS = list(W.REDUCERS)


@pytest.mark.parametrize("name", PARAMS)
def test_logger_bytes_match_meter(runs, name):
    msg = table(runs)
    for rank, res in enumerate(runs):
        rec = res[name]
        assert rec["error"] is None, f"rank {rank}: {rec['error']}"
        assert rec["enabled"], "the comms logger was not switched on by the engine's config"
        assert rec["steps"] == STEPS
        f = figures(rec, name)
        assert f["meter"] > 0, msg
        assert abs(f["ratio"] - 1) <= TOLERANCE, f"{name} rank {rank}: logger {f['logger']} B vs meter " \
                                                 f"{f['meter']} B (ratio {f['ratio']:.3f})\n{msg}"
        # control data stays small, and nothing else was communicated during training (a reducer that
        # replaces DeepSpeed's allreduce leaves no all_reduce entry of DeepSpeed's own)
        assert f["control"] <= CONTROL_BYTES_PER_STEP * STEPS, msg
        assert not f["others"], f"{name}: unexpected log entries {f['others']}\n{msg}"


@pytest.mark.parametrize("name", [p for p in PARAMS if (p.values[0] if hasattr(p, "values") else p) != "deepspeed"])
def test_logger_kinds_match_meter_kinds(runs, name):
    """Stricter: every metered kind appears, byte for byte, under its own log name ``ds_ext/<kind>``."""
    for rank, res in enumerate(runs):
        rec = res[name]
        assert rec["error"] is None, rec["error"]
        logged = {k[len("ds_ext/"):]: b for k, (b, _) in rec["logged"].items()
                  if k.startswith("ds_ext/") and k != "ds_ext/control"}
        assert logged == rec["by_kind"], f"{name} rank {rank}: logged {logged} vs metered {rec['by_kind']}"
