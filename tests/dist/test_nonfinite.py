"""A NaN or inf in one rank's gradient (2 gloo ranks through DeepSpeed), for every method.

Rank 1's input is multiplied by NaN (or inf) on optimizer step 3, so its gradient is non-finite
there. With ``nonfinite=skip`` (the default) every rank must: skip that step's parameter update
(parameters after step 3 equal those after step 2, bit for bit), keep identical parameters (methods
that average gradients every step), keep every reducer / synchronizer / order state tensor finite,
and log the event with the step and the rank. With ``nonfinite=raise`` every rank stops at step 3.
"""
import pytest
import torch

from tests import harness
from tests.dist import workers_nonfinite as wn

SYNCED = [  # (label, method, order, precision, gas): gradients averaged every step
    ("allreduce", {"reducer": {"name": "allreduce", "bucket_mb": 0.002}}, None, "fp32", 1),
    ("deepspeed", {"reducer": "deepspeed"}, None, "fp32", 1),
    ("powersgd", {"reducer": {"name": "powersgd", "matrix_approximation_rank": 2, "start_powerSGD_iter": 2}},
     None, "fp32", 1),
    ("acpsgd", {"reducer": {"name": "acpsgd", "rank": 2}}, None, "fp32", 2),
    ("topk", {"reducer": {"name": "topk", "density": 0.05}}, None, "fp32", 1),
    ("exdyna", {"reducer": {"name": "exdyna", "density": 0.05}}, None, "fp32", 1),
    ("signsgd", {"reducer": "signsgd"}, None, "fp32", 1),
    ("dgrab", {"reducer": {"name": "allreduce"}}, "dgrab", "fp32", 2),
    ("cdgrab", {"reducer": "cdgrab"}, "cdgrab", "fp32", 2),
    ("bf16", {"reducer": {"name": "allreduce"}}, None, "bf16", 1),
    # under ZeRO the guard screens before the method, and the skipped step still runs ZeRO's all-gather
    ("powersgd-zero1", {"reducer": {"name": "powersgd", "matrix_approximation_rank": 2, "start_powerSGD_iter": 2}},
     None, "fp32", 1, 1),
    ("topk-zero2", {"reducer": {"name": "topk", "density": 0.05}}, None, "bf16", 2, 2),
    ("cdgrab-zero1", {"reducer": "cdgrab"}, "cdgrab", "fp32", 2, 1),
]
LOCAL = [  # parameter averaging: step 3 is a local step (averaging after steps 2, 4, 6)
    ("local", {"reducer": "none", "sync": {"name": "local", "h": 2}}, None, "fp32", 1),
    ("dssync", {"reducer": "none", "sync": {"name": "dssync", "groups": 1, "h": 2}}, None, "fp32", 1),
]


@pytest.fixture(scope="module")
def nan_runs():
    return harness.run_pooled(wn.inject, 2, cases=SYNCED + LOCAL, timeout=600)


@pytest.mark.parametrize("label", [c[0] for c in SYNCED])
def test_nan_on_one_rank_skips_the_step_everywhere(nan_runs, label):
    r0, r1 = nan_runs[0][label], nan_runs[1][label]
    assert r0["error"] is None and r1["error"] is None
    assert len(r0["record"]) == len(r1["record"]) == 6
    for a, b in zip(r0["record"], r1["record"]):
        assert torch.equal(a, b)  # ranks never disagree
        assert torch.isfinite(a).all()
    assert torch.equal(r0["record"][2], r0["record"][1])  # step 3 applied nothing
    assert not torch.equal(r0["record"][3], r0["record"][2])  # training goes on afterwards
    assert r0["finite_state"] and r1["finite_state"]  # error feedback / order state not poisoned
    assert r0["events"] == r1["events"] == [(3, [1])]


@pytest.mark.parametrize("label", [c[0] for c in LOCAL])
def test_nan_on_a_local_step_is_skipped_on_that_rank(nan_runs, label):
    r0, r1 = nan_runs[0][label], nan_runs[1][label]
    assert r0["error"] is None and r1["error"] is None
    assert torch.equal(r1["record"][2], r1["record"][1])  # rank 1 skipped its local step 3
    assert not torch.equal(r0["record"][2], r0["record"][1])  # rank 0 stepped
    assert r1["events"] == [(3, [1])] and r0["events"] == []
    for step in (3, 5):  # after the averagings at steps 4 and 6 the ranks agree again, finite
        assert torch.equal(r0["record"][step], r1["record"][step])
        assert torch.isfinite(r0["record"][step]).all()
    assert r0["finite_state"] and r1["finite_state"]


def test_inf_is_handled_like_nan():
    res = harness.run_pooled(wn.inject, 2, cases=SYNCED[2:3], value=float("inf"))
    r0, r1 = res[0]["powersgd"], res[1]["powersgd"]
    assert r0["events"] == r1["events"] == [(3, [1])]
    assert torch.equal(r0["record"][2], r0["record"][1]) and torch.equal(r0["record"][-1], r1["record"][-1])
    assert r0["finite_state"] and r1["finite_state"]


def test_raise_mode_stops_every_rank():
    """(On a local step only the rank that saw it can know; it raises alone and its peers then fail at the
    next averaging, as for a dying rank: not exercised here.)"""
    res = harness.run_pooled(wn.inject, 2, cases=SYNCED[:1], mode="raise")
    for r in (0, 1):
        assert "step 3: non-finite gradient on rank(s) [1]" in res[r]["allreduce"]["error"]
        assert len(res[r]["allreduce"]["record"]) == 2
