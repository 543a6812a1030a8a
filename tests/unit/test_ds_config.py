"""A recipe that points at an existing DeepSpeed config (recipe key ``deepspeed_config``, issue 18): its keys
join the deepspeed section, its ``ds_ext`` block becomes the method, and every conflict is named with the
reason (``ds_ext/trainer/recipe.py: ds_config_problems``). No processes: recipe loading only."""
from __future__ import annotations

import json

import pytest
import yaml

from ds_ext.deepspeed.attach import deepspeed_config
from ds_ext.trainer.recipe import RecipeError, load_recipe

BASE = {"name": "mine", "model": {"name": "digits_cnn", "width": 8, "hidden": 16}, "data": {"name": "digits"},
        "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 1, "global_batch_size": 64,
                                                        "micro_batch_size": 16}}


def _recipe(tmp_path, cfg, **extra) -> tuple:
    (tmp_path / "ds_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    raw = {**BASE, "deepspeed_config": "ds_config.json", **extra}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "r.yaml"


def _errors(path, *sets) -> str:
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, list(sets))
    return str(ei.value)


def test_the_file_is_the_deepspeed_section_and_its_ds_ext_block_the_method(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # a relative path is found beside the recipe too
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto",
           "zero_optimization": {"stage": 1}, "bf16": {"enabled": False}, "steps_per_print": 50,
           "ds_ext": {"reducer": {"name": "powersgd", "rank": 2}, "sync": "none"}}
    r = load_recipe(_recipe(tmp_path, cfg))
    assert r.method.reducer.name == "powersgd" and r.method.reducer.options.rank == 2
    assert r.deepspeed == {"zero_optimization": {"stage": 1}, "bf16": {"enabled": False}, "steps_per_print": 50}
    ds = deepspeed_config(r, 2)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2 and "ds_ext" not in ds
    assert ds["zero_optimization"] == {"stage": 1} and ds["steps_per_print"] == 50
    same = load_recipe(_recipe(tmp_path, cfg, deepspeed={"zero_optimization": {"stage": 1}}))
    assert same.deepspeed["zero_optimization"] == {"stage": 1}  # set alike in both: no conflict


def test_conflicts_are_named_with_the_reason(tmp_path):
    cfg = {"train_batch_size": 128, "zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.01, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                        "warmup_num_steps": 100}},
           "gradient_clipping": "auto", "ds_ext": {"reducer": "topk"}}
    text = _errors(_recipe(tmp_path, cfg, method={"reducer": {"name": "acpsgd"}},
                           deepspeed={"zero_optimization": {"stage": 1}}))
    f = tmp_path / "ds_config.json"
    lines = text.splitlines()
    assert f"train.global_batch_size: 64 in the recipe, train_batch_size 128 in {f}" in text
    assert f"deepspeed.zero_optimization.stage: 1 in the recipe, 2 in {f}: set it in one place" in text
    assert "gradient_accumulation_steps follows from train.global_batch_size" in text
    assert ("optimizer: ds_ext builds the optimizer from the recipe" in text
            and "optimizer: {name: adamw, lr: 0.001, weight_decay: 0.01} (no ds_ext equivalent for torch_adam)" in text)
    assert "scheduler: ds_ext's LR schedule is the recipe's schedule section" in text
    assert "schedule: {name: constant, warmup_steps: 100, min_lr: 0} and optimizer.lr: 0.001" in text
    assert f"deepspeed.gradient_clipping: \"auto\" in {f} is a Hugging Face Trainer placeholder" in text
    assert f"method: {f} has a ds_ext block and the recipe a method section" in text
    assert len(lines) == 7 and all(ln.startswith(str(tmp_path / "r.yaml")) for ln in lines)


def test_bad_files_and_bad_blocks(tmp_path):
    assert "not JSON (Expecting" in _errors(_recipe(tmp_path, "{oops"))
    assert "a DeepSpeed config is a JSON object (got list)" in _errors(_recipe(tmp_path, "[1]"))
    r = _recipe(tmp_path, {})
    (tmp_path / "ds_config.json").unlink()
    assert "ds_config.json: cannot be read (No such file or directory)" in _errors(r)
    text = _errors(_recipe(tmp_path, {"ds_ext": {"reducer": {"name": "powersgd", "rnk": 2}}}))
    assert "method.reducer.rnk: unknown option for reducer 'powersgd'; allowed: " in text
    assert "deepspeed_config: must be the path" in _errors(_recipe(tmp_path, {}), "deepspeed_config=3")


def test_set_wins_over_the_file_and_equivalent_spellings_agree(tmp_path):
    """A ``--set`` value replaces the file's instead of conflicting; ``{reducer: x}`` in the file equals
    ``{reducer: {name: x}}`` in the recipe; a nested ``"auto"`` is found; DeepSpeed's Adam is AdamW unless
    ``adam_w_mode`` is false."""
    cfg = {"zero_optimization": {"stage": 2}, "ds_ext": {"reducer": "topk"}}
    r = load_recipe(_recipe(tmp_path, cfg, deepspeed={"zero_optimization": {"stage": 1}}),
                    ["deepspeed.zero_optimization.stage=1", "method.reducer={name: acpsgd}"])
    assert r.deepspeed["zero_optimization"]["stage"] == 1 and r.method.reducer.name == "acpsgd"
    same = load_recipe(_recipe(tmp_path, cfg, method={"reducer": {"name": "topk"}}))
    assert same.method.reducer.name == "topk"
    text = _errors(_recipe(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "auto"}}}))
    assert "deepspeed.zero_optimization: \"auto\"" in text
    adam = {"optimizer": {"type": "Adam", "params": {"lr": 0.001, "weight_decay": 0.01}}}
    assert "optimizer: {name: adamw, lr: 0.001, weight_decay: 0.01}" in _errors(_recipe(tmp_path, adam))
    adam["optimizer"]["params"]["adam_w_mode"] = False
    assert "optimizer: {name: adam, lr: 0.001, weight_decay: 0.01}" in _errors(_recipe(tmp_path, adam))
