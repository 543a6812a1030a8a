"""Every method on CUDA tensors (run by run/gpu-check.sh on a GPU host; skipped without a GPU).

Ranks share the single GPU through gloo on CUDA tensors (NCCL refuses two ranks on one device); the
consistency check runs after every step that must leave ranks identical, so a result that depends on
the order of atomic additions (topk with 3 ranks and overlapping indices, CD-GraB's sketch) fails here.
"""
import os

import pytest
import torch

from tests import harness
from tests.dist import workers_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run/gpu-check.sh)")


@pytest.fixture(autouse=True)
def _one_gpu(monkeypatch):
    monkeypatch.setenv("DS_EXT_TEST_ONE_GPU", "1")  # every rank on cuda:0 (tests/harness.py)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")


@pytest.mark.parametrize("label,method,order,world", workers_gpu.CASES, ids=[c[0] for c in workers_gpu.CASES])
def test_method_on_cuda(label, method, order, world):
    res = harness.run(workers_gpu.run_case, world, label=label, method=method, order_spec=order, timeout=600)
    for r in res:
        assert r["error"] is None, r["error"]
        assert r["device"].startswith("cuda") and r["param_device"].startswith("cuda")
        assert len(r["record"]) >= 4 and all(torch.isfinite(x).all() for x in r["record"])
        assert not r["nondeterministic"], r["nondeterministic"]  # torch.use_deterministic_algorithms warnings
    if method.get("sync") is None:  # gradients averaged every step: ranks bit-identical after each step
        for r in res[1:]:
            for a, b in zip(res[0]["record"], r["record"]):
                assert torch.equal(a, b), label
