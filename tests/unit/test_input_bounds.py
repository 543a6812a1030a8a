"""Input bounds from the reliability audit: values that passed ``--check`` and failed only after start-up.

* new recipe fields (``checkpoint.integrity``, ``checkpoint.on_signal``, ``train.max_consecutive_skips``):
  defaults, allowed values, refusals, and free to change on resume;
* ``train.seed`` in [0, 2**31 - 1] and ``train.collective_timeout_s`` from 1 s to 7 days, refused when the
  recipe is read (2**100 overflowed in torch.manual_seed, 1e300 in init_distributed, 1e-9 was a 0 ms timeout);
* YAML alias bombs ("billion laughs") in the recipe, in a ``--set`` value and in the per-host file: refused
  without being expanded (a 9 x 9 bomb is 387 million values once expanded);
* ``DS_EXT_OPS`` checked by the trainer's preflight (before any process group), not at the first step;
* ``Progress.write`` prints the trainer's messages with the progress display off (``console``).
"""
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ds_ext.trainer.loop as trainer
import ds_ext.trainer.rng as trainer_rng
from ds_ext.trainer import cli
from ds_ext import ops
from ds_ext.trainer.checkpoint import resume_fields
from ds_ext.trainer.records import Progress
from ds_ext.trainer.recipe import (
    COLLECTIVE_TIMEOUT_MAX_S, SEED_MAX, YAML_MAX_CHARS, YAML_MAX_VALUES, CheckpointSection, RecipeError,
    TrainSection, environment_problems, load_recipe, preflight)
from ds_ext.trainer.recipe.load import _expansion_problem

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"



def refusal(path, overrides=(), host=None):
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, overrides, host)
    return ei.value


def bomb(levels=9, width=9, indent="  ", leaf='"lol"'):
    """YAML lines of a billion-laughs structure: ``l<levels>`` expands to width**levels leaves."""
    lines = [f"{indent}l0: &l0 {leaf}"]
    for i in range(1, levels + 1):
        lines.append(f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return lines


def recipe_text(**replace_sections):
    """The quickstart recipe as YAML text, with whole sections replaced by the given YAML lines."""
    d = yaml.safe_load(QUICK.read_text())
    for k in replace_sections:
        d.pop(k, None)
    text = yaml.safe_dump(d, sort_keys=False)
    for k, lines in replace_sections.items():
        text += f"{k}:\n" + "\n".join(lines) + "\n"
    return text


# ---- new fields --------------------------------------------------------------------------------------

def test_new_fields_defaults_and_descriptions(host):
    r = load_recipe(QUICK, (), host)
    assert r.checkpoint.integrity == "hash" and r.checkpoint.on_signal == "save"
    assert r.train.max_consecutive_skips == 20
    for cls, name, words in [(CheckpointSection, "integrity", ("sha-256", "size", "nothing")),
                             (CheckpointSection, "on_signal",
                              ("SIGTERM", "SIGUSR1", "SIGINT", "75", "143", "138", "130")),
                             (TrainSection, "max_consecutive_skips", ("exit 8", "non-finite", "0 = no limit"))]:
        text = cls.model_fields[name].description or ""
        assert all(w.lower() in text.lower() for w in words), (name, text)


@pytest.mark.parametrize("setting", ["checkpoint.integrity=size", "checkpoint.integrity=off",
                                     "checkpoint.on_signal=exit", "train.max_consecutive_skips=0",
                                     "train.max_consecutive_skips=1000"])
def test_new_fields_accept(host, setting):
    key, value = setting.split("=")
    section, name = key.split(".")
    r = load_recipe(QUICK, [setting], host)
    assert str(getattr(getattr(r, section), name)) == value


@pytest.mark.parametrize("setting, fragment", [
    ("checkpoint.integrity=md5", "'hash', 'size' or 'off'"), ("checkpoint.integrity=true", "'hash', 'size' or 'off'"),
    ("checkpoint.integrity=0", "'hash', 'size' or 'off'"), ("checkpoint.on_signal=false", "'save' or 'exit'"),
    ("checkpoint.on_signal=ignore", "'save' or 'exit'"),
    ("train.max_consecutive_skips=-1", "greater than or equal to 0"),
    ("train.max_consecutive_skips=1.5", "integer"), ("train.max_consecutive_skips=true", "boolean"),
])
def test_new_fields_refuse(host, setting, fragment):
    err = refusal(QUICK, [setting], host)
    key = setting.split("=")[0]
    assert [k for k, _ in err.problems] == [key] and fragment in str(err), str(err)
    assert len(str(err).splitlines()) == 1


def test_integrity_off_written_bare_in_yaml(tmp_path, host):
    """``integrity: off`` unquoted is YAML's false; it means 'off' (true stays refused)."""
    p = tmp_path / "r.yaml"
    p.write_text(recipe_text(checkpoint=["  every_epochs: 4", "  integrity: off"]))
    assert load_recipe(p, (), host).checkpoint.integrity == "off"
    assert load_recipe(QUICK, ["checkpoint.integrity='off'"], host).checkpoint.integrity == "off"


def test_new_fields_are_free_on_resume(host):
    """A resumed run may change them: they are not among the fields a checkpoint pins."""
    a = load_recipe(QUICK, (), host)
    b = load_recipe(QUICK, ["checkpoint.integrity=off", "checkpoint.on_signal=exit",
                            "train.max_consecutive_skips=3"], host)
    fa, fb = resume_fields(a, 2), resume_fields(b, 2)
    assert fa == fb
    assert not [k for k in fa if k.endswith(("integrity", "on_signal", "max_consecutive_skips"))]


# ---- train.seed and train.collective_timeout_s ---------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, SEED_MAX])
def test_seed_bounds_accepted(host, seed):
    assert load_recipe(QUICK, [f"train.seed={seed}"], host).train.seed == seed


@pytest.mark.parametrize("seed, fragment", [(-1, "greater than or equal to 0"),
                                            (2**31, "less than or equal to 2147483647"),
                                            (2**64, "less than or equal to 2147483647"),
                                            (2**100, "less than or equal to 2147483647")])
def test_seed_bounds_refused(host, seed, fragment):
    err = refusal(QUICK, [f"train.seed={seed}"], host)
    assert [k for k, _ in err.problems] == ["train.seed"] and fragment in str(err), str(err)


def test_max_seed_is_usable_everywhere_it_flows():
    """Every seed the trainer derives from train.seed (ds_ext/trainer/rng.py: ``seed_all(seed)``,
    ``seed_all(seed + 1 + rank)``, the order's ``seeded_generator``, the loader seed
    ``(seed * 1_000_003 + epoch) * 4099 + rank``) is accepted at the maximum seed, for a large epoch and
    rank. Before the bound, 2**100 raised "Overflow when unpacking long long" there. (The slow test below
    runs the trainer itself.)"""
    from ds_ext.data.base import make_loader
    from ds_ext.order.base import seeded_generator

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        trainer_rng.seed_all(SEED_MAX)
        trainer_rng.seed_all(SEED_MAX + 1 + 4095)
        with pytest.raises((ValueError, OverflowError, RuntimeError)):
            trainer_rng.seed_all(2**100)  # what the bound keeps out
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    seeded_generator(SEED_MAX, 10**6, 4095)
    loader_seed = (SEED_MAX * 1_000_003 + 10**6) * 4099 + 4095
    assert loader_seed < 2**63
    batches = list(make_loader(list(range(8)), range(8), 4, seed=loader_seed))
    assert len(batches) == 2


@pytest.mark.slow
def test_trainer_runs_with_the_max_seed(tmp_path, host):
    """The trainer itself, one process (world 1), 2 steps, with train.seed = 2**31 - 1 (about 70 s here)."""
    p = subprocess.run([sys.executable, "-m", "ds_ext.train", "--recipe", str(QUICK), "--host-config", host,
                        "--set", f"train.seed={SEED_MAX}", "--set", "train.epochs=1",
                        "--set", "train.steps_per_epoch=2",
                        "--set", f"log.dir={tmp_path / 'run'}", "--set", "log.wandb.mode=disabled"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("value", [1, 600, COLLECTIVE_TIMEOUT_MAX_S])
def test_collective_timeout_accepted(host, value):
    assert load_recipe(QUICK, [f"train.collective_timeout_s={value}"], host).train.collective_timeout_s == value


@pytest.mark.parametrize("value, fragment", [("604800.5", "less than or equal to 604800"),
                                             ("1.0e+300", "less than or equal to 604800"),
                                             ("0", "greater than or equal to 1"),
                                             ("1e-9", "greater than or equal to 1"),
                                             (".inf", "finite"), (".nan", "finite")])
def test_collective_timeout_refused(host, value, fragment):
    err = refusal(QUICK, [f"train.collective_timeout_s={value}"], host)
    assert [k for k, _ in err.problems] == ["train.collective_timeout_s"] and fragment in str(err), str(err)
    assert len(str(err).splitlines()) == 1


@pytest.mark.parametrize("setting, key", [(f"train.seed={2**100}", "train.seed"),
                                          ("train.collective_timeout_s=1.0e+300", "train.collective_timeout_s")])
def test_check_exits_2_naming_the_key(host, capsys, setting, key):
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host, "--set", setting, "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{QUICK}: {key}: " in err and "Traceback" not in err


# ---- YAML alias bombs -------------------------------------------------------------------------------

def test_alias_bomb_in_deepspeed_is_refused_fast(tmp_path, host):
    p = tmp_path / "bomb.yaml"
    p.write_text(recipe_text(deepspeed=["  zero_optimization: {stage: 0}"] + bomb()))
    t0 = time.perf_counter()
    err = refusal(p, (), host)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed  # expanding it would take minutes and tens of GiB
    msg = str(err)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"{p}: deepspeed: expands to more than {YAML_MAX_VALUES:,} values"), msg
    assert "YAML aliases" in msg


def test_alias_bomb_walk_is_bounded():
    data = yaml.safe_load("\n".join(bomb(levels=12, width=10, indent="")))  # 10**12 values when expanded
    t0 = time.perf_counter()
    key, msg = _expansion_problem(data)
    assert time.perf_counter() - t0 < 1.0
    assert key.startswith("l") and f"more than {YAML_MAX_VALUES:,} values" in msg


@pytest.mark.parametrize("section, lines", [
    ("model", ["  name: digits_cnn", "  width: 16"] + bomb()),  # unknown option keys, refused by size first
    ("log", ["  every_steps: 5", "  wandb: {mode: disabled}"] + bomb()),
    ("data", ["  name: digits"] + bomb()),
])
def test_alias_bomb_in_any_section(tmp_path, host, section, lines):
    p = tmp_path / "bomb.yaml"
    p.write_text(recipe_text(**{section: lines}))
    err = refusal(p, (), host)
    assert str(err).startswith(f"{p}: {section}: expands to more than {YAML_MAX_VALUES:,} values"), str(err)
    assert len(str(err).splitlines()) == 1


def test_alias_bomb_at_top_level(tmp_path, host):
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(bomb(indent="")) + "\n" + recipe_text())
    err = refusal(p, (), host)
    assert str(err).startswith(f"{p}: l9: expands to more than {YAML_MAX_VALUES:,} values"), str(err)


def test_alias_bomb_in_set_value(host):
    value = "{" + ", ".join(bomb(indent="")) + "}"  # a flow mapping on one line
    err = refusal(QUICK, [f"deepspeed.extra={value}"], host)
    assert err.source == "--set" and [k for k, _ in err.problems] == ["deepspeed.extra"], str(err)
    assert f"value expands to more than {YAML_MAX_VALUES:,} values" in str(err)


def test_alias_bomb_in_host_file(tmp_path):
    hp = tmp_path / "host.yml"
    hp.write_text("\n".join(["log_root: " + str(tmp_path / "logs")] + bomb(indent="")) + "\n")
    err = refusal(QUICK, (), str(hp))
    assert str(err).startswith(f"{hp}: l9: expands to more than {YAML_MAX_VALUES:,} values"), str(err)


def test_self_referencing_structure(tmp_path, host):
    p = tmp_path / "cycle.yaml"
    p.write_text(recipe_text(deepspeed=["  zero_optimization: {stage: 0}", "  loop: &loop {again: *loop}"]))
    err = refusal(p, (), host)
    assert f"{p}: deepspeed: contains itself through a YAML alias" in str(err), str(err)


def test_string_bomb(tmp_path, host):
    """A long string repeated through aliases: few values, but gigabytes of text once serialised."""
    p = tmp_path / "text.yaml"
    s = "x" * 100_000
    p.write_text(recipe_text(deepspeed=["  zero_optimization: {stage: 0}", f"  s: &s {s}",
                                        "  many: [" + ", ".join(["*s"] * 200) + "]"]))
    err = refusal(p, (), host)
    assert f"more than {YAML_MAX_CHARS:,} characters through YAML aliases" in str(err), str(err)


def test_large_document_without_aliases():
    key, msg = _expansion_problem({"a": list(range(YAML_MAX_VALUES + 10))})
    assert key == "a" and "YAML aliases" not in msg and "a recipe needs far fewer" in msg


def test_ordinary_anchors_are_accepted(tmp_path, host):
    """Anchors used as intended (a block shared a few times, a merge key) stay allowed."""
    p = tmp_path / "anchors.yaml"
    p.write_text(recipe_text(deepspeed=["  zero_optimization: &zero {stage: 0}", "  comms_logger: {enabled: false}",
                                        "  flops_profiler: {<<: *zero, enabled: false}"],
                             log=["  every_steps: 5", "  wandb: {mode: disabled, tags: &tags [a, b]}",
                                  "  dir: null"]))
    r = load_recipe(p, ["log.wandb={<<: {mode: disabled}, tags: [q, q]}"], host)
    assert r.zero_stage() == 0 and r.log.wandb.tags == ["q", "q"]
    assert r.deepspeed["flops_profiler"] == {"stage": 0, "enabled": False}


@pytest.mark.parametrize("check", [True, False], ids=["--check", "run"])
def test_alias_bomb_exit_code(tmp_path, host, capsys, monkeypatch, check):
    started = []
    monkeypatch.setattr(trainer, "train", lambda recipe: started.append(recipe) or 0)
    p = tmp_path / "bomb.yaml"
    p.write_text(recipe_text(deepspeed=["  zero_optimization: {stage: 0}"] + bomb()))
    assert cli.train_main(["--recipe", str(p), "--host-config", host] + (["--check"] if check else [])) == 2
    err = capsys.readouterr().err
    assert f"{p}: deepspeed: expands to more than" in err and not started


# ---- DS_EXT_OPS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "", "  ", "auto", "compiled", "torch", " Torch ", "AUTO"])
def test_ops_mode_problem_accepts(value):
    assert ops.mode_problem(value) is None


@pytest.mark.parametrize("value", ["bogus", "cuda", "compile", "0"])
def test_ops_mode_problem_refuses(value, monkeypatch):
    msg = ops.mode_problem(value)
    assert msg and repr(value) in msg and "auto, compiled, torch" in msg
    monkeypatch.setenv(ops.ENV, value)
    with pytest.raises(ValueError, match=f"{ops.ENV}: {value!r}"):
        ops.mode()


def test_preflight_refuses_bad_ds_ext_ops(host):
    r = load_recipe(QUICK, (), host)
    assert environment_problems({}) == []
    preflight(r, 1, environ={ops.ENV: "torch"})
    with pytest.raises(RecipeError) as ei:
        preflight(r, 1, environ={ops.ENV: "bogus"})
    assert str(ei.value) == ("environment: DS_EXT_OPS: 'bogus' is not a kernel mode; allowed: auto, compiled, torch "
                             "(unset or empty: auto)")


def test_run_refuses_bad_ds_ext_ops_before_training(host, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(trainer, "train", lambda recipe: started.append(recipe) or 0)
    monkeypatch.setenv(ops.ENV, "bogus")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host]) == 2
    assert not started
    err = capsys.readouterr().err
    assert "recipe error:" in err and "DS_EXT_OPS: 'bogus'" in err and "auto, compiled, torch" in err
    monkeypatch.setenv(ops.ENV, "torch")  # the control: a valid value gets to train()
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host]) == 0 and len(started) == 1


# ---- Progress.write -----------------------------------------------------------------------------------

@pytest.mark.parametrize("enabled, console, printed", [
    (False, True, True), (False, None, False), (True, None, True), (True, False, False), (False, False, False),
])
def test_progress_write_console(capsys, enabled, console, printed):
    bar = Progress(10, 0, enabled=enabled, console=console)
    bar.write("[ds_ext] checkpoint /x/step_0000002")
    bar.close()
    out = capsys.readouterr()
    assert out.out == ""
    assert ("[ds_ext] checkpoint /x/step_0000002\n" in out.err) == printed, out.err


def test_progress_write_through_the_bar(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = Progress(10, 0, enabled=True, console=True)
    assert bar.bar is not None
    bar.update(1, loss="1.0")
    bar.write("[ds_ext] epoch 1/1 step 1: val acc 0.5000 loss 1.0000")
    bar.close()
    assert "[ds_ext] epoch 1/1 step 1: val acc 0.5000 loss 1.0000\n" in capsys.readouterr().err


def test_progress_default_is_unchanged(capsys):
    """Without ``console``, messages follow ``enabled`` as before (other ranks: nothing)."""
    Progress(10, 0, enabled=False).write("hidden")
    Progress(10, 0, enabled=True).write("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown\n" in err
