"""Node-aware ("hierarchical") communication (ds_ext/hierarchy.py).

Method arithmetic on ``LoopbackWorld`` ranks (ds_ext/comm.py: threads in one process, sums in rank order):
4 ranks as 2 nodes x 2, each wrapped method against its flat reference over 2 "nodes" fed the exact node
means, bit for bit. One real-process run (4 gloo ranks through DeepSpeed, tests/harness.py) checks the
launcher variables, subgroups over gloo, the engine wiring and the meter against the cost model."""
from __future__ import annotations

import pytest
import torch

from ds_ext.testing import LoopbackWorld
from ds_ext.hierarchy import (HierarchicalAveraging, HierarchicalReducer, NodeCollective, build_hierarchical,
                              cross_node_bytes, hierarchical_collectives, inner_problem, intra_node_bytes)
from ds_ext.topology import Topology, balanced_shards, layout_problem, shard_params
from ds_ext.meter import CommMeter
from ds_ext.registry import REDUCERS, load_builtin
from tests import harness
from tests.dist import workers_hierarchy as W

load_builtin()
STEPS = 3
WORLD, LOCAL = 4, 2


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    """The torch code of ds_ext.ops (read at every call): no kernel build in a unit test; same results."""
    monkeypatch.setenv("DS_EXT_OPS", "torch")


# ------------------------------------------------------------------------------------------ layout, shards
def test_balanced_shards_largest_first_ties_low_order_kept():
    assert balanced_shards([10, 40, 30, 30, 5], 2) == [[0, 1, 4], [2, 3]]
    assert balanced_shards([4, 4, 4, 4], 2) == [[0, 2], [1, 3]]  # equal sizes: index order, ties to shard 0
    assert balanced_shards([7], 3) == [[0], [], []]
    named = W.named_zeros(W.SHAPES)
    assert shard_params(named, 2) == shard_params(W.SHAPES, 2) == shard_params([p for _, p in named], 2) \
        == [[0, 3], [1, 2, 4, 5, 6, 7, 8]]
    assert sorted(i for s in shard_params(W.SHAPES, 3) for i in s) == list(range(len(W.SHAPES)))


def test_topology_members_are_node_major():
    t = Topology.explicit(6, 8, 4)
    assert (t.node, t.local_rank, t.n_nodes) == (1, 2, 2)
    assert t.node_members() == [4, 5, 6, 7] and t.node_members(0) == [0, 1, 2, 3]
    assert t.cross_members() == [2, 6] and t.cross_members(0) == [0, 4]
    with pytest.raises(ValueError, match="not a multiple of 4 ranks per node"):
        Topology.explicit(0, 6, 4)


def _env(rank, ls=2, over=None):
    env = {"LOCAL_RANK": str(rank % ls), "LOCAL_SIZE": str(ls), "CROSS_RANK": str(rank // ls),
           "CROSS_SIZE": str(WORLD // ls)}
    for k, v in (over or {}).get(rank, {}).items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    return env


def _from_env(envs):
    """``Topology.from_env`` on every loopback rank: the topology or the error text, per rank."""
    def body(comm):
        try:
            return Topology.from_env(comm, env=envs[comm.rank])
        except ValueError as e:
            return str(e)
    return LoopbackWorld(len(envs)).run(body)


@pytest.mark.parametrize("envs,expected", [
    ([_env(r, over={3: {"LOCAL_SIZE": "3"}}) for r in range(4)],
     "hierarchical: rank 3 reports LOCAL_SIZE=3 but rank 0 reports 2; every node must run the same number of "
     "ranks (hostfile slots)"),
    ([_env(r, over={1: {"LOCAL_RANK": "0"}}) for r in range(4)],
     "hierarchical: rank 1 reports LOCAL_RANK=0, but ranks must be node-major"),
    ([{"LOCAL_RANK": str(r)} for r in range(4)],
     "hierarchical mode needs the deepspeed launcher's LOCAL_RANK/LOCAL_SIZE"),
    ([_env(r, ls=3) for r in range(4)], "hierarchical: world size 4 is not a multiple of LOCAL_SIZE=3"),
    ([_env(r, over={2: {"CROSS_RANK": "0"}}) for r in range(4)],
     "hierarchical: rank 2 reports CROSS_RANK=0 (its node index), but rank // LOCAL_SIZE = 1"),
    ([_env(r, over={0: {"LOCAL_SIZE": "two"}}) for r in range(4)],
     "hierarchical: LOCAL_SIZE on rank(s) 0 is not a non-negative integer"),
])
def test_topology_from_env_refuses_bad_layouts_on_every_rank(envs, expected):
    """One control exchange, one verdict: every rank raises the same one-line ValueError (none waits)."""
    msgs = _from_env(envs)
    assert all(m == msgs[0] for m in msgs) and isinstance(msgs[0], str), msgs
    assert msgs[0].startswith(expected) and "\n" not in msgs[0], msgs[0]


def test_topology_from_env_accepts_launcher_layout():
    tops = _from_env([_env(r) for r in range(4)])
    assert tops == [Topology.explicit(r, 4, 2) for r in range(4)]
    assert _from_env([{"LOCAL_RANK": str(r % 2), "LOCAL_SIZE": "2"} for r in range(4)])[3] == Topology(3, 4, 1, 1, 2, 2)
    assert layout_problem([[0, 1, -1, -1]], 1) is None
    torchrun = [{"LOCAL_RANK": str(r % 2), "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(r // 2)} for r in range(4)]
    assert _from_env(torchrun) == [Topology.explicit(r, 4, 2) for r in range(4)]  # torchrun's names


# ------------------------------------------------------------------------------ reducers vs the reference
METHODS = {
    "allreduce": ("allreduce", {"bucket_mb": 0.0003}),  # several buckets per shard
    "powersgd_ef": ("powersgd", {"rank": 2, "start_powerSGD_iter": 0}),
    "powersgd_noef": ("powersgd", {"rank": 2, "start_powerSGD_iter": 0, "error_feedback": False}),
    "topk": ("topk", {"density": 0.1}),
    "exdyna": ("exdyna", {"density": 0.1}),
    "acpsgd": ("acpsgd", {"rank": 2, "bucket_mb": 0.0003}),
    "signsgd": ("signsgd", {}),
}
DETERMINISTIC_BYTES = {"allreduce", "powersgd_ef", "powersgd_noef", "topk", "signsgd"}


@pytest.mark.parametrize("key", list(METHODS))
def test_hierarchical_equals_flat_method_over_node_means(key):
    """2 nodes x 2 ranks, 3 steps: every rank's applied gradient equals, bit for bit, the flat method run over
    2 ranks fed the exact node means, each shard its own method instance (tolerance 0: the same fp32
    operations on the same inputs, sums in the same order); all 4 ranks end identical; the inner state after
    3 steps (error feedback, factors, thresholds) is the reference's; the meter's node kinds and cross-node
    bytes are what the reference sent and (data-independent methods) what ``hierarchical_collectives`` says."""
    name, opts = METHODS[key]
    grads = W.rank_grads(WORLD, STEPS)
    hier = W.hier_loopback(name, opts, W.SHAPES, grads, LOCAL)
    ref = W.reference(name, opts, W.SHAPES, [W.node_means(g, LOCAL) for g in grads], LOCAL)
    shards = shard_params(W.SHAPES, LOCAL)
    numel = sum(p.numel() for _, p in W.named_zeros(W.SHAPES))
    slot = max(sum(torch.Size(W.SHAPES[i]).numel() for i in s) for s in shards)
    for r, rec in enumerate(hier):
        k, j = divmod(r, LOCAL)
        assert rec["local_rank"] == j and rec["shard"] == shards[j]
        for t in range(STEPS):
            for i in range(len(W.SHAPES)):
                got, want = rec["applied"][t][i], ref["applied"][k][t][i]
                assert got.dtype == want.dtype and torch.equal(got, want), (key, r, t, i)
                assert torch.equal(got, hier[0]["applied"][t][i]), (key, r, t, i)
        harness.assert_tree_equal(rec["state"], ref["state"][k][j], f"{key} rank {r} state")
        kinds = rec["by_kind"]
        assert kinds["node_mean"] == STEPS * 4 * numel and kinds["node_gather"] == STEPS * 4 * slot
        assert intra_node_bytes(CommMeter()) == 0
        m = CommMeter()
        m.by_kind.update(kinds)
        assert intra_node_bytes(m) == kinds["node_mean"] + kinds["node_gather"]
        assert cross_node_bytes(m) == sum(ref["bytes"][k][j].values()) > 0
        assert {kk: v for kk, v in kinds.items() if not kk.startswith("node_")} == ref["bytes"][k][j]
        if key in DETERMINISTIC_BYTES:
            entry = REDUCERS.get(name)
            pred = hierarchical_collectives(entry.factory, W.SHAPES, WORLD, LOCAL, REDUCERS.validated(name, opts),
                                            local_rank=j)
            assert [type(c) is NodeCollective for c in pred] == [True] + [False] * (len(pred) - 2) + [True]
            assert (pred[0].op, pred[0].group, pred[-1].op, pred[-1].group) == ("all_reduce", 2, "all_gather", 2)
            assert all(c.group == 2 for c in pred[1:-1])
            assert sum(c.nbytes * c.calls for c in pred) * STEPS == sum(kinds.values()), (key, r)
    if key in ("powersgd_ef", "topk", "exdyna"):  # error feedback persisted: the residual is not zero
        err = hier[0]["state"]["E"] if key == "powersgd_ef" else {0: hier[0]["state"]["error"]}
        assert any(v.abs().sum() > 0 for v in err.values())


@pytest.mark.parametrize("key", ["powersgd_ef", "topk"])
def test_bf16_gradients(key):
    """bf16 gradients: the node mean is summed in fp32 and rounded once to bf16 before the wrapped method
    reads it (the reference feeds it the fp32 node mean rounded to bf16); results bit-identical to the
    reference and across ranks, in bf16; the node gather (fp32) carries bf16 values losslessly."""
    name, opts = METHODS[key]
    grads = W.rank_grads(WORLD, STEPS, dtype=torch.bfloat16)
    hier = W.hier_loopback(name, opts, W.SHAPES, grads, LOCAL, dtype=torch.bfloat16)
    ref = W.reference(name, opts, W.SHAPES, [W.node_means(g, LOCAL) for g in grads], LOCAL, dtype=torch.bfloat16)
    for r, rec in enumerate(hier):
        for t in range(STEPS):
            for i in range(len(W.SHAPES)):
                got = rec["applied"][t][i]
                assert got.dtype == torch.bfloat16 and torch.equal(got, ref["applied"][r // 2][t][i]), (key, r, t, i)
                assert torch.isfinite(got).all()


@pytest.mark.parametrize("key", ["powersgd_ef", "topk", "allreduce"])
def test_one_rank_per_node_is_the_flat_method(key):
    """local_size 1: no node traffic, the wrapped method over the whole world, bit-identical to it (gradients
    and every meter kind) over 3 steps; ``grad_ready`` reaches the wrapped method during backward."""
    name, opts = METHODS[key]
    recs = W.hier_loopback(name, opts, W.SHAPES, W.rank_grads(WORLD, STEPS), 1, flat_too=True)
    for rec in recs:
        for t in range(STEPS):
            for a, b in zip(rec["applied"][t], rec["flat"][t]):
                assert torch.equal(a, b), (key, t)
        assert rec["by_kind"] == rec["flat_by_kind"] and "node_mean" not in rec["by_kind"]
    cls, o = REDUCERS.get(name).factory, REDUCERS.validated(name, opts)
    assert hierarchical_collectives(cls, W.SHAPES, WORLD, 1, o) == cls.collectives(W.SHAPES, WORLD, o)


def test_empty_shard_and_a_single_node():
    """Two nodes of 2 ranks, one parameter: local rank 1 owns nothing (no inner reducer, empty stats) but takes
    the class flags from ``inner_cls``; its node gather hands it local rank 0's result. One node of 2 ranks:
    nothing crosses a node, so the result is the exact node mean and no wrapped method is built."""
    from ds_ext.reducers.sparse import TopKReducer

    g = [torch.randn(40, generator=torch.Generator().manual_seed(r)) for r in range(4)]

    def run(world):
        def body(comm):
            named = W.named_zeros([(40,)])
            red = HierarchicalReducer(named, comm, Topology.explicit(comm.rank, world, 2),
                                      lambda sub, cross: REDUCERS.build("topk", {"density": 0.25}, sub, comm=cross),
                                      TopKReducer)
            named[0][1].grad = g[comm.rank].clone()
            red.grad_ready(named[0][1])
            red.finish()
            return (red.uses_kernels, red.replaces_engine_allreduce, red.inner is None, red.stats(),
                    named[0][1].grad.clone())
        return LoopbackWorld(world).run(body)

    a, b, c, d = run(4)
    assert a[:3] == (True, True, False) and b[:4] == (True, True, True, {})
    assert a[3]["k"] == 10 and torch.equal(a[4], b[4]) and torch.equal(a[4], c[4]) and torch.equal(c[4], d[4])
    assert 10 <= int((a[4] != 0).sum()) <= 20  # the union of the two nodes' top 10
    a, b = run(2)
    mean = (g[0] + g[1]) / 2
    assert a[2] and b[2] and a[3] == b[3] == {}
    assert torch.equal(a[4], mean) and torch.equal(b[4], mean)
    assert [c.op for c in hierarchical_collectives(TopKReducer, [(40,)], 2, 2, TopKReducer.Options())] == ["all_reduce"]
    with pytest.raises(ValueError, match="needs inner_cls"):
        HierarchicalReducer.collectives([(40,)], 2, None, local_size=2)


def test_refused_inner_methods_and_failed_builds_stop_every_rank():
    for name in ("deepspeed", "none", "cdgrab"):
        assert inner_problem(REDUCERS.get(name).factory).startswith("hierarchical: ")
    # exdyna needs at least one element per node: the one-element shard of local rank 1 cannot be built there;
    # the other ranks learn it from the one control exchange at construction and stop too (nobody waits)
    shapes = [(100,), (1,)]

    def body(comm):
        try:
            build_hierarchical("exdyna", {}, W.named_zeros(shapes), comm, Topology.explicit(comm.rank, 4, 2))
        except ValueError as e:
            return str(e)
    msgs = LoopbackWorld(4).run(body)
    assert msgs[1] == msgs[3] == "exdyna: the gradient has 1 elements, fewer than the 2 ranks"
    assert msgs[0] == msgs[2] == ("hierarchical: building ExDynaReducer on the parameter shard of rank(s) 1, 3 "
                                  "failed (see that rank's error); every rank stops")


def test_state_round_trip_and_refusals():
    shapes = W.SHAPES

    def body(comm):
        r = comm.rank
        build = lambda ls, prefix="p": build_hierarchical(  # noqa: E731
            "powersgd", {"rank": 2, "start_powerSGD_iter": 0}, W.named_zeros(shapes, prefix), comm,
            Topology.explicit(r, 4, ls))
        a = build(2)
        for _, p in a.named_params:
            p.grad = torch.ones_like(p)
        a.finish()
        state = a.state_dict()
        b = build(2)
        b.load_state_dict(state)
        same = all(torch.equal(x, y) for x, y in zip(b.inner.E.values(), a.inner.E.values()))
        errors = []
        for other in (build(4), build(2, prefix="q")):
            try:
                other.load_state_dict(state)
            except ValueError as e:
                errors.append(str(e))
        return same, state, errors

    res = LoopbackWorld(4).run(body)
    for r, (same, state, errors) in enumerate(res):
        assert same and state["local_size"] == 2 and state["n_nodes"] == 2 and state["local_rank"] == r % 2
        assert errors[0] == ("hierarchical reducer state was saved with 2 ranks per node on 2 node(s), this run has 4 "
                             "on 1: shards and error feedback are per rank, resume with the same hostfile layout")
        assert errors[1].startswith(f"hierarchical reducer state of rank {r} is for a parameter shard of ")
        assert all("\n" not in e for e in errors)


# ---------------------------------------------------------------------------------- Local SGD / QSR
def test_hierarchical_averaging_node_mean_and_sharded_cross_node_average():
    """Gradients: exact node mean (ranks of a node identical), a flag summed over the node in the same
    all_reduce. Parameters (+ one extra state tensor): each node's values averaged over the nodes, shard by
    shard, gathered in the node: every rank ends with (node 0 + node 1) / 2, bit for bit (average()'s
    arithmetic); the meter matches ``HierarchicalAveraging.collectives``."""
    from ds_ext.sync.averaging import LocalOptions

    shapes = W.SHAPES + [(3, 5)]
    grads = W.rank_grads(WORLD, 1, shapes)[0]
    node_vals = [[torch.randn(s, generator=torch.Generator().manual_seed(90 + 10 * k + i)) for i, s in
                  enumerate(shapes)] for k in range(2)]

    def body(comm):
        r = comm.rank
        meter = CommMeter()
        ha = HierarchicalAveraging(comm.with_meter(meter), Topology.explicit(r, 4, 2))
        params = [torch.nn.Parameter(v.clone()) for v in node_vals[r // 2][:-1]]
        extra = node_vals[r // 2][-1].clone()
        for p, g in zip(params, grads[r]):
            p.grad = g.clone()
        params[2].grad = None if r == 0 else params[2].grad  # a missing gradient counts as zeros
        flag = ha.node_gradient_mean(params, flag=torch.tensor(1.0 if r == 1 else 0.0))
        mean = [p.grad.clone() for p in params]
        ha.average_across_nodes([p.data for p in params] + [extra])
        return {"mean": mean, "flag": flag, "avg": [p.detach().clone() for p in params] + [extra],
                "by_kind": dict(meter.by_kind)}

    res = LoopbackWorld(4).run(body)
    grads[0][2] = torch.zeros(shapes[2])
    means = W.node_means(grads, 2)
    for r, rec in enumerate(res):
        k = r // 2
        assert all(torch.equal(a, b) for a, b in zip(rec["mean"], means[k][:-1]))
        assert rec["flag"].item() == (1.0 if k == 0 else 0.0)
        want = [(a.clone().add_(b)).div_(2) for a, b in zip(node_vals[0], node_vals[1])]
        assert all(torch.equal(a, b) for a, b in zip(rec["avg"], want)), r
        pred = HierarchicalAveraging.collectives(shapes[:-1], 4, 2, LocalOptions(h=4), local_rank=r % 2)
        assert [(c.op, c.group, type(c) is NodeCollective) for c in pred] == [
            ("all_reduce", 2, True), ("all_reduce", 2, False), ("all_gather", 2, True)]
        assert pred[1].calls == pred[2].calls == 0.25
        n_grad = sum(torch.Size(s).numel() for s in shapes[:-1])
        assert rec["by_kind"]["node_mean"] == pred[0].nbytes + 4 == 4 * (n_grad + 1)  # + the flag
        own = shard_params(shapes, 2)[r % 2]
        assert rec["by_kind"]["param_allreduce"] == 4 * sum(torch.Size(shapes[i]).numel() for i in own)
        assert rec["by_kind"]["node_gather"] == 4 * max(sum(torch.Size(shapes[i]).numel() for i in s)
                                                        for s in shard_params(shapes, 2))


# ------------------------------------------------------------------------------------ real processes
def test_real_processes_two_nodes_of_two():
    """4 gloo ranks through DeepSpeed as 2 nodes x 2 (LOCAL_SIZE/LOCAL_RANK/CROSS_* as the launcher sets
    them), powersgd (rank 2, error feedback, from step 1) and topk, 3 steps, driven by hand: all 4 ranks'
    parameters bit-identical after every step; the applied gradients equal, bit for bit, the reference
    computed here from every rank's local gradients (exact node means, then the flat method per shard over 2
    loopback ranks); node kinds nonzero; cross-node bytes = the wrapped method's ``collectives`` for the shard.
    Through ``ds_ext.attach`` with ``hierarchical: true`` in the reducer block."""
    runs = {"powersgd": ("powersgd", {"rank": 2, "start_powerSGD_iter": 0}), "topk": ("topk", {"density": 0.05})}
    res = harness.run_pooled(W.engine_run, WORLD, runs=runs, timeout=240)
    for key, (name, opts) in runs.items():
        recs = [r[key] for r in res]
        shapes = recs[0]["shapes"]
        locals_ = [[list(torch.split(rec_row, [torch.Size(s).numel() for s in shapes])) for rec_row in step]
                   for step in recs[0]["local"]]
        per_rank = [[[g.view(s) for g, s in zip(row, shapes)] for row in step] for step in locals_]
        ref = W.reference(name, opts, shapes, [W.node_means(step, LOCAL) for step in per_rank], LOCAL)
        for r, rec in enumerate(recs):
            assert rec["topology"] == Topology.explicit(r, 4, 2)
            assert all(torch.equal(a, b) for a, b in zip(rec["local"], recs[0]["local"]))
            for t in range(STEPS):
                assert torch.equal(rec["params"][t], recs[0]["params"][t]), (key, r, t)
                want = torch.cat([ref["applied"][r // 2][t][i].reshape(-1) for i in range(len(shapes))])
                assert torch.equal(rec["applied"][t], want), (key, r, t)
            kinds = rec["by_kind"]
            assert kinds["node_mean"] > 0 and kinds["node_gather"] > 0
            pred = rec["predicted"]
            cross = sum(nb for op, nb, g, cls in pred if cls != "NodeCollective")
            m = CommMeter()
            m.by_kind.update(kinds)
            assert cross_node_bytes(m) == STEPS * cross > 0, (key, r)
            # plus the engine's control data: every rank's non-finite flag (one int: the guard checks each rank's own
            # gradients in hierarchical mode) in a world-long fp32 slot vector, on the node mean and the node gather
            # (the control exchange, relayed: issue 27 N4)
            flags = 2 * (WORLD * 1 * 4)
            assert intra_node_bytes(m) == STEPS * (sum(nb for op, nb, g, cls in pred if cls == "NodeCollective") + flags)
        assert not torch.equal(recs[0]["params"][0], recs[0]["params"][-1])


def test_hierarchical_local_sgd_through_attach_skips_a_nan_node_wide():
    """Reducer none + sync local (h 2, hierarchical) on 2 nodes x 2: a NaN in rank 1's gradient on local step
    1 rides on the node's gradient mean, so ranks 0 and 1 both skip that step (neither waits for the other)
    and node 1 steps; the two ranks of a node agree after every step; after the averaging at step 2 every
    rank agrees; the meter shows the node mean every step and the sharded cross-node average."""
    res = harness.run_pooled(W.local_sgd_run, WORLD, timeout=180)
    p = [r["params"] for r in res]
    for t in range(4):
        assert torch.equal(p[0][t], p[1][t]) and torch.equal(p[2][t], p[3][t]), t  # nodes move together
    assert not torch.equal(p[0][0], p[2][0])  # step 1: node 0 skipped, node 1 stepped
    for t in (1, 3):  # averagings after steps 2 and 4
        assert all(torch.equal(p[r][t], p[0][t]) for r in range(4)), t
    assert not torch.equal(p[0][1], p[0][3]) and all(torch.isfinite(x).all() for x in p[0])
    assert res[0]["events"] == res[1]["events"] == [(1, [0, 1])] and res[2]["events"] == res[3]["events"] == []
    kinds = res[0]["by_kind"]
    assert kinds["node_mean"] > 0 and kinds["param_allreduce"] > 0 and kinds["node_gather"] > 0


def test_hierarchical_local_sgd_averages_batchnorm_statistics_over_every_rank():
    """Parameters agree inside a node, BatchNorm statistics do not (each rank's own data): with
    ``avg_buffers`` the statistics are averaged over all 4 ranks, the parameters across the 2 nodes."""
    from ds_ext.sync.averaging import LocalOptions, LocalSync

    def body(comm):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        node = comm.rank // 2
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float(node))  # identical inside a node
            module[1].running_mean.fill_(float(comm.rank))  # differ on every rank
        topo = Topology.explicit(comm.rank, 4, 2)
        sync = LocalSync(list(module.named_parameters()), LocalOptions(h=1, avg_buffers=True, hierarchical=True),
                         comm=comm, module=module, total_steps=4, hierarchy=HierarchicalAveraging(comm, topo))
        sync._average_now()
        return module[1].running_mean.clone(), module[0].weight.detach().clone()

    for mean, weight in LoopbackWorld(4).run(body):
        assert torch.equal(mean, torch.full((4,), 1.5)) and torch.equal(weight, torch.full((4, 3), 0.5))


# ------------------------------------------------------------------ ZeRO partitioned within the node
@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_zero_partitioned_within_the_node(stage):
    """4 gloo ranks as 2 nodes x 2, hierarchical acpsgd, ZeRO built with ``node_mpu``: ZeRO's group is the node
    (ranks 0-1, 2-3), each rank holds half the optimizer state of stage 0 (up to ZeRO's alignment padding; a quarter
    would mean partitioned over every rank), the parameters after every step equal hierarchical acpsgd at stage 0 bit for bit on every rank,
    ZeRO's all-gather is metered as intra-node (``node_zero_allgather``: none of its bytes counted as crossing
    nodes), only the first node writes DeepSpeed's checkpoint files (its save flags, also after ``detach``),
    after ``detach`` the engine's ``step`` refuses (its own reduction would average one node only), and
    attaching again trains on with ranks identical."""
    res = harness.run_pooled(W.zero_node_run, WORLD, stages=(stage,), timeout=300)
    for r, out in enumerate(res):
        zero, plain = out[stage], out[0]
        assert zero["group"] == Topology.explicit(r, WORLD, LOCAL).node_members()
        assert plain["opt_bytes"] > 0 and 0 <= zero["opt_bytes"] * 2 - plain["opt_bytes"] <= 2 * 4 * 16  # padding
        for t in range(STEPS):
            assert torch.equal(zero["params"][t], plain["params"][t]), (r, t)
            assert torch.equal(zero["params"][t], res[0][stage]["params"][t]), (r, t)
        assert not torch.equal(zero["params"][0], zero["params"][-1])
        kinds = zero["by_kind"]
        assert "zero_allgather" not in kinds and kinds["node_zero_allgather"] > 0
        m = CommMeter()
        m.by_kind.update(kinds)
        base = CommMeter()
        base.by_kind.update(plain["by_kind"])
        assert cross_node_bytes(m) == cross_node_bytes(base) > 0  # ZeRO adds nothing between nodes
        assert intra_node_bytes(m) == intra_node_bytes(base) + kinds["node_zero_allgather"]
        assert zero["saves"] == ((r == 0, True) if r < LOCAL else (False, False))
        if stage == 1:
            assert "partitioned within a node" in zero["after_detach"]
            assert zero["saves_after"] == zero["saves"]  # still partitioned: only node 0 writes DeepSpeed's files
            assert torch.equal(zero["reattached"], res[0][stage]["reattached"])  # attached again, ranks identical
            assert not torch.equal(zero["reattached"], zero["params"][-1])


@pytest.mark.slow
def test_resume_with_zero_partitioned_within_the_node_is_exact(tmp_path):
    """Through the trainer (``ds_ext.initialize`` builds ``node_mpu`` for a hierarchical reducer under ZeRO 1),
    4 ranks as 2 nodes x 2: a run resumed from its step-7 checkpoint ends at step 10 bit-identical to the run
    that went through (module, every rank's state, ZeRO's partitions). The checkpoint holds one ZeRO file
    per rank of a node (``zero_pp_rank_0``/``_1``: the first node's), which every node loaded."""
    from tests.harness import assert_tree_equal, load_ckpt
    from tests.e2e.test_resume_matrix import K, N, argv

    extra = ["deepspeed.zero_optimization.stage=1", "method.reducer={name: acpsgd, rank: 2, hierarchical: true}"]
    combo = ("acpsgd", "none", "rr")
    a, b = tmp_path / "a", tmp_path / "b"
    assert harness.run(W.run_trainer_as_nodes, WORLD, argv=argv(a, combo, *extra), timeout=400) == [0] * WORLD
    mid = a / "checkpoints" / f"step_{K:07d}"
    assert harness.run(W.run_trainer_as_nodes, WORLD, argv=argv(b, combo, *extra, f"checkpoint.resume={mid}"),
                       timeout=400) == [0] * WORLD
    tag = f"step_{N:07d}"
    sa, ra = load_ckpt(a, tag)
    sb, rb = load_ckpt(b, tag)
    assert_tree_equal(sa["module"], sb["module"], "module")
    for x, y in zip(ra, rb):
        assert_tree_equal(x, y, "rank state")
    names = sorted(f.name for f in (a / "checkpoints" / tag).iterdir() if f.name.startswith("zero_pp_rank_"))
    assert names == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(LOCAL)]
    for name in names:
        za, zb = (torch.load(d / "checkpoints" / tag / name, map_location="cpu", weights_only=False)
                  ["optimizer_state_dict"] for d in (a, b))
        assert_tree_equal(za["base_optimizer_state"], zb["base_optimizer_state"], name)
        assert_tree_equal(za["single_partition_of_fp32_groups"], zb["single_partition_of_fp32_groups"], name)
    assert ra[0]["attachment"]["meter"]["by_kind"]["node_zero_allgather"] > 0


@pytest.mark.parametrize("reducer,options,one_param", [("exdyna", {"density": 0.05}, False),
                                                       ("topk", {"density": 0.05}, True)])
def test_engine_control_rides_the_hierarchical_exchanges(reducer, options, one_param):
    """Issue 27 N4: the guard's flags and the stop vote, posted on the world communicator, reach every rank
    through the node mean, the wrapped method's cross-node exchange (ExDyna's counts) and the node gather: a
    NaN on one rank skips the step on all four, with ONE host read per step (was 2 for ExDyna: a second world
    exchange). ``one_param``: a rank without a shard gets the verdict from its node peer."""
    res = harness.run_pooled(W.control_relay_run, WORLD, reducer=reducer, options=options, one_param=one_param,
                             timeout=240)
    assert all(r["events"] == [(2, [3])] for r in res), [r["events"] for r in res]
    assert all(r["reads"] == [1, 1, 1] for r in res), [r["reads"] for r in res]
    assert [r["no_shard"] for r in res] == ([False, True, False, True] if one_param else [False] * 4)
    for t in range(3):
        assert all(torch.equal(r["params"][t], res[0]["params"][t]) for r in res), t
    assert torch.equal(res[0]["params"][0], res[0]["params"][1])  # step 2 skipped everywhere
