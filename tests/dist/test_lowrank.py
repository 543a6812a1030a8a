"""PowerSGD and ACP-SGD invariants (as stated in ds_ext/reducers/lowrank.py).

The method arithmetic runs on 2 simulated ranks of a ``LoopbackWorld`` (ds_ext/comm.py: threads in one
process; for 2 ranks its sums are gloo's, a + b); what is distributed -- bf16 training through DeepSpeed
on 2 gloo ranks, the ZeRO-1 refusal -- runs on real processes."""
import math

import pytest
import torch

from ds_ext.reducers.lowrank import ACPSGDReducer, ACPSGDOptions, orthogonalize
from tests import harness
from tests.dist import workers

SHAPES = workers.LOWRANK_SHAPES


@pytest.mark.parametrize("r,eps", [(1, 0.0), (4, 0.0), (3, 1e-8)])
def test_orthogonalize_gives_orthonormal_columns(r, eps):
    x = torch.randn(5, 20, r, generator=torch.Generator().manual_seed(r))
    q = orthogonalize(x, eps)
    eye = torch.eye(r).expand(5, r, r)
    assert torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-5)


def test_acpsgd_fusion_groups_cover_every_parameter_once():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(64, 32), (32,), (128, 64), (10, 3, 3, 3), (10,)]]
    red = ACPSGDReducer([(str(i), p) for i, p in enumerate(params)], ACPSGDOptions(rank=2, fusion_threshold_mb=0.01))
    for phase, groups in red.groups.items():
        flat = [m.index for g in groups for m in g]
        assert sorted(flat) == list(range(len(params)))
        assert flat == sorted(flat, reverse=True)  # reverse registration order
        assert len(groups) > 1
    assert [m.r for m in red.metas if m.compressed] == [2, 2, 2]


@pytest.fixture(scope="module")
def acp():
    return workers.loopback(workers.lowrank_invariants, 2, reducer="acpsgd", options={"rank": 2, "fusion_threshold_mb": 0.0005},
                       steps=6)


def test_acpsgd_ranks_agree_and_1d_exact(acp):
    a, b = acp
    for t in range(6):
        for i, s in enumerate(SHAPES):
            assert torch.equal(a["applied"][t][i], b["applied"][t][i]), (t, i)
            if len(s) == 1:
                assert torch.allclose(a["applied"][t][i], a["mean"][t][i], atol=1e-7, rtol=0)
        for k in a["P"][t]:
            assert torch.equal(a["P"][t][k], b["P"][t][k]) and torch.equal(a["Q"][t][k], b["Q"][t][k])


def test_acpsgd_error_feedback_conservation(acp):
    """sum_t applied_t + mean_r E_r,T == sum_t mean_r M_r,t (non-square shapes included)."""
    a, b = acp
    for i, s in enumerate(SHAPES):
        if not a["compressed"][i]:
            continue
        applied = sum(a["applied"][t][i] for t in range(6)).reshape(s[0], -1)
        truth = sum(a["mean"][t][i] for t in range(6)).reshape(s[0], -1)
        mean_e = (a["E"][i] + b["E"][i]) / 2
        assert torch.allclose(applied + mean_e, truth, atol=1e-5), (i, (applied + mean_e - truth).abs().max())


def test_acpsgd_alternates_and_counts_bytes(acp):
    a, _ = acp
    one_d = sum(math.prod(s) for s in SHAPES if len(s) == 1)
    p_elems = sum(s[0] * r for s, r, c in zip(SHAPES, a["r"], a["compressed"]) if c)
    q_elems = sum((math.prod(s) // s[0]) * r for s, r, c in zip(SHAPES, a["r"], a["compressed"]) if c)
    assert p_elems != q_elems
    assert a["bytes"] == [4 * (p_elems + one_d), 4 * (q_elems + one_d)] * 3


def test_acpsgd_mismatched_seeds_disagree():
    a, b = workers.loopback(workers.lowrank_invariants, 2, reducer="acpsgd", options={"rank": 2}, steps=2,
                       seed_per_rank=True)
    assert not torch.equal(a["applied"][0][0], b["applied"][0][0])


def test_powersgd_full_rank_is_exact_and_counts_bytes():
    opts = {"matrix_approximation_rank": 16, "min_compression_rate": 0, "start_powerSGD_iter": 1}
    a, b = workers.loopback(workers.lowrank_invariants, 2, reducer="powersgd", options=opts, steps=4)
    for t in range(4):
        for i in range(len(SHAPES)):
            assert torch.equal(a["applied"][t][i], b["applied"][t][i])
            assert torch.allclose(a["applied"][t][i], a["mean"][t][i], atol=1e-5), (t, i)
    total = sum(math.prod(s) for s in SHAPES)
    one_d = sum(math.prod(s) for s in SHAPES if len(s) == 1)
    pq = sum((s[0] + math.prod(s) // s[0]) * r for s, r, c in zip(SHAPES, a["r"], a["compressed"]) if c)
    assert a["bytes"][0] == 4 * total  # start_powerSGD_iter=1: plain allreduce first
    assert a["bytes"][1:] == [4 * (pq + one_d)] * 3


@pytest.mark.parametrize("reducer,options", [("acpsgd", {"rank": 2}),
                                             ("powersgd", {"matrix_approximation_rank": 2, "start_powerSGD_iter": 0})])
def test_low_precision_gradients_match_fp32(reducer, options):
    """fp16 / bf16 gradients: factors and error feedback stay fp32, so the applied gradient is the fp32
    run's result (on the same rounded inputs) rounded once to the gradient dtype; ranks agree."""
    runs = {}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        runs[name] = dict(reducer=reducer, options=options, steps=4, dtype=dt, round_to=dt)
        runs[name + "_ref"] = dict(reducer=reducer, options=options, steps=4, dtype=torch.float32, round_to=dt)
    a, b = workers.loopback(workers.lowrank_dtypes, 2, runs=runs)
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        eps = torch.finfo(dt).eps
        for t in range(4):
            for i in range(len(SHAPES)):
                got, ref = a[name]["applied"][t][i], a[name + "_ref"]["applied"][t][i]
                assert got.dtype == dt and torch.equal(got, b[name]["applied"][t][i])
                assert torch.isfinite(got).all()
                assert torch.allclose(got.float(), ref, rtol=eps, atol=eps * ref.abs().max().item()), (name, t, i)


def test_bf16_engine_and_zero3_refusal():
    """Through DeepSpeed: bf16 training keeps ranks identical; a ZeRO-3 engine is refused with a reason."""
    for reducer in ("acpsgd", "powersgd"):
        a, b = harness.run_pooled(workers.per_step_params, 2, reducer=reducer, steps=4, precision="bf16",
                           options={"start_powerSGD_iter": 1} if reducer == "powersgd" else {})
        assert len(a["record"]) == 4 and all(torch.equal(x, y) for x, y in zip(a["record"], b["record"]))
        assert all(torch.isfinite(x).all() for x in a["record"]) and not torch.equal(a["record"][0], a["record"][-1])
    msg = harness.run_pooled(workers.zero3_refusal, 2, reducer="acpsgd")[0]
    assert msg is not None and "works with ZeRO stage 0, 1 or 2 (got 3)" in msg and "partitions the parameters" in msg


# ------------------------------------------------------------------ PowerSGD per fusion group (pipelined)
# repeated shapes, so a shape class (one batched E, P, Q) is split over several fusion groups: at 0.0006 MiB
# (157 fp32 elements) per group the 11 tensors form 7 groups, some holding rows of two classes or 1-D tensors
PIPE_SHAPES = [(16, 8), (16, 8), (6,), (16, 8), (4, 3, 3, 3), (5, 5), (4, 3, 3, 3), (7,), (16, 8), (1, 12), (5, 5)]
PIPE_CASES = {
    "rank2": {"rank": 2, "start_powerSGD_iter": 2},
    "rank1": {"rank": 1, "start_powerSGD_iter": 0},
    "cold_eps": {"rank": 3, "start_powerSGD_iter": 0, "warm_start": False, "orthogonalization_epsilon": 1e-8,
                 "min_compression_rate": 1},
    "no_ef": {"rank": 2, "start_powerSGD_iter": 1, "error_feedback": False, "min_compression_rate": 0},
}


@pytest.mark.parametrize("world", [2, 3])
def test_powersgd_pipelined_is_bit_identical_to_serial(world):
    """Per-group launches during backward give exactly the whole-model path's results (applied gradients, P, Q,
    E, bytes per step), on 2 ranks (a + b, as gloo) and 3 loopback ranks (sums in rank order): the same
    operations on the same inputs (ds_ext/reducers/powersgd_pipeline.py)."""
    runs = {}
    for name, opts in PIPE_CASES.items():
        for pipelined in (True, False):
            runs[(name, pipelined)] = dict(reducer="powersgd", steps=5, shapes=PIPE_SHAPES,
                                          options={**opts, "bucket_mb": 0.0006, "pipelined": pipelined})
    res = workers.loopback(workers.lowrank_dtypes, world, runs=runs)
    for name in PIPE_CASES:
        for rank_res in res:
            got, ref = rank_res[(name, True)], rank_res[(name, False)]
            assert got["bytes"] == ref["bytes"], name
            for t in range(5):
                for i in range(len(PIPE_SHAPES)):
                    assert torch.equal(got["applied"][t][i], ref["applied"][t][i]), (name, t, i)
                for k in ref["P"][t]:
                    assert torch.equal(got["P"][t][k], ref["P"][t][k]) and torch.equal(got["Q"][t][k], ref["Q"][t][k])
            for k in ref["E"]:
                assert torch.equal(got["E"][k], ref["E"][k]), (name, k)


def test_powersgd_groups_launch_during_grad_ready_in_order():
    """Group k's P all_reduce is issued by the grad_ready that completes group k, group k-1's Q right after it;
    only the last group's Q waits for finish(). Issue order P0 P1 Q0 P2 Q1 ... (``launch_order``); ranks agree."""
    from ds_ext.comm import observe
    from ds_ext.reducers.lowrank import PowerSGDOptions, PowerSGDReducer
    from ds_ext.reducers.powersgd_pipeline import launch_order

    def run(comm):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        red = PowerSGDReducer([(f"p{i}", p) for i, p in enumerate(params)],
                              PowerSGDOptions(rank=2, start_powerSGD_iter=0, bucket_mb=0.0002), comm=comm)
        g = torch.Generator().manual_seed(comm.rank)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        issued = []
        for p in reversed(params):
            red.grad_ready(p)
            issued.append(len(log.get(comm.rank, [])))
        red.finish()
        return issued, red

    log = {}

    def observer(comm, op, kind, t, async_op, issue):
        log.setdefault(comm.rank, []).append((kind, t.numel(), async_op))
        return issue()

    remove = observe(observer)
    try:
        res = workers.loopback(lambda rank, world, comm: run(comm), 2)
    finally:
        remove()
    assert log[0] == log[1]
    (issued, red), _ = res
    groups = red.pipeline.groups
    assert len(groups) >= 4 and all(async_op for _, _, async_op in log[0])
    expect = [("powersgd_" + ph, groups[k].p_total if ph == "p" else groups[k].q_total) for ph, k in
              launch_order([g.p_total for g in groups], [g.q_total for g in groups])]
    assert [(k, n) for k, n, _ in log[0]] == expect
    # every collective but the last Q was issued inside a grad_ready, the first one before the last gradient
    assert issued[-1] == len(expect) - 1 and issued[-2] >= 1
    shapes = [tuple(s) for s in SHAPES]
    p_bytes, q_bytes = PowerSGDReducer.group_bytes(shapes, red.options)
    assert p_bytes == [4 * g.p_total for g in groups] and q_bytes == [4 * g.q_total for g in groups]
    colls = PowerSGDReducer.collectives(shapes, 2, red.options)
    assert [c.nbytes for c in colls] == [4 * n for _, n, _ in log[0]]


@pytest.mark.parametrize("gas", [1, 2])
def test_powersgd_first_collective_before_backward_ends_on_gloo(gas):
    """Through DeepSpeed on 2 gloo ranks (1 and 2 micro-batches per step): the first all_reduce of each step (plain
    at step 1, P afterwards) is issued before the step's last grad_ready, and the pipelined run's parameters equal
    the serial run's bit for bit."""
    a, b = harness.run_pooled(workers.powersgd_launch_order, 2, steps=3, gas=gas)
    for res in (a, b):
        assert res[True]["groups"] >= 3
        for x, y in zip(res[True]["record"], res[False]["record"]):
            assert torch.equal(x, y)
        steps, cur = [], []
        for e in res[True]["events"]:
            if e == "finish":
                steps.append(cur)
                cur = []
            else:
                cur.append(e)
        assert len(steps) == 3
        for t, ev in enumerate(steps):
            first = "allreduce" if t == 0 else "powersgd_p"
            last_ready = max(i for i, e in enumerate(ev) if e == "ready")
            assert first in ev and ev.index(first) < last_ready, (t, ev)
    assert all(torch.equal(x, y) for x, y in zip(a[True]["record"], b[True]["record"]))
