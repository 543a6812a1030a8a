"""Fidelity details of issue 20 (items 1-6), each pinned by a test that fails on the behaviour before it:

1. PowerSGD's compression rule is PyTorch's strict ``(n + m) * r * rate < n * m`` (reducer and cost model).
2. QSR without LR warm-up starts with the rule at the first learning rate (the reference's ``adjust_h()``
   before training), in the synchronizer and in the schedule printer.
3. Local SGD's shortened last round is named as a deviation (docstring and method card).
4. DS-Sync's ``pattern_restart: epoch`` reproduces the reference's per-epoch pattern counter.
5. One fp16 policy for every error-feedback reducer: dynamic loss scaling refused with one message, a
   static loss scale accepted (``MethodView`` and the recipe check).
6. One spelling per option concept, the other names accepted as aliases on every method that has it.

Everything runs in one process (``LoopbackWorld`` threads for the multi-rank DS-Sync sequence).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ds_ext import methods
from ds_ext.testing import LoopbackWorld
from ds_ext.trainer.recipe import RecipeError, load_recipe
from ds_ext.registry import ORDERS, REDUCERS, SYNCS, MethodView, load_builtin
from ds_ext.reducers.base import error_feedback_reducers, fp16_dynamic_refusal

load_builtin()
ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"
CARDS = methods.all_cards()
EF_REDUCERS = error_feedback_reducers()  # from the registry (Reducer.keeps_scaled_state), never a hand list


# ------------------------------------------------------------------ 1. PowerSGD's compression rule
@pytest.mark.parametrize("n,m,r,rate", [(8, 8, 2, 2.0), (16, 16, 4, 2.0), (12, 4, 1, 3.0)])
def test_powersgd_does_not_compress_at_equality(n, m, r, rate):
    from ds_ext.reducers.lowrank import PowerSGDReducer

    assert (n + m) * r * rate == n * m  # exactly at the rate
    assert not PowerSGDReducer.compresses(n, m, r, rate)


def test_powersgd_rule_is_pytorchs_everywhere_and_the_cost_model_agrees():
    from ds_ext.reducers.lowrank import PowerSGDOptions, PowerSGDReducer

    for n in range(1, 20):
        for m in range(1, 20):
            for r in (1, 2, 3, 4):
                for rate in (0.0, 1.0, 1.5, 2.0, 3.0):
                    assert PowerSGDReducer.compresses(n, m, r, rate) == ((n + m) * r * rate < n * m), (n, m, r, rate)
    # the reducer and its collectives (what the cost model adds up) follow the same rule: 8x8 at rank 2 travels whole
    p8, p9 = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(9, 8))
    opts = PowerSGDOptions(rank=2, min_compression_rate=2.0, start_powerSGD_iter=0)
    red = PowerSGDReducer([("a", p8), ("b", p9)], opts)
    assert [m.compressed for m in red.metas] == [False, True]  # 9x8: (17)*2*2 = 68 < 72
    p, q = PowerSGDReducer.collectives([(8, 8), (9, 8)], 2, opts)
    assert (p.nbytes, q.nbytes) == (4 * (64 + 9 * 2), 4 * (8 * 2))


def test_powersgd_matrix_at_the_rate_is_averaged_exactly():
    """On 2 loopback ranks the 8x8 gradient at rank 2 is the exact mean (not a rank-2 approximation)."""
    from ds_ext.reducers.lowrank import PowerSGDOptions, PowerSGDReducer

    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        p = torch.nn.Parameter(torch.zeros(8, 8))
        red = PowerSGDReducer([("w", p)], PowerSGDOptions(rank=2, start_powerSGD_iter=0), comm=comm)
        p.grad = torch.randn(8, 8, generator=g)
        red.finish()
        return p.grad.clone()

    a, b = LoopbackWorld(2).run(body)
    mean = (torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
            + torch.randn(8, 8, generator=torch.Generator().manual_seed(1))) / 2
    assert torch.equal(a, b) and torch.allclose(a, mean, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ 2. QSR without LR warm-up
def test_qsr_first_round_is_the_rule_at_the_first_lr_without_warmup():
    from ds_ext.sync.schedules import QSR

    q = QSR(alpha=0.0175, h_base=4, warmup_steps=0)
    assert q.first_h(0.001) == q.rule(0.001) == 306 != q.init_h
    assert QSR(alpha=0.0175, h_base=4, init_h=2, warmup_steps=10).first_h(0.001) == 2  # step 0 in the warm-up
    assert QSR(alpha=0.0, h_base=4, init_h=7).first_h(0.001) == 7  # alpha 0: constant init_h
    assert QSR(alpha=0.0175, h_base=4, warmup_steps=0, total_steps=100).first_h(0.001) == 100  # clamped
    assert q.first_h() == 4  # no learning rate known: init_h


@pytest.mark.parametrize("source", ["lr_at", "optimizer"])
def test_local_sync_starts_with_the_rule_at_step_0(source):
    p = torch.nn.Parameter(torch.zeros(3))
    kw = {"lr_at": lambda s: 0.001} if source == "lr_at" else {"optimizer": torch.optim.SGD([p], lr=0.001)}
    opts = {"period": "qsr", "alpha": 0.0175, "h_base": 4}
    sync = SYNCS.build("local", opts, [("p", p)], comm=LoopbackWorld(1).comm(0), warmup_steps=0, total_steps=1000, **kw)
    assert sync.h == 306
    with_warmup = SYNCS.build("local", opts, [("p", p)], comm=LoopbackWorld(1).comm(0), warmup_steps=5,
                              total_steps=1000, **kw)
    assert with_warmup.h == 4  # init_h (default h_base) while step 0 is in the warm-up


def test_schedule_printer_shows_the_rule_at_step_0_without_warmup(capsys):
    from ds_ext.trainer.optim import LRSchedule
    from ds_ext.sync import schedules
    from ds_ext.trainer.cli import schedule_main

    args = ["--recipe", str(QUICK), "--world-size", "2", "--steps-per-epoch", "22",
            "--set", "method.reducer={name: none}",
            "--set", "method.sync={name: local, period: qsr, alpha: 0.5, h_base: 4}",
            "--set", "schedule.warmup_epochs=0"]
    recipe = load_recipe(QUICK, args[7::2])
    lr0 = LRSchedule(None, recipe.schedule, recipe.optimizer.options.lr, 22, recipe.train.epochs).lr_at(0)
    want = schedules.QSR(0.5, 4).rule(lr0)
    assert want == 25 and want != 4  # init_h (= h_base) would be 4

    assert schedule_main(args + ["--csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "round,first_step,H,lr,data_parallel"
    first = rows[1].split(",")
    assert first[:3] == ["0", "0", str(want)] and float(first[3]) == pytest.approx(lr0)

    assert schedule_main(args) == 0
    out = capsys.readouterr().out
    row0 = next(ln for ln in out.splitlines() if ln.split()[:2] == ["0%", "0"])
    assert int(row0.split()[-1]) == want


# ------------------------------------------------------------------ 3. Local SGD's last round, named
def test_local_sgd_last_round_is_named_as_a_deviation():
    from ds_ext.sync import averaging
    from ds_ext.sync.schedules import Constant, simulate

    # the behaviour kept: a constant H's last round is shortened to end, with an averaging, on the last step
    assert simulate(Constant(4, total_steps=10), lambda s: 0.1, 10) == [(0, 4, False), (4, 4, False), (8, 2, False)]
    doc = averaging.__doc__
    local_devs = doc[doc.index("named (Local SGD / QSR)"):]
    assert "last round" in local_devs and "total % H" in local_devs
    card = CARDS["local"].sections["Deviations from the reference code"]
    assert "last round" in card and "Period._clamp" in card


# ------------------------------------------------------------------ 4. DS-Sync's pattern counter at epoch boundaries
def _cifar_patterns(steps_per_epoch: int, epochs: int) -> list:
    """The reference's CIFAR-10/100 loop (``total_iter`` passed by value into ``train()``, so it restarts every
    epoch): the pattern index of the averaging made *before* each step's forward pass."""
    out = []
    for _ in range(epochs):
        total_iter = 0  # the caller's 0, received by value every epoch
        for _i in range(steps_per_epoch):
            out.append(total_iter % 2)
            total_iter = total_iter + 1
    return out


def _deepfm_patterns(steps_per_epoch: int, epochs: int) -> list:
    """The reference's DeepFM loop: the averaging made *after* each optimizer step uses ``iteration % 2``,
    ``iteration`` counting within the epoch."""
    return [iteration % 2 for _ in range(epochs) for iteration in range(steps_per_epoch)]


def _dssync_run(restart: str, steps: int, spe: int = 3, resume_at: int = None) -> list:
    """The groups every sync used on 4 loopback ranks, h = 1, patterns {0,1}{2,3} / {0,3}{1,2}; with
    ``resume_at`` the synchronizer is rebuilt from its state_dict after that many steps."""
    opts = {"groups": 2, "grouping": "patterns", "pattern_restart": restart}

    def body(comm):
        p = torch.nn.Parameter(torch.full((3,), float(comm.rank)))

        def build():
            return SYNCS.build("dssync", opts, [("p", p)], comm=comm, steps_per_epoch=spe, total_steps=steps)

        sync, seen = build(), []
        for t in range(steps):
            if resume_at is not None and t == resume_at:
                state = sync.state_dict()
                sync = build()
                sync.load_state_dict(state)
            assert sync.after_step()
            seen.append(sync.last_grouping)
        return seen

    recs = LoopbackWorld(4).run(body)
    assert all(r == recs[0] for r in recs)
    return recs[0]


A, B = [[0, 1], [2, 3]], [[0, 3], [1, 2]]


def test_dssync_pattern_restart_epoch_is_the_references_sequence():
    spe, epochs = 3, 3  # an odd number of syncs per epoch: A twice at each boundary
    got = _dssync_run("epoch", spe * epochs, spe)
    # DeepFM averages after the step, as here: the same sequence; CIFAR averages before step s with the index
    # this code uses after step s (the same sequence, each averaging one step earlier)
    assert got == [[A, B][i] for i in _deepfm_patterns(spe, epochs)] == [[A, B][i] for i in _cifar_patterns(spe, epochs)]
    assert got == [A, B, A] * 3


def test_dssync_default_alternates_by_sync_count_and_epoch_mode_resumes_exactly():
    assert _dssync_run("never", 7) == [A, B, A, B, A, B, A]  # odd epochs (3 steps) do not matter
    assert _dssync_run("epoch", 8, resume_at=4) == _dssync_run("epoch", 8)  # mid-epoch resume keeps the count


def test_dssync_pattern_restart_needs_patterns_and_steps_per_epoch():
    from ds_ext.sync.dssync import DSSyncOptions

    assert DSSyncOptions().pattern_restart == "never"
    with pytest.raises(ValueError, match="pattern_restart 'epoch' applies to grouping 'patterns'"):
        DSSyncOptions(pattern_restart="epoch")
    with pytest.raises(RecipeError, match="pattern_restart"):
        load_recipe(QUICK, ["method.reducer={name: none}", "method.sync={name: dssync, pattern_restart: epoch}"])
    load_recipe(QUICK, ["method.reducer={name: none}",
                        "method.sync={name: dssync, grouping: patterns, pattern_restart: epoch}"])

    def body(comm):
        p = torch.nn.Parameter(torch.zeros(2))
        SYNCS.build("dssync", {"grouping": "patterns", "pattern_restart": "epoch"}, [("p", p)], comm=comm)

    with pytest.raises(ValueError, match="steps per epoch"):
        LoopbackWorld(2).run(body)


# ------------------------------------------------------------------ 5. one fp16 policy for error feedback
def _view(reducer: str, ds: dict, options=None) -> MethodView:
    opts = {"reducer": REDUCERS.validated(reducer, options or {})}
    return MethodView(names={"reducer": reducer, "sync": "none", "order": "rr"}, options=opts, deepspeed=ds)


def test_every_reducer_with_an_error_feedback_option_carries_scaled_state():
    with_option = {n for n in REDUCERS.names() if "error_feedback" in REDUCERS.get(n).options.model_fields}
    assert with_option and with_option <= set(EF_REDUCERS)
    assert "acpsgd" in EF_REDUCERS  # always error feedback (no option): declared on the class
    assert "allreduce" not in EF_REDUCERS


@pytest.mark.parametrize("reducer", EF_REDUCERS)
def test_fp16_dynamic_loss_scaling_refused_alike(reducer):
    want = [("method.reducer", fp16_dynamic_refusal(reducer))]
    assert _view(reducer, {"fp16": {"enabled": True}}).problems() == want
    assert _view(reducer, {"fp16": {"enabled": True, "loss_scale": 0}}).problems() == want
    if reducer != "acpsgd":  # the rule does not depend on the error_feedback option
        assert _view(reducer, {"fp16": {"enabled": True}}, {"error_feedback": False}).problems() == want
    for ok in ({"fp16": {"enabled": True, "loss_scale": 128}}, {"bf16": {"enabled": True}}, {}):
        assert _view(reducer, ok).problems() == [], ok
    msg = want[0][1].replace(repr(reducer), repr("R"), 1)
    assert msg == fp16_dynamic_refusal("R")  # one message, only the name differs
    assert ", ".join(EF_REDUCERS) in msg  # the message names the family from the registry


@pytest.mark.parametrize("reducer", EF_REDUCERS)
def test_fp16_policy_through_the_recipe_check(reducer):
    block = f"method.reducer={{name: {reducer}}}"
    with pytest.raises(RecipeError) as ei:
        load_recipe(QUICK, [block, "deepspeed.fp16={enabled: true}"])
    assert fp16_dynamic_refusal(reducer) in str(ei.value)
    assert str(ei.value).count("error-feedback method") == 1  # once, not once per copy of the rule
    load_recipe(QUICK, [block, "deepspeed.fp16={enabled: true, loss_scale: 128}"])


def test_fp16_policy_is_stated_in_every_error_feedback_card():
    for name in EF_REDUCERS:
        modes = CARDS[name].sections["Failure modes"]
        assert "fp16_loss_scaling_problem" in modes and "static" in modes and "refused" in modes, name
        assert "accept it" not in CARDS[name].text and "accepted here" not in CARDS[name].text, name


# ------------------------------------------------------------------ 6. option names
def test_rank_takes_both_names_on_both_low_rank_reducers():
    for name in ("powersgd", "acpsgd"):
        cls = REDUCERS.get(name).options
        assert REDUCERS.validated(name, {"rank": 3}).rank == 3
        assert REDUCERS.validated(name, {"matrix_approximation_rank": 3}).rank == 3
        assert cls.field_of("matrix_approximation_rank") == "rank"
        with pytest.raises(ValueError):  # both spellings at once: refused, not silently one of them
            REDUCERS.validated(name, {"rank": 2, "matrix_approximation_rank": 3})


@pytest.mark.parametrize("reducer", [n for n in REDUCERS.names() if "error_feedback" in REDUCERS.get(n).options.model_fields])
def test_use_error_feedback_is_accepted_wherever_error_feedback_is(reducer):
    assert REDUCERS.validated(reducer, {"use_error_feedback": False}).error_feedback is False
    assert REDUCERS.get(reducer).options.field_of("use_error_feedback") == "error_feedback"


def _alias_sets() -> dict:
    """{field: aliases} over every Options class of every registry."""
    out = {}
    for reg in (REDUCERS, SYNCS, ORDERS):
        for n in reg.names():
            for f, info in reg.get(n).options.model_fields.items():
                choices = set(getattr(info.validation_alias, "choices", ()) or ()) - {f}
                out.setdefault(f, set()).update(choices)
    return {f: a for f, a in out.items() if a}


def _audit_cases():
    cases = []
    for f, aliases in sorted(_alias_sets().items()):
        for reg in (REDUCERS, SYNCS, ORDERS):
            for n in reg.names():
                if f in reg.get(n).options.model_fields:
                    cases.append(pytest.param(reg.kind, n, f, sorted(aliases), id=f"{n}.{f}"))
    return cases


@pytest.mark.parametrize("kind,name,field,aliases", _audit_cases())
def test_every_alias_of_an_option_is_accepted_by_every_method_with_it(kind, name, field, aliases):
    reg = {"reducer": REDUCERS, "sync": SYNCS, "order": ORDERS}[kind]
    for alias in aliases:
        assert reg.get(name).options.field_of(alias) == field, f"{kind} {name!r}: {alias!r} is not accepted for {field!r}"


def test_cards_name_the_aliases():
    cases = [(n, "rank", "matrix_approximation_rank") for n in ("powersgd", "acpsgd")]
    cases += [(n, "error_feedback", "use_error_feedback") for n in ("powersgd", "topk", "exdyna", "signsgd")]
    for name, field, alias in cases:
        row = next(r for r in CARDS[name].options if r.name == field)
        assert alias in row.meaning, (name, field)


# ------------------------------------------------------------------ low-rank statistics for the logs
def test_lowrank_stats_compression_ratio_and_error_feedback_norm():
    """PowerSGD and ACP-SGD report the compression ratio (gradient elements over elements sent per step,
    from the shapes) and the residual's norm (the error-feedback buffer), on 2 loopback ranks."""
    shapes = [(8, 16), (16,)]

    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        named = [(f"p{i}", torch.nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)]
        out = {}
        for name, opts in (("powersgd", {"rank": 2, "start_powerSGD_iter": 0}), ("acpsgd", {"rank": 2})):
            red = REDUCERS.build(name, opts, named, comm=comm)
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=g)
            red.finish()
            out[name] = (red.stats(), [float(c.E.norm()) for c in red.classes.values()])
        return out

    res = LoopbackWorld(2).run(body)
    st, norms = res[0]["powersgd"]
    assert st["compression_ratio"] == pytest.approx((128 + 16) / ((8 + 16) * 2 + 16))
    assert st["error_feedback_norm"] == pytest.approx(norms[0]) and st["error_feedback_norm"] > 0
    st, _ = res[0]["acpsgd"]
    assert st["compression_ratio"] == pytest.approx((128 + 16) / ((8 * 2 + 16 * 2) / 2 + 16))
