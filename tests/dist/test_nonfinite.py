"""A NaN or inf in one rank's gradient (2 gloo ranks through DeepSpeed), for every method.

Rank 1's input is multiplied by NaN (or inf) on optimizer step 3, so its gradient is non-finite
there. With ``nonfinite=skip`` (the default) every rank must: skip that step's parameter update
(parameters after step 3 equal those after step 2, bit for bit), keep identical parameters (methods
that average gradients every step), keep every reducer / synchronizer / order state tensor finite
(error feedback reset on a hit), and log the event with the step and the rank where the guard's view can
name it (``exchange`` / ``local`` / a microbatch screen; ``reduced`` data cannot: None). The same holds
when the value appears in what a method sends rather than in the gradient: an S-SGD bucket, a PowerSGD P or
Q factor, an ACP-SGD P buffer, top-k's sent values, signsgd's scales (of every bucket, or of one of five launched
during backward), ExDyna's residual. With the guard on, finite steps are bit-identical to the guard off. With
``nonfinite=raise`` every rank stops at step 3.
"""
import pytest
import torch

from tests.roster import exchanging_reducers

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
    # 5 buckets, each launched during backward (tests/dist/test_overlap.py)
    ("signsgd-buckets", {"reducer": {"name": "signsgd", "bucket_mb": 0.01, "first_bucket_mb": 0.001}}, None, "fp32", 1),
    ("dgrab", {"reducer": {"name": "allreduce"}}, "dgrab", "fp32", 2),
    ("cdgrab", {"reducer": "cdgrab"}, "cdgrab", "fp32", 2),
    ("bf16", {"reducer": {"name": "allreduce"}}, None, "bf16", 1),
    # under ZeRO the guard screens before the method, and the skipped step still runs ZeRO's all-gather
    ("powersgd-zero1", {"reducer": {"name": "powersgd", "matrix_approximation_rank": 2, "start_powerSGD_iter": 2}},
     None, "fp32", 1, 1),
    ("topk-zero2", {"reducer": {"name": "topk", "density": 0.05}}, None, "bf16", 2, 2),
    ("cdgrab-zero1", {"reducer": "cdgrab"}, "cdgrab", "fp32", 2, 1),
]
# every other reducer with its own exchange (the registry's, tests/roster.py) once, with its defaults
SYNCED += [(n, {"reducer": {"name": n}}, None, "fp32", 1) for n in exchanging_reducers()
           if n not in {case[0] for case in SYNCED}]
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
    assert r0["events"] == r1["events"] == [(3, _named(r0))]


def _named(r):
    """The ranks the event names: rank 1, unless only the reduced data (identical on every rank) showed it."""
    return None if r["view"] == "reduced" and not r["microbatches"] else [1]


SENT = [  # (label, method, where): the value appears in what the method sends, not in the gradient
    ("bucket", {"reducer": {"name": "allreduce", "bucket_mb": 0.002}}, "bucket"),
    ("powersgd-p", SYNCED[2][1], "p"),
    ("powersgd-q", SYNCED[2][1], "q"),
    ("acpsgd-p", SYNCED[3][1], "acp"),
    ("topk-values", SYNCED[4][1], "topk_values"),
    ("signsgd-scales", SYNCED[6][1], "sign_scales"),
    ("signsgd-bucket", SYNCED[7][1], "sign_bucket"),  # only one bucket of five holds it
    ("exdyna-residual", SYNCED[5][1], "residual"),
]


@pytest.mark.parametrize("label,method,where", SENT, ids=[c[0] for c in SENT])
def test_nan_in_what_a_method_sends_skips_the_step_everywhere(label, method, where):
    gas = 2 if where == "acp" else 1
    res = harness.run_pooled(wn.inject, 2, cases=[(label, method, None, "fp32", gas)], where=where)
    r0, r1 = res[0][label], res[1][label]
    assert r0["error"] is None and r1["error"] is None
    for a, b in zip(r0["record"], r1["record"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    assert torch.equal(r0["record"][2], r0["record"][1])  # step 3 applied nothing
    assert not torch.equal(r0["record"][3], r0["record"][2])
    assert r0["finite_state"] and r1["finite_state"]  # P / Q / E / residual reset on the hit
    assert r0["events"] == r1["events"] == [(3, _named(r0))]


FINITE = [c for c in SYNCED if c[0] in ("allreduce", "powersgd", "acpsgd", "topk", "exdyna", "signsgd",
                                         "signsgd-buckets", "dgrab")]


def test_guard_on_is_bit_identical_to_guard_off_on_finite_data():
    on = harness.run_pooled(wn.inject, 2, cases=FINITE, bad_rank=-1, mode="skip")
    off = harness.run_pooled(wn.inject, 2, cases=FINITE, bad_rank=-1, mode="off")
    for label in (c[0] for c in FINITE):
        for r in (0, 1):
            assert on[r][label]["events"] == [] and on[r][label]["error"] is None
            assert len(on[r][label]["record"]) == 6
            for a, b in zip(on[r][label]["record"], off[r][label]["record"]):
                assert torch.equal(a, b), label


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
    assert r0["events"] == r1["events"] == [(3, None)]  # the all-reduced factors show it, not which rank
    assert torch.equal(r0["record"][2], r0["record"][1]) and torch.equal(r0["record"][-1], r1["record"][-1])
    assert r0["finite_state"] and r1["finite_state"]


def test_raise_mode_stops_every_rank():
    """(On a local step only the rank that saw it can know; it raises alone and its peers then fail at the
    next averaging, as for a dying rank: not exercised here.)"""
    res = harness.run_pooled(wn.inject, 2, cases=SYNCED[:1], mode="raise")
    for r in (0, 1):
        assert "step 3: non-finite gradient on a rank (seen in the reduced data" in res[r]["allreduce"]["error"]
        assert len(res[r]["allreduce"]["record"]) == 2


# ------------------------------------------------------------------ the step-hook contract (in-process)
def test_step_hooks_run_in_order_each_with_its_own_control_rows():
    """``Attachment.step`` runs its hooks [guard, vote, check] (+ a probe appended here) phase by phase; the
    probe posts its own vector and gets back exactly every rank's copy of it, behind the guard's flags and the
    vote's answer; a NaN on rank 1 makes the guard skip the update on both ranks, which the probe sees in
    ``wrap`` and ``after_step``."""
    from ds_ext.deepspeed.attach import Attachment
    from ds_ext.deepspeed.step_hooks import NonFiniteGuard, StepHook, StopVote, ConsistencyCheck, split_rows
    from ds_ext.meter import CommMeter
    from ds_ext.registry import REDUCERS, SYNCS
    from ds_ext.testing import LoopbackWorld, StandInEngine

    assert split_rows([[1, 0, 5, 6], [0, 0, 7, 8]], [torch.zeros(2), None, torch.zeros(2)]) == \
        [[[1, 0], [0, 0]], None, [[5, 6], [7, 8]]]
    assert split_rows(None, [None, None]) == [None, None]

    class Probe(StepHook):
        def __init__(self, comm, log):
            self.comm, self.log = comm, log

        def control(self, info):
            self.log.append("control")
            return self.comm.tensor([10 + self.comm.rank, 7], dtype=torch.int64)

        def before_step(self, info, rows):
            self.log.append(("before", rows))
            return False

        def wrap(self, step, info):
            self.log.append(("wrap", info.skip))
            return step

        def after_step(self, info):
            self.log.append(("after", info.steps, info.skip))

    def body(comm):
        module = torch.nn.Linear(3, 2)
        with torch.no_grad():  # the same on both ranks (threads share the global generator)
            module.weight.copy_(torch.arange(6.0).view(2, 3) / 10)
            module.bias.zero_()
        engine = StandInEngine(module, lr=0.5)
        named = list(module.named_parameters())
        att = Attachment(engine, REDUCERS.build("allreduce", {}, named, comm=comm, engine=engine),
                         SYNCS.build("none", {}, named, comm=comm), comm)
        assert [type(h) for h in att.hooks] == [NonFiniteGuard, StopVote, ConsistencyCheck]
        log = []
        att.hooks.append(Probe(comm, log))
        att.vote_stop(lambda: comm.rank == 0)
        before = [p.detach().clone() for p in module.parameters()]
        for step in range(2):
            x = torch.ones(4, 3) * (float("nan") if step == 1 and comm.rank == 1 else 1.0)
            module(x).sum().backward()
            engine.step()
        after = [p.detach().clone() for p in module.parameters()]
        return log, att.skipped_steps, att.stop_agreed, before, after, engine.global_steps

    results = LoopbackWorld(2).run(body, meters=[CommMeter(), CommMeter()])
    for log, skipped, agreed, before, after, global_steps in results:
        rows = [[10, 7], [11, 7]]
        assert log == ["control", ("before", rows), ("wrap", False), ("after", 1, False),
                       "control", ("before", rows), ("wrap", True), ("after", 2, True)], log
        assert skipped == 1 and agreed and global_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(results[0][4], results[1][4]))  # same parameters after the skip
