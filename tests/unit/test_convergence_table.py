"""``benchmarks.convergence``'s report on hand-made cells (issue 31): the paired comparison against each method's
baseline (S-SGD; D-RR, random reshuffling on the same whole-epoch data, for the orders), bytes, step time and
time-to-loss."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import convergence as C
from benchmarks.orders import compare

SHAPES = [(256, 128), (128, 384), (384,), (128, 512), (512, 128)]


def _cell(label, seed, curve, bytes_per_step=1000.0, step_ms=50.0):
    c = C.Cell(C.METHODS[label], seed, Path("/nonexistent"))
    c.summary = {"steps": curve[-1][0], "comm_bytes_total": bytes_per_step * curve[-1][0],
                 "comm_bytes_per_step": bytes_per_step}
    c.curve, c.step_ms = curve, step_ms
    return c


def _cells():
    out = []
    for s in range(3):
        out.append(_cell("S-SGD", s, [(10, 4.0 + s * 0.01), (20, 3.0 + s * 0.01)], 1e6))
        out.append(_cell("topk-0.01", s, [(10, 4.2 + s * 0.01), (20, 3.3 + s * 0.01)], 2e4))
        out.append(_cell("D-RR", s, [(10, 4.1), (20, 3.2 + s * 0.01)], 1e6))
        out.append(_cell("D-GraB", s, [(10, 3.9), (20, 2.9 + s * 0.02)], 1e6))
    return out


def test_table_pairs_each_method_with_its_baseline():
    cells = _cells()
    methods = [C.METHODS[m] for m in ("S-SGD", "topk-0.01", "D-RR", "D-GraB")]
    lines, out = C.table(cells, methods, [0, 1, 2])
    assert out["S-SGD"]["compare"] is None and out["S-SGD"]["n"] == 3
    want = compare([3.0 + s * 0.01 for s in range(3)], [3.3 + s * 0.01 for s in range(3)], False)
    assert out["topk-0.01"]["compare"] == want and want["wins"] == 0 and want["ratio_mean"] > 1.09
    assert out["D-GraB"]["baseline"] == "D-RR" and out["D-GraB"]["compare"]["wins"] == 3
    # D-GraB is paired with the D-RR cells (same whole-epoch data), not with S-SGD's
    assert out["D-GraB"]["compare"] == compare([3.2 + s * 0.01 for s in range(3)],
                                               [2.9 + s * 0.02 for s in range(3)], False)
    assert out["topk-0.01"]["bytes_per_rank_step"] == 2e4
    assert any(line.startswith("topk-0.01") and "0/3" in line for line in lines)
    assert any(line.startswith("D-GraB") and "D-RR" in line and "3/3" in line for line in lines)


def test_time_to_loss_and_never():
    cells = _cells()
    methods = [C.METHODS[m] for m in ("S-SGD", "topk-0.01", "D-RR", "D-GraB")]
    lines, out = C.time_to_loss(cells, methods, [0, 1, 2], SHAPES, [1.0, 100.0], [8, 64], 20.0, 2)
    assert out["target_bpb"] == pytest.approx(3.01)
    assert out["rows"]["S-SGD"]["step"] == 20 and out["rows"]["topk-0.01"]["step"] is None
    # D-GraB's target is its own baseline's: D-RR's final mean 3.21, reached at step 20 (2.92; 3.9 at step 10)
    assert out["targets"]["D-RR"]["bpb"] == pytest.approx(3.21) and out["rows"]["D-GraB"]["target"] == "D-RR"
    assert out["rows"]["D-GraB"]["step"] == 20
    ssgd = out["rows"]["S-SGD"]["1G/64"]
    assert ssgd["seconds"] == pytest.approx(20 * ssgd["step_ms"] / 1e3)
    # D-GraB sends the S-SGD traffic plus its all_gather: never faster; slower on slow links
    assert out["rows"]["D-GraB"]["1G/64"]["step_ms"] > ssgd["step_ms"]
    assert out["rows"]["D-GraB"]["100G/8"]["step_ms"] >= out["rows"]["S-SGD"]["100G/8"]["step_ms"]
    assert any(line.startswith("topk-0.01") and "never" in line for line in lines)
    # the second target: S-SGD's mean loss at the first validation at or after half the budget (step 10: 4.01),
    # which top-k reaches at step 20 and D-GraB at step 10
    _, half = C.time_to_loss(cells, methods, [0, 1, 2], SHAPES, [1.0], [8], 20.0, 2, fraction=0.5)
    assert half["target_step"] == 10 and half["target_bpb"] == pytest.approx(4.01)
    assert half["rows"]["topk-0.01"]["step"] == 20 and half["rows"]["D-GraB"]["step"] == 10
    # DS-Sync's 2 groups cannot run on fewer than 4 ranks: n/a, not a number
    assert C.modelled_step_ms(C.METHODS["DS-Sync"], SHAPES, 2, 1.0, 20.0, 1) is None


def test_sync_methods_clip_through_the_synchronizer():
    sets = C.METHODS["LocalSGD-H4"].sets_for(0.5)
    assert "method.sync={name: local, period: constant, h: 4, clip_grad_norm: 0.5}" in sets
    assert "deepspeed.gradient_clipping=0.0" in sets
    assert C.METHODS["topk-0.01"].sets_for(0.5) == ["method.reducer={name: topk, density: 0.01}"]
    assert [m.label for m in C._methods("D-GraB")] == ["D-GraB", "D-RR", "S-SGD"]  # its baseline always runs
    # the orders and D-RR train on whole epochs of the same windows; the other methods on the whole split
    for label in ("D-RR", "D-GraB", "CD-GraB"):
        assert "data.max_train_windows=1920" in C.Cell(C.METHODS[label], 0, Path("x"), epoch_windows=1920).sets()
    ssgd = C.Cell(C.METHODS["S-SGD"], 0, Path("x"), epoch_windows=1920)
    assert not any("max_train_windows" in x for x in ssgd.sets())
    with pytest.raises(ValueError, match="whole epochs"):
        C.Cell(C.METHODS["D-GraB"], 0, Path("x")).sets()
    with pytest.raises(ValueError, match="unknown method"):
        C._methods("nope")


def test_a_relaunched_cell_may_replace_its_own_records(tmp_path):
    """``--fresh`` (and ``benchmarks.orders`` without ``--reuse``) launch a run again in the same directory: the
    trainer's refusal of a fresh run over earlier records must not stop it (it did, before ``log.overwrite``)."""
    from benchmarks.orders import train_args
    from ds_ext.trainer.recipe import load_recipe
    from ds_ext.trainer.recipe.preflight import records_problem

    cell = C.Cell(C.METHODS["topk-0.01"], 0, tmp_path / "topk-0.01" / "seed0")
    cell.dir.mkdir(parents=True)
    (cell.dir / "history.jsonl").write_text('{"step": 1}\n')
    argv = train_args("quickstart", cell, [])
    sets = [argv[i + 1] for i in range(2, len(argv), 2)]
    recipe = load_recipe("quickstart", sets)
    assert recipe.log.dir == str(cell.dir) and records_problem(recipe) is None
    assert records_problem(load_recipe("quickstart", sets + ["log.overwrite=false"])) is not None  # it can fail


def test_a_batch_the_world_size_cannot_split_is_refused_before_any_cell(tmp_path, capsys):
    """pytext-gpt's global batch 32 at 4 ranks x micro 16: one line and exit 2, not one failed launch per cell."""
    assert C.main(["--methods", "S-SGD", "--seeds", "0", "--world-size", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size: 32 is not divisible by world size x micro batch = 4 x 16" in err
    assert not list(tmp_path.iterdir())


def test_an_order_cell_that_skipped_part_of_its_epoch_is_named_not_reported():
    """The order's plan line (``DGrab.plan``, which the trainer prints) says how many shard examples an epoch leaves
    out; 0 is whole epochs (the line is printed then too), anything else, or a dropped odd step, is not the
    comparison the row claims. The lines are the order's own, so a change of its wording fails here."""
    from ds_ext.registry import ORDERS, load_builtin

    load_builtin()

    def plan_line(n_examples, steps):  # 2 ranks, 16 windows per microbatch, one microbatch per step
        return ORDERS.build("dgrab", {}, n_examples, 0, 2, 0).plan(16, 1, steps)[1]

    assert C.PARTIAL_EPOCH.search(plan_line(1920, 60)) is None  # this benchmark's whole epochs: 0 of 960 unused
    assert C.PARTIAL_EPOCH.search(plan_line(161768, 60))  # the capped first attempt: 79924 of 80884 unused
    assert C.PARTIAL_EPOCH.search(plan_line(1940, 60))  # 10 of 970
    assert C.PARTIAL_EPOCH.search(plan_line(96, 3)).group(0) == "the last step of every epoch is dropped"
