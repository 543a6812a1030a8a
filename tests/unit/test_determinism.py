"""Results that must not depend on the order in which additions happen (GPU audit findings 7 and 8).

On a GPU, atomic additions into one coordinate land in an unspecified order, so a sum of three or more
fp32 terms can differ bit for bit between ranks. The methods are built so that no addition races:

* ``topk``'s all_gather exchange scatters the gathered sets rank by rank, in rank order (indices are
  unique within a rank): every rank's applied gradient equals the rank-ordered reference, bit for bit,
  with 3 and 4 ranks and heavily overlapping indices (the torch fallback runs the same algorithm);
* CD-GraB's CountSketch sums each bucket by one reduction over a fixed gather table (no scatter).

The ranks here are a ``LoopbackWorld`` (ds_ext/comm.py); tests/dist/test_gpu.py runs the same methods on CUDA.
"""
import pytest
import torch

from ds_ext.testing import LoopbackWorld
from ds_ext.order.dgrab import CountSketch
from ds_ext.registry import REDUCERS

N = 4000


def _grad(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, generator=g) * 0.01
    x[:300] += torch.linspace(1, 3, 300) * (1 + 0.1 * rank) * (1 if rank % 2 else -1)  # shared top coordinates
    return x


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
def test_topk_allgather_equals_rank_ordered_reference(world, value_dtype):
    def fn(comm):
        p = torch.nn.Parameter(torch.zeros(N))
        red = REDUCERS.build("topk", {"density": 0.05, "value_dtype": value_dtype}, [("p", p)], comm=comm)
        p.grad = _grad(comm.rank)
        red.finish()
        return p.grad.clone(), red.last["indices"].clone()

    res = LoopbackWorld(world).run(fn)
    k = int(0.05 * N)
    dt = torch.float32 if value_dtype == "fp32" else torch.float16
    ref = torch.zeros(N)
    for r, (_, idx) in enumerate(res):  # rank order, one rank at a time
        assert idx.numel() == k and idx.unique().numel() == k
        ref.index_add_(0, idx, _grad(r)[idx].to(dt).float())
    ref /= world
    overlap = torch.bincount(torch.cat([i for _, i in res]), minlength=N)
    assert (overlap >= 3).sum() > 100  # the case the audit describes: 3+ ranks on one coordinate
    for applied, _ in res:
        assert torch.equal(applied, ref)


def test_count_sketch_is_a_fixed_reduction():
    """The projection equals the exact (float64) sketch within fp32 rounding, is the same bits on every
    call and for every row of a batch, and needs no scatter (its gather table covers every coordinate
    exactly once)."""
    d, k = 5003, 64
    cs = CountSketch(d, k, seed=3)
    used = cs.table[cs.signs != 0]  # padding: sign 0
    assert torch.equal(used.sort().values, torch.arange(d)) and set(cs.signs.unique().tolist()) == {-1.0, 0.0, 1.0}
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    y = cs(x)
    exact = (x.double()[:, cs.table] * cs.signs.double()).sum(-1)
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(cs(x), y) and torch.equal(cs(x[1]), y[1])
    cs.chunk = 3 * cs.table.shape[1] * 5  # five buckets per slice (issue 27 N8: a bounded temporary): same bits
    assert torch.equal(cs(x), y)
    # every rank projects the gathered rows alike
    outs = LoopbackWorld(3).run(lambda comm: CountSketch(d, k, seed=3)(comm.all_gather(x[comm.rank])))
    assert all(torch.equal(o, outs[0]) for o in outs) and torch.equal(outs[0], y)
