"""bench-train's report arithmetic (``benchmarks/train_stats.py``, ``benchmarks/train_report.py``) on a synthetic
result file whose every figure is known by construction: medians over the rounds, their min-max spread, ratios
taken within a round, overlap, first launch, post-communication tail, CPU time; the run order of the rounds; and the
GPU projection's table shape (``python -m ds_ext.costmodel`` as bench-train calls it)."""
import json

import pytest

from benchmarks import results as bench_results
from benchmarks import train as bt
from benchmarks import train_stats as ts
from ds_ext.costmodel import project as pj

#: per method and round: step ms (both ranks alike); round r of "alone" is the compute alone of that round
STEP = {"alone": [500.0, 600.0, 400.0], "allreduce": [1000.0, 1100.0, 900.0], "ddp_allreduce": [2000.0, 2000.0, 1800.0],
        "ddp_powersgd": [800.0, 1000.0, 900.0], "ddp_powersgd_1b": [1000.0, 1000.0, 1000.0]}
FWD, BWD = 100.0, 400.0
LAUNCH_FRAC, TAIL = 0.25, 50.0


def _sample(step: float, r: int, colls: bool = True) -> dict:
    t_fwd, t_ready = FWD, FWD + BWD
    launch = t_fwd + LAUNCH_FRAC * BWD
    return {"t_fwd": t_fwd, "t_ready": t_ready, "t_bwd": t_ready, "t_end": step, "cpu_fwd": 10.0, "cpu_bwd": 20.0,
            "cpu_tail": 30.0, "cpu_process": 90.0, "loss": 1.0, "other_fwd": 0.0, "other_bwd": 25.0, "other_tail": 5.0,
            "ready_frac": None, "round": r,
            "colls": [["all_reduce", 1000, launch, step - TAIL]] if colls else []}


def _result(steps_per_round: int = 2) -> dict:
    ranks = []
    for rank in range(2):
        methods = {}
        for m, per in STEP.items():
            if m == "alone":
                continue
            methods[m] = {"samples": [_sample(s, r) for r, s in enumerate(per) for _ in range(steps_per_round)],
                          "period": 1, "info": {}, "masks": [[rank]]}
        # local SGD with H = 2: a collective every second step only; per-step time = the mean over each period
        methods["local_qsr"] = {"samples": [_sample(st, r, colls=i % 2 == 1) for r in range(3)
                                            for i, st in enumerate((600.0, 1000.0))], "period": 2, "info": {},
                                "masks": [[rank]]}
        ranks.append({"rank": rank, "core": rank, "masks": [[rank]], "methods": methods,
                      "alone": {"fwd_ms": FWD, "bwd_ms": BWD, "opt_ms": 10.0, "step_ms": 510.0, "cpu_fwd_ms": 10.0,
                                "cpu_bwd_ms": 20.0, "cpu_opt_ms": 5.0, "other_bwd_ms": 0.0, "other_tail_ms": 0.0,
                                "ready_frac": [0.5, 1.0]},
                      "reference": {"period": 1, "samples": [_sample(s, r, colls=False) for r, s in
                                                            enumerate(STEP["alone"]) for _ in range(steps_per_round)]}})
    return {"kind": "benchmarks.train", "world": 2, "local_size": 1, "bandwidth": "local", "model": "resnet18",
            "image_size": 16, "batch": 4, "classes": 10, "steps": steps_per_round, "warmup": 1, "rounds": 3,
            "order": [], "sequence": [[0, "alone", 0.0, 1.0, 0.5]], "ddp": False, "deepspeed_imported": True,
            "pinned": True, "options": {}, "time": "now", "shapes": [[4, 4], [4]], "ranks": ranks}


def test_figures_are_medians_over_rounds_with_their_spread():
    rows = ts.summarize(_result())
    ar = rows["allreduce"]
    assert ar["n_rounds"] == 3
    assert ar["step_ms"] == 1000.0 and ar["step_ms_spread"] == [900.0, 1100.0]
    assert ar["samples_per_s"] == pytest.approx(8 / 1.0) and ar["samples_per_s_spread"] == pytest.approx([8 / 1.1, 8 / 0.9])
    # step - compute alone of the same round: 500, 500, 500
    assert ar["rounds"]["over_alone_ms"] == [500.0, 500.0, 500.0] and ar["over_alone_ms"] == 500.0
    # post-comm tail, first launch, overlap: by construction
    assert ar["post_comm_ms"] == pytest.approx(TAIL) and ar["first_launch_frac"] == pytest.approx(LAUNCH_FRAC)
    comm = 1000.0 - TAIL - (FWD + LAUNCH_FRAC * BWD)           # round 0: launch 200 .. 950
    assert ar["rounds"]["comm_ms"][0] == pytest.approx(comm)
    assert ar["rounds"]["overlap_ms"][0] == pytest.approx((1 - LAUNCH_FRAC) * BWD)
    assert ar["rounds"]["overlap_frac"][0] == pytest.approx((1 - LAUNCH_FRAC) * BWD / comm)
    assert ar["cpu_process_ms"] == 90.0 and ar["cpu_main_ms"] == 60.0


def test_ratios_are_taken_within_each_round_then_the_median():
    rows = ts.summarize(_result())
    ar = rows["allreduce"]
    # samples/s over DDP allreduce_hook's in the same round: 2000/1000, 2000/1100, 1800/900
    assert ar["rounds"]["x_ddp_allreduce"] == pytest.approx([2.0, 2000 / 1100, 2.0])
    assert ar["x_ddp_allreduce"] == pytest.approx(2.0) and ar["x_ddp_allreduce_spread"] == pytest.approx([2000 / 1100, 2.0])
    # the median of the ratios, not the ratio of the medians: 800/1000, 1000/1100, 900/900 -> median 0.909
    assert ar["x_ddp_powersgd"] == pytest.approx(1000 / 1100)
    assert rows["ddp_powersgd"]["x_ddp_powersgd_1b"] == pytest.approx(1000 / 900)
    assert rows["ddp_allreduce"]["x_ddp_allreduce"] == 1.0


def test_a_period_is_averaged_and_steps_without_collectives_have_no_tail():
    q = ts.summarize(_result())["local_qsr"]
    assert q["step_ms"] == 800.0                           # (600 + 1000) / 2 per round
    assert q["post_comm_ms"] == pytest.approx(TAIL)         # only the step that synchronised
    assert q["first_launch_frac"] == pytest.approx(LAUNCH_FRAC)
    assert q["rounds"]["over_alone_ms"] == [300.0, 200.0, 400.0] and q["over_alone_ms"] == 300.0
    assert q["launch_frac"] == []


def test_after_backward_launch_and_no_collective():
    late = dict(_sample(1000.0, 0), colls=[["all_reduce", 8, FWD + BWD + 100.0, 900.0]])
    v = ts.step_values(late)
    assert v["first_launch_frac"] == pytest.approx(1.25) and v["overlap_ms"] == 0.0 and v["post_comm_ms"] == 100.0
    none = ts.step_values(_sample(1000.0, 0, colls=False))
    assert none["first_launch_frac"] is None and none["post_comm_ms"] is None and none["comm_ms"] == 0.0


def test_report_writes_the_table_with_spreads_and_the_renamed_overlap(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_result()))
    assert bt.main(["report", str(tmp_path), "--no-check"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "hidden" not in md and "overlap %" in md and "post-comm tail ms" in md and "first launch" in md
    for label in ("x DDP allreduce_hook", "x DDP powerSGD_hook", "x DDP powerSGD_hook 1 bucket", "CPU ms/step"):
        assert label in md
    line = next(x for x in md.splitlines() if x.startswith("| `allreduce`"))
    assert "| 8.00 (7.27-8.89) |" in line and "| 1000 (900-1100) |" in line and "| 0.25 |" in line
    assert "2.00 (1.82-2.00)x" in line
    out = json.loads((tmp_path / "results.json").read_text())["merged"]
    assert out["rounds"] == 3 and set(out["rows"]) == {"allreduce", "ddp_allreduce", "ddp_powersgd",
                                                       "ddp_powersgd_1b", "local_qsr"}


def test_old_result_files_read_as_one_round():
    res = _result()
    for r in res["ranks"]:
        del r["reference"]
        for rec in r["methods"].values():
            rec["alone"] = dict(r["alone"], step_ms=400.0)
            for s in rec["samples"]:
                s.pop("round")
    row = bench_results.merged([dict(res, _file="ds.json")])["rows"]["allreduce"]
    assert row["n_rounds"] == 1 and row["over_alone_ms"] == 1000.0 - 400.0


def test_rounds_rotate_and_reverse_every_method_once():
    ms = ["a", "b", "c", "d", "e"]
    seq = bt.sequence(ms, 3)
    assert seq[0] == ["alone", "a", "b", "c", "d", "e"]
    assert seq[1] == list(reversed(["b", "c", "d", "e", "alone", "a"]))
    assert seq[2] == ["d", "e", "alone", "a", "b", "c"]
    assert all(sorted(r) == sorted(["alone"] + ms) for r in seq)
    # each method stays next to its baseline (ORDER pairs them), whichever way a round runs
    order = bt.default_methods()
    for a, b in (("allreduce", "ddp_allreduce"), ("powersgd", "ddp_powersgd"), ("half", "ddp_fp16")):
        assert order.index(b) == order.index(a) + 1


GPUS, BWS = [8, 16, 32, 64], [10.0, 25.0, 100.0]


def test_projection_table_has_every_gpu_count_and_link(capsys):
    """What bench-train writes to OUT/projection.txt (here with the estimated readiness): both tables with one row
    per (link, GPUs), one cell per method, and the assumptions printed before them."""
    methods = "allreduce,powersgd,acpsgd"
    assert pj.main(["--model", "digits_cnn", "--methods", methods, "--gpus", "8,16,32,64", "--bandwidth",
                    "10,25,100", "--overlap", "launch", "--image-size", "8", "--png", ""]) == 0
    out = capsys.readouterr().out
    for needle in ("## assumptions", "# ring model (NCCL's ring algorithm", "# launch points at N = 8",
                   "# compute: 30.5 ms/step", "latency source:", "eta source:", "# overlap: launch term"):
        assert needle in out, needle
    assert out.index("# ring model") < out.index("## projection A")
    for name in ("## projection A", "## projection B"):
        block = out[out.index(name):].split("\n\n")[0].splitlines()
        rows = [x.split() for x in block if x.strip() and x.split()[0].replace(".", "").isdigit()]
        assert [(float(r[0]), int(r[1])) for r in rows] == [(b, n) for b in BWS for n in GPUS]
        assert all(len(r) == 2 + 2 * 3 for r in rows)              # step ms and speed-up per method
        assert all(r[3] == "1.00x" for r in rows)                  # S-SGD against itself


def test_chart_draws_the_medians_of_a_report(tmp_path):
    """``benchmarks.train_chart`` (the README's headline picture) on the synthetic result's ``results.json``."""
    pytest.importorskip("matplotlib")
    from benchmarks import train_chart

    (tmp_path / "train.json").write_text(json.dumps(_result()))
    assert bt.main(["report", str(tmp_path), "--no-check"]) == 0
    med = train_chart.samples_per_s(json.loads((tmp_path / "results.json").read_text()))
    assert med["allreduce"] == pytest.approx((8.0, 7.27, 8.89), abs=0.01)  # the table's "8.00 (7.27-8.89)"
    png = tmp_path / "c.png"
    assert train_chart.main([str(tmp_path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train_chart.main([str(tmp_path / "nothing"), "--out", str(png)]) == 2
