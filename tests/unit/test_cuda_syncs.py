"""tests/dist/cuda_syncs.py's counter (run/gpu-check.sh step 7) on CPU: a sync-debug warning is attributed to the
innermost frame outside torch and to its owner (ds_ext, DeepSpeed, other); other warnings are left alone; the
method list carries its budgets. The counting itself needs a GPU (torch.cuda.set_sync_debug_mode)."""
import warnings

import deepspeed
import pytest

from tests.dist import cuda_syncs

MSG = "called a synchronizing CUDA operation"


def _warner(path):
    """A function whose code lives at ``path`` (as if defined there) that issues torch's sync-debug warning."""
    ns = {"warnings": warnings}
    exec(compile(f"def warn_here():\n    warnings.warn({MSG!r})\n", str(path), "exec"), ns)
    return ns["warn_here"]


def test_sites_and_owners(tmp_path):
    ours = _warner(cuda_syncs.ROOT / "ds_ext" / "fake_module.py")
    theirs = _warner(deepspeed.__path__[0] + "/fake_engine.py")
    with cuda_syncs.SyncCounter(cuda=False) as c:
        ours()
        ours()
        theirs()
        warnings.warn(MSG)  # from this test: "other"
    assert c.sites == {("ds_ext", "ds_ext/fake_module.py:2 warn_here"): 2,
                       ("DeepSpeed", "deepspeed/fake_engine.py:2 warn_here"): 1,
                       ("other", f"tests/unit/test_cuda_syncs.py:{test_sites_and_owners.__code__.co_firstlineno + 7} "
                                 "test_sites_and_owners"): 1}
    with pytest.warns(UserWarning, match="unrelated"):  # outside the counter, and non-sync warnings inside it
        with cuda_syncs.SyncCounter(cuda=False) as c2:
            warnings.warn("unrelated")
    assert not c2.sites


def test_budgets_and_verdicts():
    names = cuda_syncs.methods()
    assert cuda_syncs.budget("topk exchange=union") == 2 and cuda_syncs.budget("allreduce") == 1
    assert {"ZeRO-1 powersgd", "ZeRO-2 topk", "topk exchange=union", "order cdgrab + cdgrab", "sync local"} <= set(names)
    control = [n for n in names if cuda_syncs.budget(n) is None]
    assert len(control) == 1
    rec = {"error": None, "steps": 4, "sites": {"ds_ext|a.py:1 f": 4, "DeepSpeed|b.py:2 g": 40}, "unattributed": 0}
    assert cuda_syncs.verdict("allreduce", rec, "cuda") == ""  # DeepSpeed's syncs are not ds_ext's budget
    assert cuda_syncs.verdict("allreduce", {**rec, "sites": {"ds_ext|a.py:1 f": 8}}, "cuda").startswith("over budget")
    assert cuda_syncs.verdict("topk exchange=union", {**rec, "sites": {"ds_ext|a.py:1 f": 8}}, "cuda") == ""
    assert "NOT over budget" in cuda_syncs.verdict(control[0], rec, "cuda")
    assert cuda_syncs.verdict(control[0], {**rec, "sites": {"ds_ext|a.py:1 f": 40}}, "cuda") == ""
    assert "cpu" in cuda_syncs.table({"allreduce": rec}, "cpu") and "4.00" not in cuda_syncs.table({"allreduce": rec}, "cpu")
