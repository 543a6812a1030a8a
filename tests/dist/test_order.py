"""Data orders: D-GraB / CD-GraB PairBalance invariants (ds_ext/order/dgrab.py), the engine hooks that
feed the sorter, CD-GraB as the reducer, and exact mid-epoch resume through the trainer."""

import pytest
import torch

from ds_ext.order.dgrab import DGrab, PairBalance, sign_by_inner, sign_by_norm
from ds_ext.order.rr import RandomReshuffling
from ds_ext.trainer.recipe import RecipeError, load_recipe
from tests import harness
from tests.dist import workers
from tests.dist import workers_order
from tests.harness import assert_tree_equal, load_ckpt
from tests.e2e.test_trainer import QUICK, argv


def is_perm(row, m):
    return sorted(row.tolist() if torch.is_tensor(row) else row) == list(range(m))


# ---- PairBalance, no communication ------------------------------------------------------------

def test_sign_tests_agree_ties_included():
    g = torch.Generator().manual_seed(0)
    cases = [(torch.zeros(3), torch.tensor([1., -2, 3])),  # s = 0: tie, "+" branch
             (torch.tensor([1., 0, 0]), torch.tensor([0., 5, 0])),  # orthogonal: tie
             (torch.tensor([1., 2, 0]), torch.tensor([-2., 1, 7])),  # orthogonal: tie
             (torch.tensor([1., 1, 0]), torch.tensor([1., 0, 0])),  # "-"
             (torch.tensor([1., 1, 0]), torch.tensor([-1., 0, 0]))]  # "+"
    cases += [(torch.randint(-3, 4, (4,), generator=g).float(), torch.randint(-3, 4, (4,), generator=g).float())
              for _ in range(300)]
    signs = [(sign_by_norm(s, v), sign_by_inner(s, v)) for s, v in cases]
    assert all(a == b for a, b in signs)
    assert [a for a, _ in signs[:5]] == [True, True, True, False, True]
    ties = sum(float(torch.dot(s, v)) == 0 for s, v in cases)
    assert ties >= 10  # the integer cases really exercise ties (13 with this seed)


def test_golden_tiny_case_by_hand():
    """n=2 workers, m=4, d=2; worked out by hand (module doc's loop, tie -> '+')."""
    pb = PairBalance(2, 4)
    # epoch 1, pair 0: w0 v=(1,0) <0,v>=0 '+' -> next[0]=[0,_,_,1], s=(1,0); w1 v=(0,1) <s,v>=0 '+' -> s=(1,1)
    pb.step(torch.tensor([[1., 0], [0, 1]]))
    # pair 1: w0 v=(1,1) <s,v>=2 '-': next[0,2]=2, next[0,1]=3, s=(0,0); w1 v=(-1,0) tie '+': next[1,1]=2, next[1,2]=3
    pb.step(torch.tensor([[1., 1], [-1, 0]]))
    assert pb.complete and pb.next_orders.tolist() == [[0, 3, 2, 1], [0, 2, 3, 1]]
    pb.sort()
    assert pb.orders.tolist() == [[0, 3, 2, 1], [0, 2, 3, 1]] and pb.run_sum is None
    # epoch 2 pairs are (orders[j,0], orders[j,1]), (orders[j,2], orders[j,3]) of the NEW table:
    # p0: w0 v=(0,-1) tie '+': next[0,0]=0, next[0,3]=3, s=(0,-1); w1 v=(2,0) <s,v>=0 '+': next[1,0]=0, next[1,3]=2, s=(2,-1)
    # p1: w0 v=(1,0) <s,v>=2 '-': next[0,2]=2, next[0,1]=1, s=(1,-1); w1 v=(0,1) <s,v>=-1 '+': next[1,1]=3, next[1,2]=1
    pb.step(torch.tensor([[0., -1], [2, 0]]))
    pb.step(torch.tensor([[1., 0], [0, 1]]))
    pb.sort()
    assert pb.orders.tolist() == [[0, 1, 2, 3], [0, 3, 1, 2]]


def test_pairbalance_permutations_pointers_and_state():
    g = torch.Generator().manual_seed(1)
    n, m, d = 3, 10, 4
    pb = PairBalance(n, m)
    for epoch in range(4):
        for p in range(m // 2):
            assert (pb.left, pb.right) == (p, m - 1 - p)
            pb.step(torch.randn(n, d, generator=g))
        assert pb.left == pb.right + 1 == m // 2
        st = pb.state_dict()
        pb.sort()
        assert all(is_perm(r, m) for r in pb.orders)
    assert not torch.equal(pb.orders, torch.arange(m).repeat(n, 1))
    q = PairBalance(n, m)
    q.load_state_dict(st)
    q.sort()
    assert torch.equal(q.orders, pb.orders)
    with pytest.raises(RuntimeError, match="epoch ended after 0 of m=10"):
        q.sort()


def test_odd_microbatches_refused_or_truncated_with_message():
    with pytest.raises(ValueError, match="even number of microbatches"):
        PairBalance(2, 7)
    o = DGrab(100, 0, 2, seed=0)  # shard 50
    steps, note = o.plan(micro_batch_size=4, grad_acc=3, steps_per_epoch=4)  # 12 microbatches: even
    assert steps == 4 and o.sorter.m == 12 and "2 of the 50 examples" in note and "odd" not in note
    o = DGrab(100, 0, 2, seed=0)
    steps, note = o.plan(micro_batch_size=2, grad_acc=3, steps_per_epoch=7)  # 21 microbatches: odd
    assert steps == 6 and o.sorter.m == 18
    assert "21 microbatches per epoch is odd" in note and "last step of every epoch is dropped" in note
    assert len(o.epoch_indices(0)) == 36 and o.epoch_indices(0) == o.shard[:36]  # epoch 0: identity
    with pytest.raises(ValueError, match="at least 2 microbatches"):
        DGrab(100, 0, 2, seed=0).plan(1, 1, 1)


def test_rr_and_sequential_unchanged():
    o = RandomReshuffling(103, 1, 2, seed=5)
    a, b = o.epoch_indices(0), o.epoch_indices(1)
    assert sorted(a) == sorted(b) == sorted(o.shard) and a != b and len(a) == 51
    assert o.plan(16, 2, 7) == (7, None) and not o.observes_gradients


def test_herding_bound_dgrab_below_drr():
    """m=1000, n=10, d=16, centred random unit vectors: D-GraB after 3 rounds < 0.3 x D-RR."""
    from benchmarks import herding

    res = herding.simulate(1000, 10, 16, rounds=3, trials=2, methods=("D-GraB", "D-RR"), threads=1)
    dg, rr = res["D-GraB"].mean(0), res["D-RR"].mean(0)
    assert dg[0] == rr[0]  # same start (identity order)
    assert dg[3] < 0.3 * rr[3], (dg, rr)
    assert rr[3] > 0.5 * rr[0]  # random reshuffling does not shrink the bound


def test_herding_kernels_match_numpy_reference():
    """The compiled D-GraB round equals a direct numpy transcription of the reference loop."""
    from benchmarks import herding

    z = herding.make_vectors(6, 3, 4, trial=1)
    perm = torch.arange(6).repeat(3, 1).numpy()
    _, nxt = herding.pair_round(z, z, perm, True)
    import numpy as np
    s, ref = np.zeros(4), np.empty((3, 6), np.int64)
    left, right = 0, 5
    for i in range(0, 6, 2):
        for j in range(3):
            v = z[i, j].astype(np.float64) - z[i + 1, j]
            if np.linalg.norm(s + v) <= np.linalg.norm(s - v):
                ref[j, left], ref[j, right] = i, i + 1
                s += v
            else:
                ref[j, right], ref[j, left] = i, i + 1
                s -= v
        left, right = left + 1, right - 1
    assert (nxt == ref).all()
    assert abs(herding.parallel_bound(z, perm) - np.abs(np.cumsum(z.sum(1), 0)).max()) < 1e-5


# ---- distributed (gloo ranks) -------------------------------------------------------------------

def test_tables_identical_on_all_ranks_even_with_a_different_rank():
    out = workers.loopback(workers_order.sorter_tables, 3, m=8, d=5, epochs=3, odd_rank=1)  # no DeepSpeed in it
    for e in range(3):
        t0 = out[0]["tables"][e]
        assert all(torch.equal(o["tables"][e], t0) for o in out)
        assert all(is_perm(r, 8) for r in t0)
        for r, o in enumerate(out):
            idx, local = o["local"][e]
            assert local == t0[r].tolist() and idx == [o["shard"][u] for u in local]
    assert not torch.equal(out[0]["tables"][2], out[0]["tables"][1])  # orders really change
    assert out[0]["bytes"] == 3 * 4 * 5 * 4  # 4 pairs per epoch x d=5 fp32, 3 epochs
    shards = [set(o["shard"]) for o in out]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])


@pytest.mark.parametrize("bucket_view", [True, False])
def test_engine_hooks_feed_microbatch_gradient_before_accumulation(bucket_view):
    """Through DeepSpeed (gas=2, per-example microbatches): what the order observes is exactly the
    change of p.grad over each backward, read right after autograd accumulated it (a post-accumulate hook
    ahead of the reducer's); tables agree on both ranks although rank 1's loss is scaled. With the copy path
    (``bucket_view: false``) p.grad keeps that local sum until ``engine.step()``, so the change is also seen
    after ``engine.backward``; with bucket views (the default) the boundary microbatch's p.grad holds the
    ranks' mean by then (the same on both ranks), and the order still sees the rank's own gradient."""
    out = harness.run_pooled(workers_order.engine_dgrab, 2, gas=2, epochs=3, scale_rank1=7.0,
                             options={"bucket_view": bucket_view})
    for o in out:
        assert len(o["observed"]) == len(o["deltas"]) == len(o["local"]) == 3 * 24
        for a, b in zip(o["observed"], o["local"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert all(x.abs().sum() > 0 for x in o["observed"])
        assert o["views"] == [bucket_view] * 3 * 12  # at every boundary, after engine.backward
        for a, b, last in zip(o["observed"], o["deltas"], o["boundary"]):
            if last and bucket_view:  # p.grad holds the mean: not this rank's gradient (rank 1's is 7 x)
                assert not torch.allclose(a, b, rtol=1e-3, atol=1e-5)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b, last in zip(out[0]["after"], out[1]["after"], out[0]["boundary"]):
        assert torch.equal(a, b) == (last and bucket_view)  # the mean, or each rank's own (different) sum
    for e in range(3):
        assert torch.equal(out[0]["tables"][e], out[1]["tables"][e])
        assert all(is_perm(r, 24) for r in out[0]["tables"][e])
    assert not torch.equal(out[0]["tables"][2], out[0]["tables"][0])
    assert torch.equal(out[0]["params"], out[1]["params"])


def test_cdgrab_applies_the_allreduce_mean():
    out = harness.run_pooled(workers_order.cdgrab_vs_allreduce, 2, gas=2, steps=6)
    for o in out:
        a, c = o["allreduce"], o["cdgrab"]
        assert len(a["grads"]) == len(c["grads"]) == 6
        for ga, gc in zip(a["grads"], c["grads"]):
            torch.testing.assert_close(gc, ga, rtol=1e-5, atol=1e-7)
        for pa, pc in zip(a["params"], c["params"]):
            torch.testing.assert_close(pc, pa, rtol=1e-5, atol=1e-6)
        d = a["grads"][0].numel()
        assert a["bytes"] == 6 * d * 4 and c["bytes"] == 12 * d * 4  # d per step vs d per microbatch
    assert torch.equal(out[0]["cdgrab"]["table"], out[1]["cdgrab"]["table"])
    assert all(is_perm(r, 12) for r in out[0]["cdgrab"]["table"])


def test_recipe_refuses_cdgrab_with_another_reducer():
    with pytest.raises(RecipeError, match="cannot be combined with reducer 'allreduce'"):
        load_recipe(QUICK, ["method.order={name: cdgrab}"])
    with pytest.raises(RecipeError, match="needs order 'cdgrab'"):
        load_recipe(QUICK, ["method.reducer={name: cdgrab}"])
    with pytest.raises(RecipeError, match="cannot be combined with sync 'dssync'"):
        load_recipe(QUICK, ["method.order={name: cdgrab}", "method.reducer={name: cdgrab}",
                            "method.sync={name: dssync, groups: 1, h: 4}"])
    r = load_recipe(QUICK, ["method.order={name: cdgrab, project_dim: 8}", "method.reducer={name: cdgrab}"])
    assert r.method_names()["order"] == "cdgrab"


RESUME = {
    # 2 ranks x micro 16 x gas 3: 44 units -> 14 steps (42 microbatches) per epoch; stop at step 5 =
    # 15 microbatches, so a half pair (the even gradient) is in the checkpoint
    "dgrab": (["method.order={name: dgrab}", "train.global_batch_size=96"], 5, 14),
    "dgrab_projected": (["method.order={name: dgrab, project_dim: 32}", "train.global_batch_size=96"], 19, 14),
    "cdgrab": (["method.order={name: cdgrab}", "method.reducer={name: cdgrab}"], 30, 22),
}
@pytest.mark.slow  # three trainer launches per case, ~70 s each on 2 cores: run with -m slow
@pytest.mark.parametrize("case", list(RESUME))
def test_resume_mid_epoch_same_orders_and_parameters(tmp_path, case):
    sets, k, spe = RESUME[case]
    a, b = tmp_path / "a", tmp_path / "b"
    extra = tuple(x for s in sets for x in ("--set", s))
    assert harness.run(workers.run_trainer, 2, argv=argv(a, *extra)) == [0, 0]
    assert harness.run(workers.run_trainer, 2, argv=argv(b, *extra, "--set", f"train.stop_at_step={k}")) == [0, 0]
    _, mid = load_ckpt(b, f"step_{k:07d}")
    assert mid[0]["order"]["epoch"] == k // spe and mid[0]["order"]["seen"] > 0
    if case == "dgrab":
        assert mid[0]["order"]["cache"] is not None and mid[0]["order"]["seen"] % 2 == 1
    assert harness.run(workers.run_trainer, 2, argv=argv(b, *extra, "--set", "checkpoint.resume=auto")) == [0, 0]
    tag = f"step_{2 * spe:07d}"
    sa, ra = load_ckpt(a, tag)
    sb, rb = load_ckpt(b, tag)
    assert_tree_equal(sa["module"], sb["module"], "module")
    assert_tree_equal(sa["optimizer"], sb["optimizer"], "optimizer")
    for x, y in zip(ra, rb):
        assert_tree_equal(x["order"], y["order"], "order")
        assert x["attachment"]["meter"] == y["attachment"]["meter"]
    sorter = ra[0]["order"]["sorter"]
    assert torch.equal(sorter["orders"], ra[1]["order"]["sorter"]["orders"])  # identical tables on both ranks
    assert all(is_perm(r, sorter["m"]) for r in sorter["next_orders"])  # the finished epoch's next table
    assert not torch.equal(sorter["orders"], torch.arange(sorter["m"]).repeat(2, 1))  # epoch 2's order is sorted


def test_order_contract_defaults_and_dgrab_traffic():
    """An order that overrides only ``epoch_indices`` binds with the one ``bind(comm, numel, device)`` and
    reports every declared default; D-GraB's ``collectives()`` (its pair-difference all_gather) is what the
    meter counts, and CD-GraB has none of its own."""
    import math

    from ds_ext.comm import Communicator
    from ds_ext.meter import CommMeter
    from ds_ext.order.base import Order
    from ds_ext.order.dgrab import CDGrab, DGrabOptions
    from ds_ext.testing import LoopbackWorld

    class Plain(Order):
        def epoch_indices(self, epoch):
            return list(self.shard)

    o = Plain(10, 0, 1, seed=0)
    o.bind(Communicator(device="cpu"), 12, None)
    assert not o.observes_gradients and not o.variable_units and o.remainder_note() is None
    assert o.stats() == {} and o.state_dict() == {} and Plain.collectives([(3, 4)], 2, None, grad_acc=2) == []
    o.load_state_dict({})
    assert o.plan(4, 1, 2) == (2, None)
    assert o.epoch_batches(0) == [o.shard[0:4], o.shard[4:8], o.shard[8:10]]

    steps, gas, shapes = 4, 2, [(2, 3), (5,)]
    d = sum(math.prod(s) for s in shapes)

    def body(comm):
        order = DGrab(steps * gas * 2, comm.rank, 2, seed=3)
        order.plan(1, gas, steps)
        order.bind(comm, d, "cpu")
        g = torch.Generator().manual_seed(comm.rank)
        for _ in range(steps * gas):
            order.observe_microbatch(torch.randn(d, generator=g))
        return comm.meter.by_kind["order_balance"]

    metered = LoopbackWorld(2).run(body, meters=[CommMeter(), CommMeter()])
    (c,) = DGrab.collectives(shapes, 2, DGrabOptions(), grad_acc=gas)
    assert c.op == "all_gather" and c.group == 2 and metered == [c.nbytes * c.calls * steps] * 2
    (k,) = DGrab.collectives(shapes, 2, DGrabOptions(project_dim=3), grad_acc=gas)
    assert k.nbytes == 4 * 3
    assert CDGrab.collectives(shapes, 2, DGrabOptions(), grad_acc=gas) == []
