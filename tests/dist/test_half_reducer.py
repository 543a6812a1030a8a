"""Reducer ``half`` (ds_ext/reducers/half.py): PyTorch DDP's fp16/bf16 compress hooks as a ds_ext method.

Against the hook itself: 2 gloo ranks run ``fp16_compress_hook`` / ``bf16_compress_hook`` on their local
gradients and ``half`` on the same gradients; the results must be equal bit for bit (tolerance 0: with 2 ranks
the summation order cannot differ). Through DeepSpeed: an own loop with ``half`` attached saves, continues, and a
fresh engine that loads the checkpoint continues bit-identically; the meter counts 2 bytes per gradient element,
half of ``allreduce``'s, and equals ``collectives()``.
"""
from __future__ import annotations

import gc

import pytest
import torch

from ds_ext.meter import CommMeter
from ds_ext.registry import REDUCERS
from ds_ext.testing import LoopbackWorld
from tests import harness

SHAPES = [(33, 17), (17,), (5, 4, 3, 3), (10,)]


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    for p in params:  # magnitudes from 1e-4 to 1e2: exercises fp16's rounding, stays in its range
        p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-4, 3, p.shape, generator=g)
    return params


def _reduce(name: str, options: dict, params, comm) -> torch.Tensor:
    red = REDUCERS.build(name, options, [(f"p{i}", p) for i, p in enumerate(params)], comm=comm)
    for p in reversed(params):
        red.grad_ready(p)
    red.finish()
    return torch.cat([p.grad.reshape(-1) for p in params])


def _hook_worker(rank: int, world: int) -> dict:
    """Both dtypes: DDP's hook on the flat local gradients vs ``half`` on the same gradients (small buckets, so
    several collectives), plus the bytes the meter counted for ``half`` and ``allreduce``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook, fp16_compress_hook

    from ds_ext.comm import for_params

    out = {}
    for dtype, hook in (("fp16", fp16_compress_hook), ("bf16", bf16_compress_hook)):
        params = _params(100 + rank)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        ref = hook(None, (flat.clone(),)).wait()
        meter = CommMeter()
        ours = _reduce("half", {"dtype": dtype, "bucket_mb": 0.002}, params, for_params(params, meter=meter))
        out[dtype] = {"ref": ref, "ours": ours, "local": flat, "bytes": dict(meter.by_kind)}
    params = _params(100 + rank)
    meter = CommMeter()
    _reduce("allreduce", {"bucket_mb": 0.002}, params, for_params(params, meter=meter))
    out["allreduce_bytes"] = dict(meter.by_kind)
    return out


def _own_loop_resume(rank: int, world: int, ckpt: str) -> dict:
    """``half`` attached to a DeepSpeed engine: 2 steps, save, 2 more (straight); a fresh engine loads and runs
    the same 2 steps (resumed)."""
    import ds_ext
    from tests.dist.workers import flat_params, make_engine, rank_batches

    def steps(engine, first, n):
        for x, y in list(rank_batches(rank, first + n, 8, torch.float32))[first:]:
            engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
            engine.step()

    method = {"reducer": {"name": "half", "dtype": "fp16", "bucket_mb": 0.01}}
    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, method)
    steps(engine, 0, 2)
    engine.save_checkpoint(ckpt, tag="mid")
    steps(engine, 2, 2)
    straight, by_kind = flat_params(engine), dict(att.meter.by_kind)
    n = sum(p.numel() for p in engine.module.parameters())
    att.detach()
    engine.destroy()
    gc.collect()
    engine = make_engine("fp32", 1, world=world)
    att = ds_ext.attach(engine, method)
    engine.load_checkpoint(ckpt)
    steps(engine, 2, 2)
    resumed = flat_params(engine)
    att.detach()
    engine.destroy()
    return {"straight": straight, "resumed": resumed, "by_kind": by_kind, "numel": n}


@pytest.fixture(scope="module")
def hook_results():
    return harness.run_pooled(_hook_worker, 2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_equals_ddps_compress_hook_bit_for_bit(hook_results, dtype):
    r0, r1 = (r[dtype] for r in hook_results)
    assert torch.equal(r0["ours"], r1["ours"])  # ranks identical
    for r in (r0, r1):
        assert r["ours"].dtype == torch.float32
        assert torch.equal(r["ours"], r["ref"]), (r["ours"] - r["ref"]).abs().max()
    exact = (r0["local"] + r1["local"]) / 2
    assert not torch.equal(r0["ours"], exact)  # the compression is real: the check can fail
    # each share rounded once, the sum once more: 3 unit roundoffs of the shares' size (plus fp16 subnormals)
    u = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[dtype]
    bound = 3 * u * (r0["local"].abs() + r1["local"].abs()) / 2 + 1e-7
    assert ((r0["ours"] - exact).abs() <= bound).all()


def test_bytes_are_half_of_allreduce(hook_results):
    n = sum(torch.Size(s).numel() for s in SHAPES)
    for r in hook_results:
        assert r["fp16"]["bytes"] == {"half": 2 * n} == r["bf16"]["bytes"]
        assert r["allreduce_bytes"] == {"allreduce": 4 * n}


def test_collectives_match_the_meter_on_loopback():
    opts = REDUCERS.validated("half", {"bucket_mb": 0.002})
    meters = [CommMeter(), CommMeter()]

    def body(comm):
        _reduce("half", opts, _params(7 + comm.rank), comm)

    LoopbackWorld(2).run(body, meters=meters)
    model = REDUCERS.get("half").factory.collectives(SHAPES, 2, opts)
    assert len(model) > 1 and sum(c.nbytes for c in model) == meters[0].by_kind["half"] == meters[1].by_kind["half"]


def test_own_loop_resume_is_exact_and_halves_the_bytes(tmp_path):
    out = harness.run_pooled(_own_loop_resume, 2, ckpt=str(tmp_path / "ckpt"))
    for r in out:
        assert torch.equal(r["straight"], r["resumed"])
        assert set(r["by_kind"]) == {"half"} and r["by_kind"]["half"] == 2 * r["numel"] * 4  # 4 steps, 2 B each
    assert torch.equal(out[0]["straight"], out[1]["straight"])
