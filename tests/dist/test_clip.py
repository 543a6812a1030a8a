"""``method.clip`` (issue 31): what DeepSpeed's ``gradient_clipping`` clips under a reducer, on 2 gloo ranks
through DeepSpeed, against the exact applied gradient computed from every rank's local gradient."""
from __future__ import annotations

import torch

from tests import harness
from tests.dist import workers_clip as W


def test_clip_before_and_after_give_their_exact_gradients():
    """``after`` clips the reduced gradient by its norm (a top-k mean: mostly zeros, smaller norm, clipped less),
    ``before`` clips each rank's local gradient before the reducer. Each matches its reference to 1e-6 and the two
    differ by far more; the threshold is DeepSpeed's while ``after`` and back after ``detach``; ``before`` with
    the engine's own reduction is refused with a sentence."""
    a, b = harness.run_pooled(W.one_step, 2, timeout=240)
    for out in (a, b):
        for key in (("allreduce", "after"), ("allreduce", "before"), ("topk", "after"), ("topk", "before")):
            got, want = out[key]["applied"], out[key]["expected"]
            assert torch.allclose(got, want, rtol=0, atol=1e-6), (key, (got - want).abs().max())
            assert out[key]["after_detach"] == W.CLIP, key
            assert out[key]["during"] == (W.CLIP if key[1] == "after" else 0.0), key
        for reducer in ("allreduce", "topk"):
            gap = (out[(reducer, "after")]["applied"] - out[(reducer, "before")]["applied"]).abs().max()
            assert gap > 1e-3, (reducer, gap)
        # the top-k mean is sparse: at the same threshold 'after' applies a larger step than S-SGD's 'after'
        assert out[("topk", "after")]["applied"].norm() > out[("allreduce", "after")]["applied"].norm() * 0.99
        assert "method.clip: before" in out["refused"] and "'deepspeed'" in out["refused"]
    assert torch.equal(a[("topk", "before")]["applied"], b[("topk", "before")]["applied"])
