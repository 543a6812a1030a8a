"""The registries are the roster: every registered method is covered by the cost-model presets, the meter's kinds,
the fp16 policy and the parametrized method tests, without a hand-typed list anywhere. Adding a method without
them fails here (each check is shown to fail on a name the roster does not know)."""
from __future__ import annotations


import pytest
import torch

from ds_ext import meter
from ds_ext.costmodel import presets
from ds_ext.reducers.base import error_feedback_reducers, fp16_dynamic_refusal
from ds_ext.registry import ORDERS, REDUCERS, SYNCS, MethodView
from ds_ext.testing import LoopbackWorld
from tests import roster

FAMILIES = {"reducer": REDUCERS, "sync": SYNCS, "order": ORDERS}


def test_cost_model_presets_cover_every_registered_method():
    assert presets.uncovered() == []
    assert not presets.covers("reducer", "no-such-method")  # the check can fail


def _one_step(name: str):
    """``name`` with its default options on 2 loopback ranks, one gradient step; each rank's meter."""
    meters = [meter.CommMeter(), meter.CommMeter()]
    shapes = [(12, 10), (10,), (6, 4, 3, 3)]

    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        red = REDUCERS.build(name, {}, [(f"p{i}", p) for i, p in enumerate(params)], comm=comm)
        for p in reversed(params):
            red.grad_ready(p)
        red.finish()

    LoopbackWorld(2).run(body, meters=meters)
    return meters


@pytest.mark.parametrize("name", roster.exchanging_reducers())
def test_every_kind_a_reducer_meters_has_its_op_and_purpose(name, monkeypatch):
    monkeypatch.setenv("DS_EXT_OPS", "torch")
    m = _one_step(name)[0]
    assert m.by_kind, f"{name} sent nothing"
    for kind in m.by_kind:
        op = m.op_of(kind)
        assert op in ("all_reduce", "all_gather", "broadcast"), (name, kind, op)
        declared = meter.kind_of(kind)
        assert declared.op in (None, op), (kind, declared, op)  # a declared kind's op is the one it is sent with
        assert meter.purpose_of(kind)


def test_fp16_policy_names_exactly_the_reducers_that_carry_scaled_state():
    carrying = [n for n in REDUCERS.names() if REDUCERS.get(n).factory.keeps_scaled_state]
    assert error_feedback_reducers() == carrying
    message = fp16_dynamic_refusal("R")
    assert f"({', '.join(carrying)})" in message.replace("refused alike for ", "(")
    for n in REDUCERS.names():
        view = MethodView(names={"reducer": n, "sync": "none", "order": "rr"}, deepspeed={"fp16": {"enabled": True}})
        refused = any("error-feedback method" in msg for _, msg in view.problems())
        assert refused == (n in carrying), n


def test_parametrized_method_tests_walk_the_registry():
    from tests.dist import workers_commslogger, workers_syncs, workers_zero
    from tests.e2e import test_resume_matrix as matrix

    exchanging = set(roster.exchanging_reducers())
    assert set(workers_zero.REDUCERS) == exchanging
    assert set(workers_commslogger.REDUCERS) == exchanging | {"deepspeed"}
    for i, (family, reg) in enumerate(FAMILIES.items()):
        assert set((matrix.REDUCERS, matrix.SYNCS, matrix.ORDERS)[i]) == set(reg.names()), family
        # every registered method resumes in the matrix (the slow set; the fast set: one case per kind of state)
        assert {c[i] for c in matrix.ACCEPTED} == set(reg.names()), f"{family}s without a resume case"
    syncs_matrix = [workers_syncs.covers(s) for s in workers_syncs.scenarios_two_ranks().values()]
    for family, reg in FAMILIES.items():  # the sync counter's scenarios (tests/dist/test_syncs.py)
        assert {c[family] for c in syncs_matrix} == set(reg.names()), family
    assert "half" in exchanging and "allreduce" in exchanging and "none" not in exchanging  # the filter filters
