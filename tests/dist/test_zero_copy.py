"""Issue 19, item 3: ``allreduce``'s gradients are views into its fusion buckets (as DDP's
``gradient_as_bucket_view``), and the results are bit-identical to the copy path and to DeepSpeed's own
reduction."""
import pytest
import torch

from ds_ext.reducers.buckets import BucketedCollective, dense_strides
from tests import harness
from tests.dist import workers
from tests.dist import workers_zero_copy as W


def _views(coll, params):
    return [coll.is_view(p) for p in params]


def test_gradients_become_bucket_views_and_stay_there():
    """Single process, no collective: a fresh gradient is copied once and ``p.grad`` rebound into the
    bucket; after ``zero_grad(set_to_none=False)`` the next backward accumulates straight into the bucket
    (nothing copied, same storage); the copy path (``views=False``) gives the same bits."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    out = {}
    for views in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        model.load_state_dict(ref.state_dict())
        params = list(model.parameters())
        coll = BucketedCollective(params, 40 * 4, lambda buf: None, views=views)
        assert len(coll.buckets) > 1
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        log = []
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            model(x).square().sum().backward()
            for p in reversed(params):
                coll.ready(p)
            coll.flush()
            coll.wait_and_unpack()
            log.append((coll.copied, coll.in_place))
            assert all(_views(coll, params)) == views and any(_views(coll, params)) == views
            for p in params:
                b, i = coll.where[p]
                shares = p.grad.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr()
                assert shares == views
            opt.step()
            opt.zero_grad(set_to_none=False)
        n = len(params)
        assert log == ([(n, 0), (0, n), (0, n)] if views else [(n, 0)] * 3)
        out[views] = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.equal(out[True], out[False])


def test_layouts_existing_grads_and_missing_grads():
    """A channels-last parameter gets a view with its own strides; a parameter with gapped strides keeps
    the copy path; a gradient present at construction moves into the bucket; a parameter without a
    gradient gets its zero-filled slot; DeepSpeed's ``p.grad.detach_()`` works on the views."""
    cl = torch.nn.Parameter(torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    gapped = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    plain = torch.nn.Parameter(torch.randn(5))
    unused = torch.nn.Parameter(torch.randn(3))
    assert dense_strides(cl) == cl.stride() and dense_strides(gapped) is None
    plain.grad = torch.full((5,), 2.0)
    coll = BucketedCollective([cl, gapped, plain, unused], 1 << 20, lambda buf: None)
    assert coll.is_view(plain) and torch.equal(plain.grad, torch.full((5,), 2.0))
    (cl.sum() * 3 + gapped.sum() * 5).backward()
    for p in (cl, gapped):
        coll.ready(p)
    coll.flush()
    coll.wait_and_unpack()
    assert coll.is_view(cl) and cl.grad.stride() == cl.stride() and torch.equal(cl.grad, torch.full_like(cl, 3.0))
    assert not coll.is_view(gapped) and torch.equal(gapped.grad, torch.full((4, 3), 5.0))
    assert coll.is_view(unused) and torch.equal(unused.grad, torch.zeros(3))
    for p in (cl, plain, unused):
        p.grad.detach_()  # DeepSpeed's zero_grad(set_to_none=False); an autograd view would refuse it
        p.grad.zero_()
    assert coll.is_view(cl) and coll.is_view(plain)


CONFIGS = [("fp32", 1, 0), ("fp32", 2, 0), ("bf16", 2, 0), ("fp32", 2, 2)]


@pytest.fixture(scope="module")
def runs():
    """One 2-rank gloo run for the tests below (spawning ranks and building engines is most of the time)."""
    return harness.run_pooled(W.all_runs, 2, configs=CONFIGS, timeout=400)


def test_deepspeed_engine_bit_identical_and_optimizer_reads_bucket_views(runs):
    """2 gloo ranks through deepspeed.initialize, 2 KiB buckets (several per model): with views, with the
    copy path and with DeepSpeed's own reduction the parameters are bit-identical (fp32 and bf16,
    accumulation 1 and 2). At every optimizer step DeepSpeed's optimizer (torch's SGD, the bf16 wrapper,
    ZeRO 2's) reads gradients that ARE the buckets' storage. DeepSpeed sets every ``p.grad`` to None after
    its step, so each window's backward hands over fresh tensors: each is copied into its bucket once
    (none is copied back)."""
    res = [r["engine"] for r in runs]
    for precision, gas, zero in CONFIGS:
        key = (precision, gas, zero)
        for r in res:
            views = r[key + ("views",)]
            assert views["buckets"] > 1
            if not zero:
                copy = r[key + ("copy",)]
                assert torch.equal(views["params"], copy["params"]), key
                assert torch.equal(views["params"], r[key + ("deepspeed",)]["params"]), key
                assert len(copy["seen"]) == 4 and not any(s["any_view"] for s in copy["seen"]), key
            assert len(views["seen"]) == 4 and all(s["views"] for s in views["seen"]), (key, views["seen"])
            n = views["n"]
            assert views["counts"] == [(n, 0)] * 4, (key, views["counts"])
            assert views["after_step_none"]  # DeepSpeed's zero_grad: set to None
        assert torch.equal(res[0][key + ("views",)]["params"], res[1][key + ("views",)]["params"])
    assert not torch.equal(res[0][("fp32", 1, 0, "views")]["params"], workers.flat_params_of(workers.tiny_model()))


@pytest.mark.parametrize("set_to_none", [False, True])
def test_own_loop_keeps_views_and_copies_nothing(runs, set_to_none):
    """2 gloo ranks, ``allreduce`` driven as the engine drives it, accumulation 2, a torch optimizer. With
    ``zero_grad(set_to_none=False)`` the gradients stay bucket views from the first step on (same data
    pointers every step) and later windows copy nothing; with ``set_to_none=True`` every window copies
    each gradient once. Bit-identical to the copy path either way."""
    res = [r["own"][set_to_none] for r in runs]
    for r in res:
        v, c = r[True], r[False]
        n = v["n"]
        assert torch.equal(v["params"], c["params"])
        assert all(v["shared"]) and not any(c["shared"])
        assert c["counts"] == [(n, 0)] * 5
        if set_to_none:
            assert v["counts"] == [(n, 0)] * 5
        else:
            assert v["counts"] == [(n, 0)] + [(0, n)] * 4 and v["ptrs_stable"]
    assert torch.equal(res[0][True]["params"], res[1][True]["params"])


def test_bucket_views_hold_the_mean_when_backward_returns():
    """Issue 27 N10: with bucket views the buckets' all_reduces write into ``p.grad``; the reduction is
    completed at the end of the boundary backward (an autograd final callback, as DDP), so a read of
    ``p.grad`` between ``engine.backward`` and ``engine.step`` sees the exact mean, never in-flight data."""
    for exact in harness.run_pooled(W.grads_after_backward, 2):
        assert exact == [True, True, True], exact
