"""The pieces the non-finite guard (issue 29) relies on, in one process.

* ``any_nonfinite``: exact (NaN, +inf, -inf flagged in fp32 / bf16 / fp16, a finite tensor never; no
  tensors, empty tensors: False), one fused reduction.
* Why each method's view is what it is: ``topk_select`` returns a NaN / inf among the k values whenever the
  vector holds one (``torch.topk`` ranks NaN highest), ``sign_pack_segments``'s scale of a segment holding
  one is non-finite (the sign alone would hide it), and ``threshold_count`` never counts a NaN (so ExDyna's
  sent values need not show it: its ``exchange`` view), on the compiled kernels and on the torch code.
* ``reset_nonfinite``: PowerSGD's E back to zero and P / Q to the initial seeded factors; a flat reducer's
  residual to zero.
* Each reducer declares the view the guard reads (``nonfinite_view``).
"""
import pytest
import torch

from ds_ext import ops
from ds_ext.reducers.base import any_nonfinite
from tests.unit.test_ops import cpu_op, mode  # noqa: F401 -- the module fixture builds the CPU op once

BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_nonfinite_is_exact(dtype):
    ts = [torch.randn(5, 3).to(dtype), torch.randn(7).to(dtype), torch.zeros(0, dtype=dtype)]
    ts.append(torch.full((4,), torch.finfo(dtype).max, dtype=dtype))  # the largest finite value is finite
    assert not bool(any_nonfinite(ts))
    assert not bool(any_nonfinite([])) and not bool(any_nonfinite([torch.zeros(0)]))
    for v in BAD:
        for i in range(2):
            bad = [t.clone() for t in ts]
            bad[i].view(-1)[-1] = v
            assert bool(any_nonfinite(bad)), (v, i)
    mixed = [torch.randn(3), torch.randn(3).to(torch.bfloat16)]
    assert not bool(any_nonfinite(mixed))
    mixed[1][0] = float("nan")
    assert bool(any_nonfinite(mixed))


@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("v", BAD)
def test_what_the_sparse_and_sign_methods_send_shows_a_nonfinite_value(cpu_op, path, v):  # noqa: F811
    g = torch.randn(4097) * 1e-3
    g[1234] = v
    with mode(path):
        for k in (1, 5, 100):
            idx, vals = ops.topk_select(g, k)
            assert bool(any_nonfinite([vals])) and 1234 in idx.tolist()
        _, scales = ops.sign_pack_segments(g.clone(), [0, 1000, 2000, 4097], residual=g.clone())
        assert torch.isfinite(scales[[0, 2]]).all() and not torch.isfinite(scales[1])
        if v != v:  # NaN: never counted, never selected by a threshold
            assert int(ops.threshold_count(g, 0.0, 0, g.numel())) == g.numel() - 1


def test_reset_nonfinite_restores_initial_factors_and_zeroes_residuals():
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 4))
    named = list(model.named_parameters())
    for name, opts in (("powersgd", {"rank": 2, "start_powerSGD_iter": 0}), ("acpsgd", {"rank": 2})):
        fresh = REDUCERS.build(name, opts, named)
        red = REDUCERS.build(name, opts, named)
        model(torch.randn(3, 16)).sum().backward()
        for p in model.parameters():
            p.grad[0] = float("nan")
        red.finish()
        assert not all(torch.isfinite(t).all() for t in list(red.E.values()) + list(red.P.values()))
        red.reset_nonfinite()
        for attr in ("E", "P", "Q"):
            for k, t in getattr(red, attr).items():
                assert torch.equal(t, getattr(fresh, attr)[k]), (name, attr, k)
        model.zero_grad()
    for name in ("topk", "signsgd", "exdyna"):
        red = REDUCERS.build(name, {}, named)
        red.error.fill_(float("nan"))
        red.reset_nonfinite()
        assert torch.equal(red.error, torch.zeros_like(red.error))


def test_every_reducer_declares_what_the_guard_reads():
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    views = {n: getattr(REDUCERS.get(n).factory, "nonfinite_view", None) for n in REDUCERS.names()}
    assert set(views.values()) <= {"reduced", "exchange", "local"}, views
    assert views["allreduce"] == views["powersgd"] == views["acpsgd"] == views["topk"] == "reduced"
    assert views["signsgd"] == views["deepspeed"] == "reduced"
    assert views["exdyna"] == "exchange"  # a NaN never passes its threshold
