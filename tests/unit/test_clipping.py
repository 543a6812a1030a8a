"""``method.clip`` settings that cannot run are refused with one sentence (ds_ext/deepspeed/clipping.py); the exact
arithmetic of both meanings is tests/dist/test_clip.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from ds_ext.deepspeed.clipping import clip_problem
from ds_ext.spec import RecipeError, method_section


def test_which_settings_clip_before_refuses():
    ok = dict(reducer_name="topk", replaces_allreduce=True, zero_stage=0, precision="fp32", threshold=1.0)
    assert clip_problem("before", **ok) is None and clip_problem("after", **ok) is None
    assert clip_problem("before", **{**ok, "threshold": 0.0}) is None  # nothing to clip: nothing refused
    assert "'deepspeed' lets DeepSpeed reduce" in clip_problem("before", **{**ok, "reducer_name": "deepspeed",
                                                                              "replaces_allreduce": False})
    assert "microbatch gradients" in clip_problem("before", **{**ok, "reducer_name": "cdgrab", "microbatches": True})
    assert "ZeRO stage 1, bf16" in clip_problem("before", **{**ok, "zero_stage": 1, "precision": "bf16"})
    assert "torch_autocast" in clip_problem("before", **{**ok, "autocast": True})
    assert clip_problem("after", **{**ok, "zero_stage": 2, "precision": "fp16"}) is None


def test_the_method_section_takes_clip():
    assert method_section({"reducer": "topk", "clip": "before"}).clip == "before"
    assert method_section({"reducer": "topk"}).clip == "after"
    with pytest.raises(RecipeError, match="ds_ext.clip"):
        method_section({"reducer": "topk", "clip": "sometimes"})


def test_the_recipe_check_refuses_clip_before_where_it_cannot_run(tmp_path):
    from ds_ext.trainer.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "pytext-gpt.yaml"
    with pytest.raises(RecipeError, match=r"method.clip: method.clip: before .*'cdgrab'.*use clip: after"):
        load_recipe(recipe, ["method.reducer={name: cdgrab}", "method.order={name: cdgrab}"])
    load_recipe(recipe, ["method.reducer={name: cdgrab}", "method.order={name: cdgrab}", "method.clip=after"])
    load_recipe(recipe, ["method.reducer={name: cdgrab}", "method.order={name: cdgrab}",
                         "deepspeed.gradient_clipping=0.0"])
