"""Issue 20 item 7: comparing data orders honestly.

* ``benchmarks.orders``' statistics (t distribution, confidence interval, paired t-test, sign test)
  against values worked out by hand (closed forms of Student's t for 1 and 2 degrees of freedom);
* the command's report on synthetic ``summary.json`` files (no training): per-run table, wins, ratio,
  p-values, one line per failed run with its log, exit 1, the plot;
* ``dgrab``'s ``remainder`` option: ``drop`` (default) is the order of before (the remainder never
  visited, named with its count), ``visit`` visits every example of the shard exactly once per epoch on
  every rank with the same number of microbatches and the same balanced unit order;
* the trainer logs the all-rank mean training loss per epoch (one real 2-rank run, ``remainder: visit``).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import orders as B
from ds_ext.testing import LoopbackWorld
from ds_ext.order.dgrab import DGrab, spread
from ds_ext.registry import ORDERS, load_builtin

load_builtin()


# ---- statistics against hand-computed values ---------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.5, 1.0, 2.0, 5.0, 30.0])
def test_t_distribution_closed_forms(t):
    # df = 1 (Cauchy): P(|T| >= t) = 1 - 2 atan(t) / pi; df = 2: P(|T| >= t) = 1 - t / sqrt(2 + t^2)
    assert B.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    assert B.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)


def test_t_critical_values():
    assert B.t_critical(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # 12.7062
    assert B.t_critical(2) == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975), rel=1e-9)  # 4.3027
    assert B.t_critical(9) == pytest.approx(2.262157, abs=1e-6)  # the table value
    assert B.t_critical(10**6) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile


def test_mean_ci_paired_t_and_sign_test_by_hand():
    m, lo, hi = B.mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, df 2
    half = math.sqrt(2 * 0.9025 / 0.0975) / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)
    assert math.isnan(B.mean_ci([4.0])[1])
    # differences (1, 2, 2): mean 5/3, sd sqrt(1/3), t = (5/3) / (sqrt(1/3)/sqrt(3)) = 5, df 2: p = 1 - 5/sqrt(27)
    t, p = B.paired_t([1.0, 2.0, 3.0], [2.0, 4.0, 5.0])
    assert t == pytest.approx(5.0) and p == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-9)
    assert B.paired_t([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)  # no difference at all
    assert B.paired_t([1.0, 2.0], [2.0, 3.0]) == (math.inf, 0.0)  # the same difference on every seed
    assert B.sign_test_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert B.sign_test_p(3, 0) == 0.25 and B.sign_test_p(5, 5) == 1.0 and B.sign_test_p(0, 0) == 1.0
    c = B.compare([1.0, 2.0, 4.0], [0.5, 2.0, 5.0], higher_better=False)
    assert (c["wins"], c["ties"], c["losses"]) == (1, 1, 1)
    assert c["ratio_mean"] == pytest.approx((0.5 + 1.0 + 1.25) / 3)


def test_parse_seeds_and_orders():
    assert B.parse_seeds("0..3") == [0, 1, 2, 3] and B.parse_seeds("0..1,7") == [0, 1, 7]
    with pytest.raises(ValueError):
        B.parse_seeds("1,1")
    o = B.parse_orders("rr,cdgrab", ["visit={name: dgrab, remainder: visit}"])
    assert [x.label for x in o] == ["rr", "cdgrab", "visit"] and o[2].name == "dgrab"
    assert o[1].sets() == ["method.order={name: cdgrab}", "method.reducer={name: cdgrab}"]
    with pytest.raises(ValueError, match="at least two"):
        B.parse_orders("rr", [])


# ---- the command's report on synthetic summary.json files ---------------------------------------------

def _summary(losses, acc, vloss):
    return {"epoch_losses": losses, "val_acc": acc, "val_loss": vloss, "history": []}


def test_report_on_synthetic_summaries(tmp_path, capsys):
    runs = {("rr", 0): _summary([1.0, 0.5, 0.20], 0.90, 0.30), ("rr", 1): _summary([1.0, 0.5, 0.10], 0.92, 0.25),
            ("rr", 2): _summary([1.0, 0.6, 0.40], 0.91, 0.28),
            ("dgrab", 0): _summary([1.0, 0.4, 0.10], 0.91, 0.29), ("dgrab", 1): _summary([1.0, 0.5, 0.05], 0.90, 0.26)}
    for (order, seed), s in runs.items():  # dgrab seed 2 failed: no summary.json
        d = tmp_path / order / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
    code = B.main(["--recipe", "recipes/quickstart.yaml", "--orders", "rr,dgrab", "--seeds", "0..2",
                   "--out", str(tmp_path), "--report-only"])
    out = capsys.readouterr().out
    assert code == 1  # a run failed
    assert f"failed: dgrab seed 2: no summary.json; log {tmp_path / 'dgrab' / 'seed2' / 'train.log'}" in out
    assert "| rr | 0.2000 / 0.9000 | 0.1000 / 0.9200 | 0.4000 / 0.9100 | 0.2333 / 0.9100 |" in out
    assert "| dgrab | 0.1000 / 0.9100 | 0.0500 / 0.9000 | failed | 0.0750 / 0.9050 |" in out
    # seeds 0 and 1 are paired: final losses 0.2 -> 0.1 and 0.1 -> 0.05 (ratios 0.5 and 0.5, 2/2 wins,
    # differences -0.1 and -0.05), accuracy 1 win of 2
    loss = next(line for line in out.splitlines() if line.startswith("| dgrab | final train loss"))
    cells = [c.strip() for c in loss.strip("|").split("|")]
    assert cells[2:6] == ["2", "0.1500", "0.0750", "2/2"]
    assert cells[6].startswith("0.500 [0.500, 0.500]")  # both ratios 0.5: an interval of zero width
    d, lo_hi = cells[7].split(" [")
    assert float(d) == pytest.approx(-0.075)
    tcrit = math.tan(0.475 * math.pi)  # df 1
    lo, hi = (float(x) for x in lo_hi.rstrip("]").split(", "))
    assert (lo, hi) == pytest.approx((-0.075 - tcrit * 0.025, -0.075 + tcrit * 0.025), abs=1e-4)
    # t = -0.075 / (sd / sqrt 2), sd = 0.025 sqrt 2 -> t = -3, df 1: p = 1 - 2 atan(3) / pi
    assert float(cells[8]) == pytest.approx(1 - 2 * math.atan(3) / math.pi, abs=1e-3)
    assert cells[9] == "0.500"  # sign test, 2 of 2
    acc = next(line for line in out.splitlines() if line.startswith("| dgrab | val accuracy"))
    assert "| 1/2 |" in acc
    assert "a small sample" in out
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["comparisons"]["dgrab"]["seeds"] == [0, 1]
    assert data["comparisons"]["dgrab"]["final_train_loss"]["wins"] == 2
    png = tmp_path / "loss_per_epoch.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.txt").read_text().startswith("orders x seeds on recipes/quickstart.yaml")


def test_report_all_finished_exits_zero(tmp_path, capsys):
    for order in ("rr", "x"):
        for seed in (3, 4):
            d = tmp_path / order / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(_summary([1.0, 0.3 + seed / 100], 0.9, 0.3)))
    code = B.main(["--recipe", "r.yaml", "--orders", "rr", "--order", "x={name: dgrab, remainder: visit}",
                   "--seeds", "3,4", "--out", str(tmp_path), "--report-only"])
    out = capsys.readouterr().out
    assert code == 0 and "failed:" not in out
    assert "| x | final train loss (all ranks) | 2 | 0.3350 | 0.3350 | 0/2 (2 tied) |" in out


# ---- dgrab's remainder option ------------------------------------------------------------------------

def test_spread_assignment():
    assert spread(3, 8) == [[0], [], [1], [], [], [2], [], []]
    assert [len(u) for u in spread(10, 4)] == [3, 2, 3, 2]
    assert spread(0, 4) == [[], [], [], []]


def _old_epoch_indices(o, B_):
    """The order before the option existed: units of B, the remainder never visited."""
    row = o.sorter.orders[o.rank].tolist()
    return [o.shard[u * B_ + b] for u in row for b in range(B_)]


def _epochs(name, remainder, n=3, num=203, micro=2, gas=3, epochs=4, d=5):
    """n loopback ranks running ``epochs`` epochs of an order fed with seeded random gradients; per rank and
    epoch: the microbatches, the unit order and (drop) the pre-option epoch order."""
    opts = {"remainder": remainder} if remainder else {}

    def body(comm):
        o = ORDERS.build(name, opts, num, comm.rank, comm.world_size, 7)
        steps, note = o.plan(micro, gas, (o.shard_size // micro) // gas)
        o.bind(comm=comm, numel=d)
        g = torch.Generator().manual_seed(100 + comm.rank)
        out = []
        for e in range(epochs):
            batches = o.epoch_batches(e)[: steps * gas]
            assert o.epoch_indices(e) == [i for b in batches for i in b]
            out.append({"batches": batches, "row": o.local_order(), "old": _old_epoch_indices(o, micro),
                        "shard": list(o.shard), "note": note, "rem": o.remainder_note()})
            for _ in batches:
                o.observe_microbatch(torch.randn(d, generator=g))
        return out

    return LoopbackWorld(n).run(body)


def test_remainder_visit_covers_every_example_once_per_epoch_on_every_rank():
    visit = _epochs("dgrab", "visit")
    drop = _epochs("dgrab", None)
    # shard 67 per rank; 33 microbatches of 2 -> 11 steps of 3 -> odd -> 10 steps, m = 30, r = 7
    for r in range(3):
        for e in range(4):
            v, dr = visit[r][e], drop[r][e]
            shard = v["shard"]
            assert len(shard) == 67 and len(v["batches"]) == len(dr["batches"]) == 30  # same steps on every rank
            flat = [i for b in v["batches"] for i in b]
            assert sorted(flat) == sorted(shard) and len(set(flat)) == 67  # every example exactly once
            assert sorted(len(b) for b in v["batches"]) == [2] * 23 + [3] * 7
            assert v["row"] == dr["row"]  # the same balanced order of the same units (same gradients)
            # drop: today's order, the last 7 examples of the shard never visited
            assert [i for b in dr["batches"] for i in b] == dr["old"]
            assert set(dr["old"]) == set(shard[:60])
        assert visit[r][0]["row"] != visit[r][3]["row"]  # the order did move
    assert visit == _epochs("dgrab", "visit")  # deterministic
    assert drop[0][0]["rem"] == "dgrab drops 7 examples per rank per epoch (remainder: drop)"
    assert "7 of the 67 examples of each local shard are not used" in drop[0][0]["note"]
    assert visit[0][0]["rem"] == "dgrab visits its 7 remainder examples per rank in 7 enlarged units (remainder: visit)"


def test_remainder_option_edge_cases():
    o = DGrab(100, 0, 2, 0)  # shard 50, no remainder with units of 1 and 2 microbatches per step
    o.plan(1, 2, 25)
    assert o.remainder_note() is None and not o.variable_units and o.dropped_examples == 0
    cap = ORDERS.build("dgrab", {"remainder": "visit"}, 1000, 0, 2, 0)  # shard 500, epoch capped at 2 steps
    with pytest.raises(ValueError, match="more than doubling"):
        cap.plan(4, 2, 2)
    a = ORDERS.build("dgrab", {"remainder": "visit"}, 203, 0, 3, 0)
    a.plan(2, 3, 11)
    b = DGrab(203, 0, 3, 0)
    b.plan(2, 3, 11)
    with pytest.raises(ValueError, match="remainder: drop, this run's with remainder: visit"):
        a.load_state_dict(b.state_dict())
    a2 = ORDERS.build("dgrab", {"remainder": "visit"}, 203, 0, 3, 0)
    a2.plan(2, 3, 11)
    a2.load_state_dict(a.state_dict())
    assert a2.epoch_batches(0) == a.epoch_batches(0)
    assert "remainder" not in b.state_dict()  # drop's state is the state of before


# ---- the trainer's all-rank epoch loss (one real 2-rank run) ------------------------------------------

def _trainer_recording_losses(rank, world, argv):
    """The trainer with ``F.cross_entropy`` wrapped: every training microbatch's loss and size on this rank,
    and what the trainer printed."""
    import contextlib
    import io

    import torch.nn.functional as F

    from ds_ext.trainer.loop import main

    seen, orig = [], F.cross_entropy

    def recording(input, target, *a, **kw):
        out = orig(input, target, *a, **kw)
        if kw.get("reduction", "mean") == "mean" and torch.is_grad_enabled():  # not the evaluation's sums
            seen.append((float(out), int(target.shape[0])))
        return out

    F.cross_entropy = recording
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        F.cross_entropy = orig
    return code, seen, err.getvalue()


def test_trainer_logs_the_all_rank_mean_epoch_loss(tmp_path):
    from tests import harness
    from tests.e2e.test_resume_matrix import argv

    # 180 training examples (val_fraction 0.9): shard 90 per rank, 2 steps of 2 microbatches of 16 per epoch,
    # the 26 remainder examples visited in enlarged microbatches
    args = argv(tmp_path, ("allreduce", "none", "dgrab"), "data.val_fraction=0.9", "checkpoint.every_steps=0",
                "method.order={name: dgrab, remainder: visit}", "log.every_steps=1")
    res = harness.run(_trainer_recording_losses, 2, argv=args)
    assert [r[0] for r in res] == [0, 0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["epoch_losses"]) == 2
    for e in range(2):
        per_rank = []
        for _, seen, _ in res:
            epoch = seen[4 * e: 4 * (e + 1)]
            assert len(seen) == 8 and sum(n for _, n in epoch) == 90  # every example of the shard, once
            per_rank.append(sum(loss for loss, _ in epoch) / 4)
        assert summary["epoch_losses"][e] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
        assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-3)  # rank 0 alone would be another number
    logged = [r for r in summary["history"] if "train/epoch_loss_all_ranks" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert [r["train/epoch_loss_all_ranks"] for r in logged] == summary["epoch_losses"]
    startup = res[0][2]
    assert "order=dgrab precision=fp32; dgrab visits its 26 remainder examples per rank in 4 enlarged units " \
           "(remainder: visit); run dir" in startup
