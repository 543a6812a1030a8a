"""Local SGD / QSR periods and DS-Sync groups (ds_ext/sync/averaging.py, ds_ext/sync/schedules.py)."""
import math
from types import SimpleNamespace as NS

import pytest
import torch

from ds_ext.trainer.optim import LRSchedule
from ds_ext.trainer.recipe import RecipeError, load_recipe
from ds_ext.trainer.cli import schedule_main
from ds_ext.sync.averaging import LocalOptions
from ds_ext.sync.dssync import DSSyncOptions, default_patterns
from ds_ext.sync.schedules import QSR, Constant, PostLocal, simulate
from tests import harness
from tests.dist import workers, workers_sync
from tests.unit.test_recipe import QUICK


def test_qsr_formula_cases():
    q = QSR(alpha=0.0175, h_base=4, power=2)
    assert [q.next_h(100, lr) for lr in (0.008, 0.004, 0.001)] == [4, 19, 306]
    assert QSR(alpha=0.0, h_base=4, init_h=7).next_h(100, 0.001) == 7  # alpha 0: constant init_h


def test_qsr_warmup_and_clamp():
    q = QSR(alpha=0.0175, h_base=4, init_h=2, warmup_steps=50, total_steps=1000)
    assert q.first_h() == 2 and q.next_h(49, 1e-6) == 2  # inside warm-up: init_h whatever the lr
    assert q.next_h(50, 0.001) == 306
    assert q.next_h(900, 0.001) == 100  # clamped to the remaining steps
    assert q.next_h(999, 0.001) == 1


@pytest.mark.parametrize("period", [QSR(0.2, 2, total_steps=500, warmup_steps=30), Constant(7, total_steps=500),
                                    PostLocal(100, 8, total_steps=500)])
def test_rounds_tile_the_run(period):
    cfg = NS(name="cosine", warmup_steps=30, warmup_epochs=0, min_lr=0.0, epochs_for_schedule=None,
             decay_points=[], gamma=0.1)
    lr = LRSchedule(None, cfg, 0.1, 50, 10)
    rounds = simulate(period, lr.lr_at, 500)
    starts = [s for s, _, _ in rounds]
    assert starts[0] == 0 and all(h >= 1 for _, h, _ in rounds)
    assert all(a + h == b for (a, h, _), b in zip(rounds, starts[1:]))
    assert rounds[-1][0] + rounds[-1][1] == 500


def test_vit_b_cosine_schedule_has_9711_rounds():
    """The QSR seed's ViT-B recipe: 300 epochs x 312 steps, 10k warm-up from 1e-6 to 0.008, cosine,
    alpha 0.0175, H_base = init_h = 4, power 2."""
    cfg = NS(name="cosine", warmup_steps=10_000, warmup_epochs=0, min_lr=1e-6, epochs_for_schedule=None,
             decay_points=[], gamma=0.1)
    lr = LRSchedule(None, cfg, 0.008, 312, 300)
    rounds = simulate(QSR(0.0175, 4, 2, 4, warmup_steps=10_000, total_steps=93_600), lr.lr_at, 93_600)
    assert len(rounds) == 9711
    first_long = next(s for s, h, _ in rounds if h > 4)
    assert lr.lr_at(first_long) < 0.0175 / math.sqrt(5) <= lr.lr_at(first_long - 8)
    assert rounds[-1] == (85_458, 8_142, False)  # the last round is clamped to end at step 93,600


def test_schedule_cli_prints_the_cost(capsys):
    rc = schedule_main(["--recipe", str(QUICK), "--world-size", "2", "--set", "method.reducer={name: none}",
                         "--set", "method.sync={name: local, period: qsr, alpha: 0.2, h_base: 4}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "176 optimizer steps; 23 sync rounds; 13.07% of steps communicate" in out
    assert out.count("%") >= 11
    rc = schedule_main(["--recipe", str(QUICK), "--world-size", "2", "--csv", "--set", "method.reducer={name: none}",
                         "--set", "method.sync={name: local, period: constant, h: 8}"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "round,first_step,H,lr,data_parallel" and len(rows) == 1 + 22


@pytest.mark.parametrize("sets,needle", [
    (["method.sync={name: local, period: qsr}"], "period 'qsr' needs alpha"),
    (["method.sync={name: local, period: constant, alpha: 0.1}"], "alpha do(es) not apply to period 'constant'"),
    (["method.sync={name: local}"], "method.reducer must be 'none'"),
    (["method.reducer={name: none}", "method.sync={name: local, period: postlocal, switch_step: 10}"],
     "set method.reducer to 'allreduce'"),
    (["method.reducer={name: none}", "method.sync={name: local}", "deepspeed.bf16={enabled: true}"],
     "deepspeed.torch_autocast"),
    (["method.reducer={name: none}", "method.sync={name: dssync, grouping: sideways}"], "grouping"),
])
def test_sync_recipe_errors(sets, needle):
    args = []
    for s in sets:
        args.append(s)
    with pytest.raises(RecipeError) as e:
        load_recipe(QUICK, args)
    assert needle in str(e.value), str(e.value)


def test_options_defaults():
    assert LocalOptions().h == 4 and DSSyncOptions().h == 1 and DSSyncOptions().avg_buffers
    assert default_patterns(4, 2) == [[[0, 1], [2, 3]], [[0, 3], [1, 2]]]


# ---- distributed ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_adamw():
    sync = {"name": "local", "period": "constant", "h": 3}
    return harness.run_pooled(workers_sync.local_run, 2, sync=sync, optimizer="adamw", steps=7, lr=0.01)


def test_local_sync_points_agree_and_local_steps_are_silent(local_adamw):
    a, b = local_adamw
    assert a["comm"] == [False, False, True, False, False, True, True]  # H=3, last round clamped to 1 step
    for t in range(7):
        same = torch.equal(a["params"][t], b["params"][t])
        assert same == a["comm"][t], t  # identical right after a sync, different in between
        assert a["calls"][t] == (1 if a["comm"][t] else 0)  # one fused allreduce per sync, nothing else
    n = a["params"][0].numel()
    assert a["bytes"] == [4 * n if c else 0 for c in a["comm"]]
    # Adam moments are not averaged (avg_m / avg_v off): they differ between ranks
    assert not torch.equal(a["opt_state"][0]["exp_avg"], b["opt_state"][0]["exp_avg"])


def test_local_h1_plain_sgd_equals_synchronous_sgd():
    loc = harness.run_pooled(workers_sync.local_run, 2, sync={"name": "local", "period": "constant", "h": 1},
                      steps=5, momentum=0.0)
    ref = harness.run_pooled(workers_sync.local_run, 2, sync={"name": "none"}, reducer={"name": "allreduce"},
                      steps=5, momentum=0.0)
    for t in range(5):
        assert torch.allclose(loc[0]["params"][t], ref[0]["params"][t], atol=1e-6, rtol=0), t
        assert torch.equal(loc[0]["params"][t], loc[1]["params"][t])


def test_local_avg_m_averages_moments():
    a, b = harness.run_pooled(workers_sync.local_run, 2, sync={"name": "local", "period": "constant", "h": 2,
                                                        "avg_m": True, "avg_v": True},
                       optimizer="adamw", steps=4, lr=0.01)
    for sa, sb in zip(a["opt_state"], b["opt_state"]):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["bytes"][1] == 3 * 4 * a["params"][0].numel()  # params + m + v


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_avg_moments_after_a_rank_skipped_its_first_step(optimizer):
    """Issue 27 N2: a rank whose first step was skipped (NaN input) has no optimizer state while its peer
    has; the averaging still sends the same list on both ranks (gloo would abort with "Received data size
    doesn't match expected size"; NCCL would not check) and the ranks agree after every sync."""
    sync = {"name": "local", "period": "constant", "h": 1, "avg_m": True, "avg_v": optimizer == "adamw"}
    a, b = harness.run_pooled(workers_sync.local_run, 2, sync=sync, optimizer=optimizer, steps=3, lr=0.01,
                              nan_at=(1, 0))
    assert (a["skipped"], b["skipped"]) == (0, 1)  # a local step: rank 1 alone skips, rank 0 has moments
    assert a["bytes"] == b["bytes"] and a["calls"] == b["calls"]
    for t in range(3):
        assert torch.equal(a["params"][t], b["params"][t]), t
def test_postlocal_switches_from_gradient_to_parameter_averaging():
    a, b = harness.run_pooled(workers_sync.local_run, 2, sync={"name": "local", "period": "postlocal", "switch_step": 3,
                                                        "h": 2}, reducer={"name": "allreduce"}, steps=7)
    n = a["params"][0].numel()
    assert a["comm"] == [True] * 3 + [False, True, False, True]
    assert a["bytes"] == [4 * n] * 3 + [0, 4 * n, 0, 4 * n]  # gradients, then parameters every 2 steps
    assert all(torch.equal(x, y) for x, y in zip(a["params"][:3], b["params"][:3]))
    assert not torch.equal(a["params"][3], b["params"][3])


@pytest.fixture(scope="module")
def ds4():
    """DS-Sync's arithmetic on 4 loopback ranks (no DeepSpeed in it; real 4-rank subgroups:
    tests/dist/test_syncs.py and tests/dist/test_hierarchy.py)."""
    return {
        "patterns": workers.loopback(workers_sync.dssync_direct, 4, options={"groups": 2, "grouping": "patterns"},
                                     syncs=2),
        "shuffle": workers.loopback(workers_sync.dssync_direct, 4, options={"groups": 2, "seed": 3}, syncs=4,
                                    local_update=True),
        "g1": workers.loopback(workers_sync.dssync_direct, 4, options={"groups": 1}, syncs=1),
    }


def test_dssync_groups_partition_and_agree(ds4):
    for kind in ("patterns", "shuffle"):
        recs = ds4[kind]
        for t, groups in enumerate(recs[0]["groups"]):
            assert all(r["groups"][t] == groups for r in recs)  # identical on every rank
            assert sorted(x for g in groups for x in g) == [0, 1, 2, 3] and all(len(g) == 2 for g in groups)
    shuffles = [tuple(map(tuple, g)) for g in ds4["shuffle"][0]["groups"]]
    assert len(set(shuffles)) > 1  # it does reshuffle


def test_dssync_two_patterns_reach_the_global_mean(ds4):
    recs = ds4["patterns"]
    for i in range(2):
        mean = sum(r["start"][i] for r in recs) / 4
        for r in recs:
            assert torch.allclose(r["params"][1][i], mean, atol=1e-6)
        # after the first pattern only the group means agree, not the global one
        assert not torch.allclose(recs[0]["params"][0][i], mean, atol=1e-3)
    assert recs[0]["bytes"] == [4 * (15 + 4)] * 2


def test_dssync_preserves_the_sum_and_groups_average(ds4):
    recs = ds4["shuffle"]
    for t in range(4):
        before = [r["start"] if t == 0 else [p + 0.1 * (k + 1) for p in r["params"][t - 1]]
                  for k, r in enumerate(recs)]
        for i in range(2):
            total_before = sum(b[i] for b in before)
            total_after = sum(r["params"][t][i] for r in recs)
            assert torch.allclose(total_before, total_after, atol=1e-5)
            for g in recs[0]["groups"][t]:
                mean = sum(before[k][i] for k in g) / len(g)
                for k in g:
                    assert torch.allclose(recs[k]["params"][t][i], mean, atol=1e-6)


def test_dssync_one_group_is_global_averaging(ds4):
    recs = ds4["g1"]
    for i in range(2):
        mean = sum(r["start"][i] for r in recs) / 4
        assert all(torch.allclose(r["params"][0][i], mean, atol=1e-6) for r in recs)


def test_shipped_vit_recipe_schedule(capsys):
    """The recipe carrying the QSR seed's ViT-B hyper-parameters prints the 9,711-round schedule."""
    from tests.unit.test_recipe import ROOT

    rc = schedule_main(["--recipe", str(ROOT / "recipes" / "qsr-vit-b-localadamw.yaml"), "--world-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "93600 optimizer steps; 9711 sync rounds" in out
    assert out.strip().splitlines()[-1].split()[-1] == "8142"  # H of the last (clamped) round
