"""ZeRO stage 1 and 2 under every gradient reducer (``ds_ext.deepspeed.attach.ZeroBridge``), 2 gloo ranks through DeepSpeed.

The method's exchange replaces ZeRO's gradient reduction; ZeRO keeps partitioning the optimizer state and
all-gathers the updated parameter partitions. What must hold:

* the parameters after 10 steps equal the same method at stage 0: bit for bit with SGD and no clipping
  (ZeRO steps the same fp32 arithmetic on its partition), within 1e-6 (fp32) or one bf16 rounding step
  with AdamW and DeepSpeed's gradient clipping (the clipping norm is summed over partitions there);
* each rank holds half the optimizer state of stage 0;
* no uncompressed gradient collective is left: every collective DeepSpeed's comms logger sees outside
  ``ds_ext/*`` is ZeRO's parameter all-gather (as many bytes as the meter's ``zero_allgather``) or a
  4-byte gradient-norm scalar; with reducer ``deepspeed`` the same logger shows ZeRO's full-size
  reduction, so the check can fail;
* resume under ZeRO is exact (DeepSpeed's ZeRO checkpoint plus our state), through the trainer;
* what cannot work is refused with the reason (ZeRO-3, ZeRO-Offload, Local SGD / DS-Sync, DeepSpeed
  outside the version range the bridge was written against).
"""
from __future__ import annotations

import pytest
import torch

from tests import harness
from tests.dist import workers
from tests.dist import workers_zero
from tests.harness import assert_tree_equal, load_ckpt
from tests.e2e.test_resume_matrix import K, N, argv

ALL = list(workers_zero.REDUCERS)


def test_every_reducer_at_zero_1_and_2_equals_stage_0():
    res = harness.run_pooled(workers_zero.zero_vs_stage0, 2, timeout=240, reducers=ALL, precisions=("fp32", "bf16"),
                      gas=2)
    for (precision, name, stage), r in res[0].items():
        base = res[0][(precision, name, 0)]
        assert torch.equal(r["params"], base["params"]), (precision, name, stage)  # bit for bit
        assert all(torch.equal(other[(precision, name, stage)]["params"], r["params"]) for other in res[1:])
        if stage:
            # momentum partitioned over 2 ranks (ZeRO pads the flat group to an alignment: a few elements)
            assert base["opt_bytes"] > 0 and 0 <= r["opt_bytes"] * 2 - base["opt_bytes"] <= 2 * 4 * 16
            gradient_kinds = {k: v for k, v in r["by_kind"].items() if k != "zero_allgather"}
            assert gradient_kinds == base["by_kind"]  # the method sends exactly what it sends at stage 0
            partition = r["opt_bytes"] // 4  # elements in this rank's partition (one fp32 momentum each)
            assert r["by_kind"]["zero_allgather"] == 10 * partition * (2 if precision == "bf16" else 4)
    assert not torch.equal(res[0][("fp32", "powersgd", 0)]["params"], res[0][("fp32", "allreduce", 0)]["params"])


@pytest.mark.slow
def test_adamw_and_clipping_under_zero_deviate_from_stage_0_no_more_than_deepspeed_itself():
    """AdamW and DeepSpeed's gradient clipping: ZeRO sums the clipping norm over partitions. In fp32 every
    method stays within 1e-6 of stage 0. In bf16 DeepSpeed's own reduction already moves away from its
    stage 0 (ZeRO's bf16 path is not BF16_Optimizer's: most elements differ by a bf16 rounding step after 10
    AdamW steps, and its ZeRO reduces bf16 gradients in fp32 where our methods, as at stage 0, reduce them in
    their own dtype); no method deviates from its stage 0 by more than DeepSpeed's own reduction does."""
    res = harness.run_pooled(workers_zero.zero_vs_stage0, 2, timeout=240, reducers=["deepspeed", "allreduce", "powersgd",
                                                                              "exdyna"],
                      precisions=("fp32", "bf16"), gas=2, clip=0.05, adam=True)[0]

    def dev(precision, name, stage):
        return (res[(precision, name, stage)]["params"] - res[(precision, name, 0)]["params"]).abs().max()

    for (precision, name, stage) in res:
        if precision == "fp32":
            assert dev(precision, name, stage) <= 1e-6, (name, stage)
        else:
            assert dev(precision, name, stage) <= dev(precision, "deepspeed", stage), (name, stage)
    assert torch.equal(res[("bf16", "allreduce", 0)]["params"], res[("bf16", "deepspeed", 0)]["params"])
    assert dev("bf16", "deepspeed", 1) > 0  # the bf16 bound is DeepSpeed's own, and not zero


def test_no_uncompressed_gradient_collective_under_zero():
    for stage, gas in ((1, 1), (2, 2)):
        res = harness.run_pooled(workers_zero.zero_comms, 2, timeout=240, reducers=ALL + ["deepspeed"], stage=stage,
                          gas=gas, steps=3)[0]
        for name, r in res.items():
            theirs = {log: sizes for log, sizes in r["logged"].items() if not log.startswith("ds_ext/")}
            gathered = sum(size * n for size, n in theirs.pop("all_gather_into_tensor", {}).items())
            assert gathered == r["by_kind"]["zero_allgather"] > 0, (name, stage)
            big = {log: sizes for log, sizes in theirs.items() if any(size > 8 for size in sizes)}
            if name == "deepspeed":  # the control: ZeRO's own reduction is seen, and metered as such
                reduced = sum(size * n for sizes in big.values() for size, n in sizes.items() if size > 8)
                assert reduced == r["by_kind"]["zero_reduce"] >= 3 * gas * r["grad_bytes"], (stage, big)
            else:
                assert not big, (name, stage, big)
                assert sum(v for k, v in r["by_kind"].items() if k != "zero_allgather") > 0


@pytest.mark.parametrize("reducer,stage", [("{name: acpsgd, rank: 2}", 1),
                                           pytest.param("{name: deepspeed}", 2, marks=pytest.mark.slow)])
def test_resume_under_zero_is_exact(tmp_path, reducer, stage):
    combo = ("acpsgd", "none", "rr")
    extra = [f"deepspeed.zero_optimization.stage={stage}", f"method.reducer={reducer}"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert harness.run(workers.run_trainer, 2, argv=argv(a, combo, *extra)) == [0, 0]
    mid = a / "checkpoints" / f"step_{K:07d}"
    assert harness.run(workers.run_trainer, 2, argv=argv(b, combo, *extra, f"checkpoint.resume={mid}")) == [0, 0]
    tag = f"step_{N:07d}"
    sa, ra = load_ckpt(a, tag)
    sb, rb = load_ckpt(b, tag)
    assert_tree_equal(sa["module"], sb["module"], "module")
    for x, y in zip(ra, rb):
        assert_tree_equal(x, y, "rank state")
    for r in range(2):  # ZeRO's partitioned optimizer state, one file per rank
        fa, fb = (d / "checkpoints" / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for d in (a, b))
        za, zb = (torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in (fa, fb))
        assert_tree_equal(za["base_optimizer_state"], zb["base_optimizer_state"], f"rank {r} optimizer")
        assert_tree_equal(za["single_partition_of_fp32_groups"], zb["single_partition_of_fp32_groups"], "fp32")
    s7, _ = load_ckpt(a, f"step_{K:07d}")
    assert not torch.equal(s7["module"]["0.weight"], sa["module"]["0.weight"])
    kinds = ra[0]["attachment"]["meter"]["by_kind"]
    assert kinds["zero_allgather"] > 0 and (kinds.get("zero_reduce", 0) > 0) == (reducer == "{name: deepspeed}")


def test_deepspeed_version_outside_the_bridge_range_is_refused():
    from ds_ext.deepspeed.attach import zero_bridge_version_problem

    assert zero_bridge_version_problem("0.19.8") is None and zero_bridge_version_problem("0.19.0+abc") is None
    for v in ("0.18.9", "0.20.0", "1.0.0", "unknown"):
        msg = zero_bridge_version_problem(v)
        assert f"this is deepspeed {v}" in msg and "deepspeed>=0.19,<0.20" in msg


def test_detach_gives_zero_its_reduction_back_and_a_foreign_group_is_refused():
    a, b = harness.run_pooled(workers_zero.detach_and_refusals, 2, timeout=120)
    assert a["hooks"][0] == 0 and a["hooks"][1] > 0  # removed while attached, restored by detach
    assert torch.equal(a["first"], b["first"]) and torch.equal(a["second"], b["second"])  # ZeRO's own averaging
    assert not torch.equal(a["first"], a["second"])
    assert "is not the reducer's (rank 0 of 1)" in a["error"] and "data-parallel group" in a["error"]


def test_bf16_stage1_fp32_accumulation_is_refused_before_launch():
    from ds_ext.reducers.base import zero_stage_problem

    ds = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    key, msg = zero_stage_problem("powersgd", ds)
    assert key == "deepspeed.data_types.grad_accum_dtype" and "BF16_Optimizer" in msg
    assert zero_stage_problem("powersgd", {**ds, "zero_optimization": {"stage": 2}}) is None
