"""The own-loop routes (issue 18): a ``ds_ext`` block in an ordinary DeepSpeed config read by
``ds_ext.attach(engine)``, typed options objects, option errors that list what is allowed, and
``engine.save_checkpoint`` / ``load_checkpoint`` keeping every method's state (2 gloo ranks through
DeepSpeed)."""
from __future__ import annotations

import pytest
import torch

from ds_ext.spec import RecipeError, method_section
from tests import harness
from tests.dist import workers_api as W


def test_ds_ext_block_typed_options_and_dicts_are_one_method():
    """The ``ds_ext`` block of the engine's config, a dict and ``PowerSGDOptions(rank=2)`` give the same
    reducer and the same parameters after 3 steps, bit for bit (ranks identical); bad blocks name the key and
    list what is allowed, as the recipe check does."""
    a, b = harness.run_pooled(W.config_routes, 2, timeout=240)
    for out in (a, b):
        for key in ("ds_config", "dict", "typed"):
            assert out[key]["reducer"] == "PowerSGDReducer" and out[key]["rank"] == 2, key
            assert torch.equal(out[key]["params"], a["ds_config"]["params"]), key
            assert out[key]["by_kind"] == a["ds_config"]["by_kind"] and out[key]["by_kind"]["powersgd_p"] > 0
    e = a["errors"]
    assert "DeepSpeed config: ds_ext.reducer.rnk: unknown option for reducer 'powersgd'; allowed: " in e["option"]
    assert "start_powerSGD_iter" in e["option"] and "error_feedback" in e["option"]
    assert "--set" not in e["option"]
    assert "ds_ext.reducer.name: unknown reducer 'powersdg'; allowed: " in e["name"] and "powersgd" in e["name"]
    assert "ds_ext.reducr: unknown key; allowed keys: clip, order, reducer, sync" in e["section"]
    assert "options of type NoOptions serve reducers" in e["ambiguous"] and "('<name>', options)" in e["ambiguous"]
    assert "method.reducer.densty: unknown option for reducer 'topk'; allowed: " in e["dict_option"]


def test_method_section_messages_without_an_engine():
    with pytest.raises(RecipeError) as ei:
        method_section({"sync": {"name": "local", "h": "four"}})
    assert "ds_ext.sync.h" in str(ei.value)
    with pytest.raises(RecipeError, match="ds_ext: must be a mapping with the keys reducer, sync, order"):
        method_section(["powersgd"])
    assert method_section({"reducer": "signsgd"}).reducer.name == "signsgd"


def test_own_loop_save_and_load_keep_the_methods_state(tmp_path):
    """PowerSGD (error feedback, warm-started Q) in an own loop: 3 steps, ``engine.save_checkpoint``, 3 more;
    a new engine + attachment that ``engine.load_checkpoint``s and runs the same 3 steps ends bit-identical.
    Each rank's ``ds_ext_rank<r>.pt`` sits next to DeepSpeed's files and ``latest`` names the tag. The
    control: DeepSpeed's load alone (the methods fresh) does not end identical, so the test can fail."""
    res = harness.run_pooled(W.own_loop_resume, 2, ckpt=str(tmp_path / "a"), timeout=240)
    for r, out in enumerate(res):
        assert torch.equal(out["resumed"], out["straight"]), r
        assert {"ds_ext_rank0.pt", "ds_ext_rank1.pt", "mp_rank_00_model_states.pt"} <= set(out["files"])
        assert out["latest"] == "mid"
    ctl = harness.run_pooled(W.own_loop_resume, 2, ckpt=str(tmp_path / "b"), load=False, timeout=240)
    assert not torch.equal(ctl[0]["resumed"], ctl[0]["straight"])


def test_a_gradient_driven_order_without_its_object_is_refused():
    """``{"order": "dgrab"}`` without ``order=``: nothing would see the gradients nor order the examples."""
    from ds_ext.deepspeed.attach import attach

    class FakeEngine:  # attach refuses before touching the engine
        _config = None
        config = {}

    with pytest.raises(ValueError, match="method.order 'dgrab' sees every micro-batch gradient"):
        attach(FakeEngine(), {"order": "dgrab"})


def test_own_loop_load_refuses_what_does_not_belong_on_every_rank(tmp_path, caplog):
    """After ``engine.save_checkpoint``: a rank file missing on one rank, a damaged one, files from another step
    or no rank files at all stop ``engine.load_checkpoint`` on every rank with the same line naming the file
    (the fingerprints of ``meta.json``, checked before anything is loaded); ``load_optimizer_states=False`` on
    intact files starts the methods fresh without an error."""
    a, b = harness.run_pooled(W.own_loop_refusals, 2, ckpt=str(tmp_path), timeout=240)
    d = tmp_path / "t"
    for out in (a, b):
        assert f"{d / 'ds_ext_rank1.pt'}: missing (no state for rank 1)" in out["missing"], out["missing"]
        assert f"{d / 'ds_ext_rank0.pt'}: 16 bytes, the checkpoint recorded" in out["damaged"], out["damaged"]
        assert f"{d / 'ds_ext_rank0.pt'}: " in out["step"] and "recorded" in out["step"], out["step"]
        assert f"{d / 'ds_ext_rank0.pt'}: missing (no state for rank 0)" in out["none"], out["none"]
        assert out["no_optimizer"] is None
    assert a == b
