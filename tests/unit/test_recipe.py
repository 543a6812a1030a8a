"""Recipe schema: every bad-recipe case is refused before training with a named error."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ds_ext.trainer.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def quick():
    return yaml.safe_load(QUICK.read_text())


def problems(path, overrides=(), host=None):
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, overrides, host)
    return str(ei.value), ei.value.problems


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    load_recipe(recipe)


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    d = quick()
    d["train"]["epocs"] = 3
    p = write(tmp_path, d)
    msg, probs = problems(p)
    assert probs[0][0] == "train.epocs"
    assert str(p) in msg and "unknown key" in msg and "epochs" in msg and "global_batch_size" in msg


def test_unknown_top_level_section(tmp_path):
    d = quick()
    d["optimiser"] = {}
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "optimiser" and "allowed keys" in msg and "optimizer" in msg


def test_wrong_type(tmp_path):
    d = quick()
    d["train"]["epochs"] = "many"
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "train.epochs" and "integer" in msg and "'many'" in msg


def test_unknown_method_name_lists_allowed(tmp_path):
    d = quick()
    d["method"]["reducer"] = {"name": "powersgdd"}
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "method.reducer.name"
    assert "unknown reducer 'powersgdd'" in msg and "allreduce" in msg and "deepspeed" in msg


def test_unknown_method_option(tmp_path):
    d = quick()
    d["method"]["reducer"] = {"name": "allreduce", "bucket_size": 3}
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "method.reducer.bucket_size" and "allowed: bucket_mb" in msg


def test_bad_method_option_value(tmp_path):
    d = quick()
    d["method"]["reducer"] = {"name": "allreduce", "bucket_mb": -1}
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "method.reducer.bucket_mb" and "greater than 0" in msg


def test_unknown_model_and_option(tmp_path):
    d = quick()
    d["model"] = {"name": "digits_cnn", "widht": 3}
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "model.widht" and "width" in msg


def test_global_batch_not_divisible(tmp_path):
    r = load_recipe(QUICK, ["train.global_batch_size=48"])
    assert r.batch_plan(1) == (16, 3)
    with pytest.raises(RecipeError) as ei:
        r.batch_plan(2)
    assert ei.value.problems[0][0] == "train.global_batch_size"
    assert "48 is not divisible by world size x micro batch = 2 x 16 = 32" in str(ei.value)
    assert str(QUICK) in str(ei.value)


def test_set_overrides_and_marks_origin():
    r = load_recipe(QUICK, ["train.epochs=3", "optimizer.lr=0.5", "method.reducer.bucket_mb=1"])
    assert r.train.epochs == 3 and r.optimizer.options.lr == 0.5 and r.method.reducer.options.bucket_mb == 1
    msg, probs = problems(QUICK, ["train.epoch=3"])
    assert probs[0][0] == "train.epoch" and "[from --set train.epoch=3]" in msg
    msg, probs = problems(QUICK, ["train.epochs=x"])
    assert "[from --set train.epochs=x]" in msg
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(QUICK, ["train.epochs"])


def test_deepspeed_owned_keys_refused(tmp_path):
    d = quick()
    d["deepspeed"]["train_batch_size"] = 64
    msg, probs = problems(write(tmp_path, d))
    assert probs[0][0] == "deepspeed" and "train.global_batch_size" in msg


def test_incompatible_combinations(tmp_path):
    assert load_recipe(QUICK, ["deepspeed.zero_optimization.stage=2"]).zero_stage() == 2  # every reducer: 0-2
    msg, probs = problems(QUICK, ["deepspeed.zero_optimization.stage=3"])
    assert "works with ZeRO stage 0, 1 or 2 (got 3)" in msg and probs[0][0] == "deepspeed.zero_optimization.stage"
    msg, probs = problems(QUICK, ["deepspeed.zero_optimization={stage: 1, offload_optimizer: {device: cpu}}"])
    assert "offload_optimizer" in msg and probs[0][0] == "deepspeed.zero_optimization.offload_optimizer"
    msg, probs = problems(QUICK, ["deepspeed.zero_optimization.stage=1", "method.reducer={name: none}",
                                  "method.sync={name: local, h: 4}"])
    assert "needs ZeRO stage 0 (got 1)" in msg and "no local step could exist" in msg
    assert probs == [("deepspeed.zero_optimization.stage", probs[0][1])]
    r = load_recipe(QUICK, ["deepspeed.zero_optimization.stage=1", "method.reducer={name: deepspeed}"])
    assert r.zero_stage() == 1 and r.method.reducer.name == "deepspeed"
    msg, probs = problems(QUICK, ["method.reducer.name=deepspeed"])
    assert probs[0][0] == "method.reducer.bucket_mb" and "--set 'method.reducer={name: deepspeed}'" in msg
    msg, probs = problems(QUICK, ["method.reducer={name: none}"])
    assert "never communicates" in msg


def test_host_config_paths(tmp_path):
    host = tmp_path / ".config_test.yml"
    host.write_text(yaml.safe_dump({"data_root": "/data/imagenet", "log_root": str(tmp_path / "logs")}))
    r = load_recipe(QUICK, [], str(host))
    assert r.data.root == "/data/imagenet"
    assert r.log.dir == str(tmp_path / "logs" / "quickstart")
    assert r.checkpoint.dir == str(tmp_path / "logs" / "quickstart" / "checkpoints")
    host.write_text(yaml.safe_dump({"data_rot": "/x"}))
    msg, probs = problems(QUICK, [], str(host))
    assert str(host) in msg and probs[0][0] == "data_rot" and "data_root" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    msg, _ = problems(tmp_path / "nope.yaml")
    assert "recipe file not found" in msg
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    msg, _ = problems(p)
    assert "not valid YAML" in msg


def _check(*args):
    return subprocess.run([sys.executable, "-m", "ds_ext.train", "--check", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_check_cli_exit_codes(tmp_path):
    ok = _check("--recipe", str(QUICK), "--world-size", "2")
    assert ok.returncode == 0, ok.stderr
    assert "micro batch 16 x accumulation 2" in ok.stdout
    bad = _check("--recipe", str(QUICK), "--world-size", "3")
    assert bad.returncode == 2 and "train.global_batch_size" in bad.stderr
    bad = _check("--recipe", str(QUICK), "--set", "method.reducer.name=nope")
    assert bad.returncode == 2 and "method.reducer.name: unknown reducer 'nope'" in bad.stderr


def test_check_cli_refuses_alias_bomb_and_seed(tmp_path):
    """A YAML alias bomb (9 levels of 9 aliases: 387 million values once expanded) and a seed past 2**31 - 1
    exit 2 at --check with one line naming the file and the key; the bomb is never expanded."""
    d = quick()
    del d["deepspeed"]
    lines = ["deepspeed:", "  zero_optimization: {stage: 0}", '  l0: &l0 "lol"']
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    p = tmp_path / "bomb.yaml"
    p.write_text(yaml.safe_dump(d) + "\n".join(lines) + "\n")
    bad = _check("--recipe", str(p))
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.splitlines()[1:] == [f"{p}: deepspeed: expands to more than 100,000 values through YAML aliases "
                                           f"(*name repeating an &name anchor); refused without expanding it"]
    bad = _check("--recipe", str(QUICK), "--set", "train.seed=2147483648")
    assert bad.returncode == 2, bad.stderr
    assert f"{QUICK}: train.seed: Input should be less than or equal to 2147483647" in bad.stderr
