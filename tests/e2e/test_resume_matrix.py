"""Resumption matrix (issue 9, item 1): every reducer x synchronizer x order the recipe check accepts,
on the digits quickstart model, 2 gloo ranks through DeepSpeed.

Each case runs N = 10 optimizer steps straight (2 epochs of 5 steps, micro batch 16 x accumulation 2,
dropout on, so the RNG matters), saving a checkpoint at step K = 7: the middle of epoch 2, the middle
of a QSR round (H = 3: averagings after steps 3, 6, 9) and of a DS-Sync round (H = 4), right after an
ACP-SGD P-step (odd steps), and, with ``dgrab``, mid-epoch with the epoch-1 gradients already balanced
into the epoch-2 order. Then fresh processes load step 7 and run to step 10. Both step-10 checkpoints
must be bit-identical on CPU: DeepSpeed's module, optimizer and LR-schedule state and, per rank, the
reducer / synchronizer / order state, the communication meter, the RNG streams and the epoch position.
``test_saving_does_not_perturb_the_run`` adds the third run (10 steps, no save at 7) for one case, so
the reference is a run that never saved.

The fast default runs one case per kind of method state (``FAST``); the whole accepted matrix, which resumes
every reducer, synchronizer and order, runs with ``bash run/test.sh --slow`` (or ``-m slow``).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ds_ext.trainer.recipe import RecipeError, load_recipe
from tests import harness, roster
from tests.dist import workers
from tests.harness import assert_tree_equal, load_ckpt

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")
N, K, SPE = 10, 7, 5

#: recipe blocks with settings small enough for the quickstart model, where a method's defaults are not; every
#: registered method is in the matrix (tests/roster.py), one without an entry here with its defaults
SMALL = {
    "allreduce": "{name: allreduce, bucket_mb: 0.05}",
    "powersgd": "{name: powersgd, matrix_approximation_rank: 2, start_powerSGD_iter: 3}",
    "acpsgd": "{name: acpsgd, rank: 2, fusion_threshold_mb: 0.05}",
    "topk": "{name: topk, density: 0.01}",
    "exdyna": "{name: exdyna, density: 0.01}",
    "local": "{name: local, period: qsr, alpha: 0.005, h_base: 3}",
    "dssync": "{name: dssync, groups: 1, h: 4}",
}
REDUCERS = {n: SMALL.get(n, f"{{name: {n}}}") for n in roster.all_reducers()}
SYNCS = {n: SMALL.get(n, f"{{name: {n}}}") for n in roster.all_syncs()}
ORDERS = {n: SMALL.get(n, f"{{name: {n}}}") for n in roster.all_orders()}


def overrides(reducer: str, sync: str, order: str) -> list:
    return [f"method.reducer={REDUCERS[reducer]}", f"method.sync={SYNCS[sync]}", f"method.order={ORDERS[order]}"]


def accepted() -> list:
    """Every combination the recipe check (load + the world-size rules for 2 ranks) accepts."""
    out = []
    for combo in itertools.product(REDUCERS, SYNCS, ORDERS):
        try:
            load_recipe(QUICK, overrides(*combo)).check_world(2)
        except RecipeError:
            continue
        out.append(combo)
    return out


ACCEPTED = accepted()
#: the fast set: one case per kind of method state (bucketed S-SGD with D-RR; sparse error feedback and partitions
#: with a D-GraB order mid-epoch; CD-GraB; a QSR round; a DS-Sync round), about 14 s a case. Low-rank error feedback
#: (ACP-SGD's P/Q and residual) resumes in the fast tests/dist/test_zero.py::test_resume_under_zero_is_exact
#: [acpsgd, ZeRO-1] (the same argv and comparisons, plus ZeRO's partitioned optimizer state), so acpsgd-none-dgrab,
#: whose D-GraB order exdyna-none-dgrab and none-dssync-dgrab also resume mid-epoch, runs in the slow set. The slow
#: set (the whole accepted matrix) resumes every reducer, sync and order, a new one included
#: (``tests/unit/test_roster.py``); deepspeed, powersgd, acpsgd at stage 0, topk, signsgd, half and sequential run
#: there only.
FAST = [
    ("allreduce", "none", "rr"), ("exdyna", "none", "dgrab"),
    ("cdgrab", "none", "cdgrab"), ("none", "local", "rr"), ("none", "dssync", "dgrab"),
]
CASES = [pytest.param(c, id="-".join(c), marks=() if c in FAST else pytest.mark.slow) for c in ACCEPTED]


def argv(run_dir: Path, combo, *extra) -> list:
    sets = ["train.epochs=2", f"train.steps_per_epoch={SPE}", f"log.dir={run_dir}", "log.wandb.mode=disabled",
            "log.progress=false", "model.dropout=0.1", "checkpoint.every_epochs=0", f"checkpoint.every_steps={K}",
            "train.check_consistency_every=1", *overrides(*combo), *extra]
    return ["--recipe", QUICK] + [x for s in sets for x in ("--set", s)]


def assert_same_checkpoint(ca: Path, cb: Path, tag: str) -> None:
    """The step-``tag`` checkpoints of run directories ``ca`` and ``cb`` are bit-identical."""
    sa, ra = load_ckpt(ca, tag)
    sb, rb = load_ckpt(cb, tag)
    assert sa["global_steps"] == sb["global_steps"] == N
    for key in ("module", "optimizer", "lr_scheduler"):
        assert_tree_equal(sa[key], sb[key], key)
    for x, y in zip(ra, rb):  # reducer, sync, meter, order, rng, epoch position: everything per rank
        assert_tree_equal(x, y, "rank state")
        assert (x["epoch"], x["step_in_epoch"]) == (2, 0)


def test_matrix_is_what_the_check_accepts():
    names = {i: {c[i] for c in ACCEPTED} for i in range(3)}
    assert names[0] == set(REDUCERS) and names[1] == set(SYNCS) and names[2] == set(ORDERS)
    assert set(FAST) <= set(ACCEPTED)
    assert ("cdgrab", "none", "rr") not in ACCEPTED  # cdgrab is both reducer and order
    assert ("none", "none", "rr") not in ACCEPTED  # no communication at all


@pytest.mark.parametrize("combo", CASES)
def test_resume_is_bit_exact(tmp_path, combo):
    a, b = tmp_path / "a", tmp_path / "b"
    assert harness.run(workers.run_trainer, 2, argv=argv(a, combo)) == [0, 0]
    mid = a / "checkpoints" / f"step_{K:07d}"
    assert (mid / "meta.json").is_file()
    assert harness.run(workers.run_trainer, 2, argv=argv(b, combo, f"checkpoint.resume={mid}")) == [0, 0]
    assert not (b / "checkpoints" / f"step_{K:07d}").exists()  # b really started from a's step 7
    assert_same_checkpoint(a, b, f"step_{N:07d}")
    # not vacuous: the model moved between step 7 and step 10, and the saved state is mid-round / mid-epoch
    s7, r7 = load_ckpt(a, f"step_{K:07d}")
    s10, _ = load_ckpt(a, f"step_{N:07d}")
    assert not torch.equal(s7["module"]["0.weight"], s10["module"]["0.weight"])
    assert (r7[0]["epoch"], r7[0]["step_in_epoch"]) == (1, 2)
    reducer, sync, order = combo
    if sync != "none":
        assert r7[0]["attachment"]["sync"]["local_steps"] > 0
        # mid-round the ranks' parameters differ, so each rank's own are in its state (named, not a module dump)
        p0, p1 = r7[0]["attachment"]["sync"]["parameters"], r7[1]["attachment"]["sync"]["parameters"]
        assert p0 is not None and not torch.equal(p0[0], p1[0])
    if order in ("dgrab", "cdgrab"):
        assert r7[0]["order"]["epoch"] == 1 and r7[0]["order"]["seen"] > 0


@pytest.mark.slow
def test_saving_does_not_perturb_the_run(tmp_path):
    """The reference above saved at step 7; here a run that never saved gives the same step 10."""
    combo = ("none", "local", "dgrab")  # per-rank model + Adam-free local state + sorter state
    a, c = tmp_path / "a", tmp_path / "c"
    assert harness.run(workers.run_trainer, 2, argv=argv(a, combo)) == [0, 0]
    assert harness.run(workers.run_trainer, 2, argv=argv(c, combo, "checkpoint.every_steps=0",
                                                         "checkpoint.every_epochs=2")) == [0, 0]
    assert not (c / "checkpoints" / f"step_{K:07d}").exists()
    assert_same_checkpoint(a, c, f"step_{N:07d}")
