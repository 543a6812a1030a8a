"""Issue 29, item 2: ``allreduce``'s buckets as DDP's. A first bucket of at most ``first_bucket_mb`` launched
first during backward, the buckets rebuilt after step 1 in the measured gradient-ready order (rank 0's, the
same on every rank), that order kept across a resume, gradients as bucket views by default, and parameters
bit-identical to the previous layout and copy path."""
import random

import pytest
import torch

from ds_ext.comm import Communicator
from ds_ext.costmodel import model as cm
from ds_ext.costmodel import overlap as ov
from ds_ext.costmodel import presets as ps
from ds_ext.reducers.allreduce import AllreduceOptions, AllreduceReducer
from ds_ext.reducers.buckets import BucketedCollective, build_buckets, fuse_ordered, fuse_reverse
from tests import harness
from tests.dist import workers_buckets as W

MIB = 2**20


def test_first_bucket_rule_on_resnet50_and_the_cost_model():
    """ResNet-50 (fp32): ``fc.bias`` alone (4 KB <= 1 MiB), ``fc.weight`` (8.2 MB) alone, then 25 MiB buckets.
    The reducer's ``collectives`` and the cost model's schedule follow the same layout."""
    shapes = [tuple(s) for s in cm.model_shapes("resnet50")]
    sizes = [4 * cm.numel_of(s) for s in shapes]
    n = len(sizes)
    groups = fuse_ordered(sizes, 25 * MIB, 1 * MIB)
    assert groups[0] == [n - 1] and groups[1] == [n - 2] and sizes[n - 2] > MIB
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert all(sum(sizes[i] for i in g) <= 25 * MIB or len(g) == 1 for g in groups[2:])
    assert [i for g in groups for i in g] == list(reversed(range(n)))
    assert groups != fuse_reverse(sizes, 25 * MIB)  # the old rule put fc and layer4's tail in one 26 MB bucket
    assert sum(sizes[i] for i in fuse_reverse(sizes, 25 * MIB)[0]) > 25e6
    colls = AllreduceReducer.collectives(shapes, 2, AllreduceOptions())
    assert [c.nbytes for c in colls] == [sum(sizes[i] for i in g) for g in groups] == cm.bucket_sizes(shapes, 25)
    assert colls[0].nbytes <= MIB
    (_, launches, _), = ov.backward_schedule("allreduce", shapes, 4, ps.MethodOptions())
    assert [la.members for la in launches] == groups


def test_fuse_ordered_without_first_cap_is_the_old_rule():
    rng = random.Random(3)
    for _ in range(200):
        sizes = [rng.randint(1, 50) for _ in range(rng.randint(0, 12))]
        cap = rng.randint(10, 80)
        assert fuse_ordered(sizes, cap) == fuse_reverse(sizes, cap)
        assert fuse_ordered(sizes, cap, first_cap=10 * cap) == fuse_reverse(sizes, cap)  # min(first, cap)
        g = fuse_ordered(sizes, cap, first_cap=cap // 4)
        if g:
            assert sum(sizes[i] for i in g[0]) <= cap // 4 or len(g[0]) == 1
        params = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
        order = list(range(len(sizes)))
        rng.shuffle(order)
        pos = {id(p): k for k, p in enumerate(params)}
        got = [[pos[id(p)] for p in b.params] for b in build_buckets(params, 4 * cap, 4 * (cap // 4), order)]
        assert got == fuse_ordered(sizes, cap, cap // 4, order)


def test_first_bucket_launched_first_during_backward():
    """One process: the first bucket (``fc``-like bias, <= 1 MiB) launches after the first gradient is ready,
    the 2 MiB weight next, alone, both before backward has produced every gradient; with one 25 MiB cap (the
    old rule) everything would wait for the last gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1024))
    red = AllreduceReducer(list(model.named_parameters()), AllreduceOptions(), comm=Communicator(device="cpu"))
    fusion = red.fusion
    ready, launches = [0], []
    orig = fusion.launch_fn

    def spy(buf):
        launches.append((next(i for i, b in enumerate(fusion.buckets) if b.buffer is buf), buf.numel() * 4, ready[0]))
        return orig(buf)

    fusion.launch_fn = spy

    def hook(p):
        ready[0] += 1
        red.grad_ready(p)

    for p in red.params:
        p.register_post_accumulate_grad_hook(hook)
    model(torch.randn(4, 256)).square().sum().backward()
    w2 = 512 * 1024 * 4
    assert launches[0] == (0, 1024 * 4, 1)  # fc bias alone, right after the first gradient
    assert launches[1] == (1, w2, 2)  # the 2 MiB weight alone, next
    assert [i for i, _, _ in launches] == [0, 1, 2] and launches[2][2] == 4
    assert all(p.grad is not None and red.fusion.is_view(p) for p in red.params)  # views by default


def test_rebuild_records_moves_views_and_round_trips_through_state():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 2, 4)]
    coll = BucketedCollective(params, 6 * 4, lambda buf: None, first_bytes=3 * 4)
    coll.record = True
    for k, p in enumerate(params):
        p.grad = torch.full_like(p, float(k + 1))
    for k in (1, 3, 0):  # param 2 never becomes ready: recorded last, by flush
        coll.ready(params[k])
    coll.flush()
    coll.wait_and_unpack()
    assert coll.ready_order == [1, 3, 0, 2]
    assert W.layout(coll) == [[3], [2], [1], [0]]
    coll.rebuild(coll.ready_order)
    assert W.layout(coll) == [[1], [3], [0, 2]]
    for k, p in enumerate(params):
        assert coll.is_view(p) and torch.equal(p.grad, torch.full_like(p, float(k + 1)))
    with pytest.raises(ValueError, match="permutation"):
        coll.rebuild([0, 1, 2])

    def reducer():
        return AllreduceReducer([(str(k), p) for k, p in enumerate(params)],
                                AllreduceOptions(bucket_mb=6 * 4 / MIB, first_bucket_mb=3 * 4 / MIB),
                                comm=Communicator(device="cpu"))
    a, b = reducer(), reducer()
    for k in (1, 3, 0, 2):
        a.grad_ready(params[k])  # outside backward: finish() completes (and rebuilds)
    a.finish()
    assert a.state_dict() == {"bucket_order": [1, 3, 0, 2]} and b.state_dict() == {"bucket_order": None}
    assert W.layout(b.fusion) != W.layout(a.fusion)
    b.load_state_dict(a.state_dict())
    assert W.layout(b.fusion) == W.layout(a.fusion) and not b.fusion.record


def test_rebuilt_order_identical_on_every_rank_and_resume_exact(tmp_path):
    """2 gloo ranks, real DeepSpeed engines, accumulation 2, a model whose gradient-ready order differs between
    the ranks. After step 1 both ranks hold rank 0's measured order (one broadcast in the run), launch the same
    buckets in the same order, and end bit-identical to the pre-issue-29 layout with the copy path. A run
    resumed from step 2 has the rebuilt layout right after the load and ends bit-identical."""
    out = harness.run_pooled(W.rebuild_runs, 2, ckpt=str(tmp_path), timeout=400)
    o0, o1 = out
    assert o0["measured"] != o1["measured"]  # autograd's order really differs between the ranks
    assert o0["initial"] == o1["initial"]
    assert o0["rebuilt"] == o1["rebuilt"] != o0["initial"]
    assert [i for b in o1["rebuilt"] for i in b] == o0["measured"]  # rank 0's order, on rank 1 too
    for o in out:
        assert o["broadcasts"] == [None]  # one control broadcast in 4 steps
        assert o["state"] == {"bucket_order": o0["measured"]} and o["views"] == [True] * 4
        assert o["first_bytes"] <= int(0.0005 * MIB) or len(o["rebuilt"][0]) == 1
        assert len(o["launches"]) == 4
        for step in o["launches"]:
            assert [i for i, _, _ in step] == list(range(len(step)))  # bucket 0 first, then in order
        assert o["loaded"] == o0["rebuilt"]  # restored from the checkpoint, before any step
        assert o["resumed_launches"] == o["launches"][2:]
        assert torch.equal(o["resumed_params"], o["params"])
        assert torch.equal(o["params"], o["old_params"])  # layout and views change no bit
    assert o0["launches"] == o1["launches"]
    assert [m for _, _, m in o0["launches"][0]] == o0["initial"]  # step 1: the first layout
    assert all([m for _, _, m in s] == o0["rebuilt"] for s in o0["launches"][1:])  # then the rebuilt one
    assert torch.equal(o0["params"], o1["params"])
