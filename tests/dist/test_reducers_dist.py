"""Gradient reducers on 2 real gloo ranks through deepspeed.initialize."""
import torch

from tests import harness
from tests.dist import workers


def test_allreduce_matches_deepspeed_allreduce():
    """Ours (bucketed, async, 2 KiB buckets so several buckets interleave) vs DeepSpeed's own
    engine allreduce after 10 optimizer steps. Tolerance: 0 (bit-identical): both average as
    sum-then-divide in the gradient dtype, fp32 and bf16, accumulation 1 and 4."""
    configs = [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
    res = harness.run_pooled(workers.compare_reducers, 2, configs=configs, steps=10)
    for precision, gas in configs:
        ref0, ours0 = res[0][(precision, gas, "deepspeed")], res[0][(precision, gas, "allreduce")]
        ref1, ours1 = res[1][(precision, gas, "deepspeed")], res[1][(precision, gas, "allreduce")]
        assert ours0["buckets"] > 1
        assert torch.equal(ref0["params"], ref1["params"])
        assert torch.equal(ours0["params"], ours1["params"]), (precision, gas)
        diff = (ours0["params"] - ref0["params"]).abs().max().item()
        assert diff == 0.0, f"{precision} gas={gas}: max |ours - deepspeed| = {diff}"
        # the trajectory moved: parameters are not simply the initial ones
        assert not torch.equal(ours0["params"], workers.flat_params_of(workers.tiny_model()))
        # meter: one full gradient per optimizer step, in the gradient dtype, for both reducers
        numel = ours0["params"].numel()
        width = 4 if precision == "fp32" else 2
        assert ours0["steps"] == 10
        assert ours0["bytes"] == ref0["bytes"] == 10 * numel * width


def test_ranks_stay_identical_only_with_a_reducer():
    """Different data per rank: with `allreduce` the parameters are bit-identical after every step;
    with `none` they diverge, and the runtime consistency check names the parameter."""
    same = harness.run_pooled(workers.per_step_params, 2, reducer="allreduce", check_every=1)
    assert same[0]["desync"] is None and same[1]["desync"] is None
    assert len(same[0]["record"]) == 6
    for a, b in zip(same[0]["record"], same[1]["record"]):
        assert torch.equal(a, b)

    apart = harness.run_pooled(workers.per_step_params, 2, reducer="none", check_every=0)
    for a, b in zip(apart[0]["record"], apart[1]["record"]):
        assert not torch.equal(a, b)

    caught = harness.run_pooled(workers.per_step_params, 2, reducer="none", check_every=1)
    assert caught[0]["desync"] is not None
    assert "differ between rank 0 and rank 1 at step 1" in caught[0]["desync"]
    assert "'0.weight'" in caught[0]["desync"] or "weight" in caught[0]["desync"]


def test_consistency_check_catches_swapped_elements():
    """A desync that sums and norms miss (two elements swapped on one rank) is named by the digest."""
    from tests.dist import workers_nonfinite

    msgs = harness.run_pooled(workers_nonfinite.swapped_elements, 2)
    for m in msgs:
        assert m is not None and "differ between rank 0 and rank 1 at step 7" in m and "'3.weight'" in m


def test_communication_data_type_is_honoured():
    """bf16 training whose DeepSpeed config asks for fp32 communication: our allreduce sends fp32 buckets
    (4 bytes per gradient element, as DeepSpeed's own reduction does), ranks stay identical; with the
    default (bf16) it sends 2 bytes per element."""
    n = sum(p.numel() for p in workers.tiny_model().parameters())
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        a, b = harness.run_pooled(workers.comm_dtype_run, 2, comm_dtype=dtype)
        assert a["allreduce"]["wire"] == f"torch.{'float32' if dtype == 'fp32' else 'bfloat16'}"
        assert a["allreduce"]["bytes"] == n * size == a["deepspeed"]["bytes"], dtype
        assert torch.equal(a["allreduce"]["params"], b["allreduce"]["params"])
