"""Single-process units: LR schedule, model shapes, bucket fusion, data orders."""
import math

import pytest
import torch

from ds_ext.models.resnet import ResNet, Bottleneck, BasicBlock  # noqa: F401
from ds_ext.trainer.optim import LRSchedule
from ds_ext.order.rr import RandomReshuffling
from ds_ext.trainer.recipe import ScheduleSection
from ds_ext.reducers.buckets import BucketedCollective, build_buckets
from ds_ext.registry import MODELS


def sched(**kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    return LRSchedule(opt, ScheduleSection(**kw), 0.8, steps_per_epoch=10, epochs=10)


def test_cosine_with_warmup_matches_formula():
    s = sched(name="cosine", warmup_epochs=1, min_lr=0.01)
    assert s.lr_at(0) == pytest.approx(0.01)
    assert s.lr_at(5) == pytest.approx(0.01 + 0.79 * 0.5)
    assert s.lr_at(10) == pytest.approx(0.8)
    t, T = 45, 90
    assert s.lr_at(55) == pytest.approx(0.01 + 0.5 * 0.79 * (1 + math.cos(math.pi * t / T)))
    assert s.lr_at(100) == pytest.approx(0.01)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # applied at construction
    s.step()
    assert s.get_last_lr()[0] == pytest.approx(s.lr_at(1))


def test_step_and_linear():
    s = sched(name="step", decay_points=[3, 6], gamma=0.1)
    assert [round(s.lr_at(k), 6) for k in (0, 29, 30, 59, 60)] == [0.8, 0.8, 0.08, 0.08, 0.008]
    s = sched(name="linear", min_lr=0.0)
    assert s.lr_at(50) == pytest.approx(0.4) and s.lr_at(100) == pytest.approx(0.0)


@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(name, count):
    m = MODELS.build(name, {})
    assert sum(p.numel() for p in m.parameters()) == count
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_buckets_cap_order_and_coverage():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 300, 50, 1000, 20)]
    buckets = build_buckets(params, bucket_bytes=400 * 4)
    flat = [p for b in buckets for p in b.params]
    assert sorted(map(id, flat)) == sorted(map(id, params)) and len(flat) == len(params)
    assert flat == list(reversed(params))  # reverse registration order
    for b in buckets:
        assert b.numel * 4 <= 400 * 4 or len(b.params) == 1


def test_buckets_launch_in_order_even_if_ready_out_of_order():
    params = [torch.nn.Parameter(torch.ones(4) * i) for i in range(6)]
    launched = []
    coll = BucketedCollective(params, 8 * 4, lambda buf: launched.append(buf.clone()))
    assert len(coll.buckets) == 3
    for p in params:
        p.grad = p.detach().clone()
    for p in params[:2]:  # completes the LAST bucket first: nothing may launch yet
        coll.ready(p)
    assert launched == []
    for p in params[4:]:
        coll.ready(p)
    assert len(launched) == 1 and launched[0][0] == 5  # bucket 0 = params 5, 4
    params[3].grad = None  # no gradient on this rank: zero-filled at flush, in order
    coll.flush()
    assert len(launched) == 3
    assert torch.equal(launched[0], torch.tensor([5.] * 4 + [4.] * 4))
    assert torch.equal(launched[1], torch.tensor([0.] * 4 + [2.] * 4))  # param 3 zero-filled
    assert torch.equal(launched[2], torch.tensor([1.] * 4 + [0.] * 4))


def test_rr_order_is_a_disjoint_per_epoch_permutation():
    n, world = 103, 4
    orders = [RandomReshuffling(n, r, world, seed=7) for r in range(world)]
    shards = [set(o.shard) for o in orders]
    assert all(len(s) == 25 for s in shards)
    assert len(set().union(*shards)) == 100
    e0, e1 = orders[0].epoch_indices(0), orders[0].epoch_indices(1)
    assert sorted(e0) == sorted(e1) == sorted(orders[0].shard) and e0 != e1
    assert RandomReshuffling(n, 0, world, seed=7).epoch_indices(1) == e1  # deterministic


def test_checkpoint_latest_ignores_staging_and_refuses_mismatch(tmp_path):
    import json

    from ds_ext.trainer import checkpoint as ck

    done = tmp_path / "step_0000010"
    done.mkdir()
    (done / ck.META).write_text(json.dumps({"world_size": 2, "reducer": "allreduce"}))
    (tmp_path / "latest").write_text("step_0000010")
    staging = tmp_path / ".staging-step_0000020" / "step_0000020"  # a save that died midway
    staging.mkdir(parents=True)
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert ck.latest(str(tmp_path)) == done
    assert ck.resolve("auto", str(tmp_path)) == done
    assert ck.resolve(False, str(tmp_path)) is None
    with pytest.raises(ck.CheckpointError, match="world_size: checkpoint has 2, this run has 4"):
        ck.check_meta(done, {"world_size": 4, "reducer": "allreduce"})
    (tmp_path / "latest").write_text("step_0000020")
    with pytest.raises(ck.CheckpointError, match="missing or incomplete"):
        ck.latest(str(tmp_path))
    with pytest.raises(ck.CheckpointError, match="not a complete ds_ext checkpoint"):
        ck.resolve(str(staging), str(tmp_path))


def test_fuse_reverse_rule():
    """The one fusion rule (ACP-SGD groups, cost-model buckets): reverse order, close before exceeding
    the cap, an oversized tensor alone."""
    from ds_ext.reducers.buckets import fuse_reverse

    assert fuse_reverse([5, 1, 1, 10, 2], 6) == [[4], [3], [2, 1], [0]]
    assert fuse_reverse([3, 3, 3], 6) == [[2, 1], [0]]
    assert fuse_reverse([], 6) == []
