"""The flat reducers' work started during backward (issue 29): signsgd per bucket, topk / ExDyna accumulation and
partition work in the ready hooks. Each is compared bit for bit with the whole-model path on the same inputs
(``signsgd``: ``pipelined: false``; topk / ExDyna: no ``grad_ready`` calls, i.e. everything in ``finish()``, the
path before the change), on loopback ranks (sums in rank order) and, for signsgd's launch order, on 2 gloo ranks
through DeepSpeed."""
import pytest
import torch

from tests import harness
from tests.dist import workers
from tests.dist import workers_overlap as wo

SIGN = {"bucket_mb": 0.005, "first_bucket_mb": 0.0002}  # 6 buckets over wo.SHAPES, the first one tensor


def _eq(u, v):
    """Bit for bit up to NaN == NaN (a poisoned step's residual holds the NaN until the reset)."""
    return (u is None and v is None) or (u.dtype == v.dtype and torch.allclose(u, v, rtol=0, atol=0, equal_nan=True))


def _same(a, b, label):
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        for i, (u, v) in enumerate(zip(x["applied"], y["applied"])):
            assert _eq(u, v), (label, t, i)
        assert _eq(x["error"], y["error"]), (label, t)
        assert x["flag"] == y["flag"] and x["bad"] == y["bad"], (label, t)


@pytest.mark.parametrize("world", [2, 3])
def test_signsgd_per_bucket_is_bit_identical_to_the_whole_model_path(world):
    """Applied gradients and residuals after 4 steps, with error feedback and without, hooks in reverse and in a
    shuffled order, a parameter without gradient; the guard's verdict on the gathered scales alike."""
    cases = {"ef": ({}, "reverse", ()), "no_ef": ({"error_feedback": False}, "shuffled", ()),
             "missing": ({}, "reverse", (3,)), "unannounced": ({}, "none", ())}

    def body(comm):
        out = {}
        for label, (opts, hooks, missing) in cases.items():
            out[label] = [wo.drive(comm, "signsgd", {**opts, **SIGN, "pipelined": p}, hooks=hooks, missing=missing,
                                   watch=True) for p in (True, False)]
        return out

    for res in workers.loopback(lambda rank, world, comm: body(comm), world):
        for label, (new, old) in res.items():
            _same(new, old, label)
            assert all(s["flag"] is False for s in new)


def test_signsgd_launches_each_bucket_from_its_last_ready_hook():
    """Each bucket's two all_gathers are issued by the hook that completes it, in bucket order (the first after
    the first bucket's only gradient), the same sequence on every rank; ``finish()`` issues nothing; the bytes
    are ``collectives``' (the cost model's)."""
    from ds_ext.reducers.signsgd import SignSGDOptions, SignSGDReducer, bucket_groups

    res = workers.loopback(lambda rank, world, comm: wo.drive(comm, "signsgd", SIGN, steps=2), 2)
    opts = SignSGDOptions(**SIGN)
    groups = bucket_groups([torch.Size(s).numel() for s in wo.SHAPES], opts)
    assert len(groups) >= 4 and groups[0] == [len(wo.SHAPES) - 1]
    for step in res[0]:
        assert step["hooks_log"] == ["signsgd_bits", "signsgd_scales"] * len(groups) and step["finish_log"] == []
        assert step["during"][0] == 2  # the first hook (the last tensor, bucket 0 alone) launched its bucket
        done = [sum(len(g) for g in groups[:b + 1]) for b in range(len(groups))]
        assert [step["during"][d - 1] for d in done] == [2 * (b + 1) for b in range(len(groups))]
    assert res[0][0]["hooks_log"] == res[1][0]["hooks_log"]
    colls = SignSGDReducer.collectives(wo.SHAPES, 2, opts)
    assert [c.op for c in colls] == ["all_gather"] * 2 * len(groups)
    numels = [torch.Size(s).numel() for s in wo.SHAPES]
    assert [c.nbytes for c in colls[::2]] == [sum((numels[i] + 7) // 8 for i in g) for g in groups]
    assert [c.nbytes for c in colls[1::2]] == [4 * len(g) for g in groups]
    whole = SignSGDReducer.collectives(wo.SHAPES, 2, SignSGDOptions(pipelined=False))
    assert [c.nbytes for c in whole] == [sum(c.nbytes for c in colls[::2]), sum(c.nbytes for c in colls[1::2])]


@pytest.mark.parametrize("world", [2, 3])
def test_sparse_work_in_the_hooks_is_bit_identical_to_finish_alone(world):
    """topk (both exchanges, fp16 values) and ExDyna (several steps: reallocation and threshold scaling, a rank
    whose partition completes early and one whose partition completes last) with the accumulation, the dense
    zeroing and ExDyna's partition count started in the hooks, against no hooks at all (everything in ``finish()``,
    the path before the change); ExDyna's non-finite flag
    (chunked during backward) alike, and a NaN on one rank named by both."""
    cases = {"topk": ("topk", {"density": 0.02}), "topk_union": ("topk", {"density": 0.02, "exchange": "union"}),
             "topk_fp16": ("topk", {"density": 0.05, "value_dtype": "fp16"}),
             "topk_no_ef": ("topk", {"density": 0.02, "error_feedback": False}),
             "exdyna": ("exdyna", {"density": 0.02, "num_blocks": 64, "block_align": 8}),
             "exdyna_no_ef": ("exdyna", {"density": 0.05, "num_blocks": 64, "block_align": 8, "error_feedback": False})}

    def body(comm):
        out = {}
        for label, (name, opts) in cases.items():
            for hooks in ("reverse", "shuffled"):
                kw = dict(steps=5, watch=True, missing=(4,), poison=(3, 1, 7) if name == "exdyna" else None)
                out[(label, hooks)] = (wo.drive(comm, name, opts, hooks=hooks, **kw),
                                       wo.drive(comm, name, opts, hooks="none", **kw))
        return out

    for res in workers.loopback(lambda rank, world, comm: body(comm), world):
        for label, (new, old) in res.items():
            _same(new, old, label)
            assert all(s["hooks_log"] == [] for s in new)  # nothing is exchanged before finish()
            if label[0].startswith("exdyna"):
                assert [s["bad"] for s in new] == [[], [], [], [1], []]


@pytest.mark.slow
def test_signsgd_first_collective_before_backward_ends_on_gloo():
    """Through DeepSpeed on 2 gloo ranks: every step's first signsgd all_gather is issued before that step's last
    grad_ready, and the per-bucket run's parameters equal ``pipelined: false``'s bit for bit (2 micro-batches)."""
    specs = {"bucketed": {"name": "signsgd", "bucket_mb": 0.01, "first_bucket_mb": 0.001},
             "whole": {"name": "signsgd", "pipelined": False}}
    a, b = harness.run_pooled(wo.launch_runs, 2, specs=specs, steps=3, gas=2)
    for res in (a, b):
        for x, y in zip(res["bucketed"]["record"], res["whole"]["record"]):
            assert torch.equal(x, y)
        for label, before in (("bucketed", True), ("whole", False)):
            steps, cur = [], []
            for e in res[label]["events"]:
                if e == "finish":
                    steps.append(cur)
                    cur = []
                else:
                    cur.append(e)
            assert len(steps) == 3
            for ev in steps:
                last_ready = max(i for i, e in enumerate(ev) if e == "ready")
                first = ev.index("signsgd_bits") if "signsgd_bits" in ev else len(ev)
                assert (first < last_ready) == before, (label, ev)
            if before:
                assert all(ev.count("signsgd_bits") == 5 for ev in steps)
    assert all(torch.equal(x, y) for x, y in zip(a["bucketed"]["record"], b["bucketed"]["record"]))
