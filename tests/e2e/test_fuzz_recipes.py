"""Bad input, fuzzed (issue 9, item 5): malformed recipes, per-host files, world sizes and paths are
refused before any process group starts, with a message naming the file and the key, never a traceback.

Three layers, the first in this file, the others in ``tests/e2e/test_recipe_refusals.py``:

* property-based cases (``hypothesis``, fixed profile ``FUZZ``: derandomized, so CI draws the same
  inputs every time) on files written to a temporary directory and read by ``load_recipe`` in-process:
  wrong types, unknown keys and names, out-of-range values, batch arithmetic / dssync groups / exdyna
  blocks against the world size (checked against an exact reference), method combinations against the
  documented rules, and arbitrary YAML values, texts, bytes, per-host files and ``--set`` strings that
  must never escape as anything but ``RecipeError``;
* hand-written cases for what the generators do not reach (deepspeed keys ds_ext reads, files that are
  not UTF-8 or nested too deeply, missing data files, unusable log / checkpoint paths, the world size
  from ``--world-size`` or ``$WORLD_SIZE``), and the known gaps that need an option check in another
  module (``GAPS``: found by this file, fixed in those modules' option models);
* ``python -m ds_ext.train --recipe bad.yaml`` subprocesses with the environment the DeepSpeed launcher
  gives a rank (``RANK=1``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) pointing at a socket this
  test listens on: a rank that started a process group would connect to it (rank 1 dials rank 0's
  store). Every bad recipe exits 2 (3 for missing data) with the file and key on stderr, no
  "Traceback", and nothing connected; a valid recipe with the same environment does connect (the
  control that shows the check can fail).
"""
from __future__ import annotations

import copy
import math
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from ds_ext.trainer.recipe import Recipe, RecipeError, load_recipe
from ds_ext.registry import DATASETS, MODELS, OPTIMIZERS, ORDERS, REDUCERS, SYNCS, load_builtin

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"

# The fixed profile: the same inputs on every run (derandomize), no per-example deadline (the machine is
# shared), no example database. MAX_EXAMPLES per property; DS_EXT_FUZZ_EXAMPLES=N fuzzes deeper by hand.
MAX_EXAMPLES = int(os.environ.get("DS_EXT_FUZZ_EXAMPLES", "50"))
FUZZ = settings(derandomize=True, deadline=None, max_examples=MAX_EXAMPLES, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])

load_builtin()


# ---- helpers ----------------------------------------------------------------------------------------

def base() -> dict:
    """The quickstart recipe with a few more keys spelled out, so that mutations have leaves to hit."""
    d = yaml.safe_load(QUICK.read_text())
    d["optimizer"]["nesterov"] = False
    d["schedule"]["decay_points"] = []
    d["schedule"]["gamma"] = 0.1
    d["train"]["label_smoothing"] = 0.0
    d["train"]["collective_timeout_s"] = 600.0
    d["train"]["max_consecutive_skips"] = 20
    d["checkpoint"]["integrity"] = "hash"
    d["checkpoint"]["on_signal"] = "save"
    d["log"]["progress"] = True
    d["data"]["num_workers"] = 0
    d["data"]["split_seed"] = 0
    d["model"]["dropout"] = 0.0
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory for the fuzzed files and an empty per-host file (so a .config_<hostname>.yml on this
    machine cannot leak into the cases), with log_root inside the directory."""
    d = tmp_path_factory.mktemp("fuzz")
    host = d / "host.yml"
    host.write_text(yaml.safe_dump({"log_root": str(d / "logs")}))
    return d, host


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)  # keys may mix ints and strings


def set_path(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load(work, data, name="r.yaml", overrides=(), text=None, raw=None):
    d, host = work
    path = d / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(dump(data) if text is None else text, encoding="utf-8")
    return path, load_recipe(path, overrides, str(host))


def refused(work, data=None, *, world=None, name="r.yaml", overrides=(), text=None, raw=None, host=None):
    """Load (and check against ``world``); the refusal must be a RecipeError naming the recipe file
    (or ``host``, the per-host file at fault). Any other exception fails the test as it is."""
    d, default_host = work
    path = d / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(dump(data) if text is None else text, encoding="utf-8")
    with pytest.raises(RecipeError) as ei:
        r = load_recipe(path, overrides, str(host or default_host))
        if world is not None:
            r.check_world(world)
    err = ei.value
    named = str(host) if host is not None else str(path)
    assert named in str(err), str(err)
    assert err.problems, str(err)
    assert "Traceback" not in str(err)
    return err


def keys(err: RecipeError):
    return [k for k, _ in err.problems]


def under(err: RecipeError, prefix: str) -> bool:
    """Every problem is about ``prefix`` or one of its sub-keys."""
    return all(k == prefix or k.startswith(prefix + ".") for k in keys(err))


# ---- value strategies -------------------------------------------------------------------------------

# words YAML or pydantic would read as a number, a boolean or null
_WORDS = {"inf", "infinity", "nan", "true", "false", "yes", "no", "on", "off", "y", "n", "t", "f", "null", "none"}
letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=10).filter(lambda s: s.lower() not in _WORDS)
fractional = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False).filter(
    lambda x: x != int(x))
small_lists = st.lists(st.integers(-5, 5), max_size=3)
small_dicts = st.dictionaries(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=5), st.integers(),
                              max_size=2)
WRONG = {
    "int": st.one_of(st.none(), st.booleans(), fractional, letters, small_lists, small_dicts),
    "int?": st.one_of(st.booleans(), fractional, letters, small_lists, small_dicts),
    "float": st.one_of(st.none(), st.booleans(), letters, small_lists, small_dicts),
    "str": st.one_of(st.none(), st.booleans(), st.integers(), fractional, small_lists, small_dicts),
    "str?": st.one_of(st.booleans(), st.integers(), fractional, small_lists, small_dicts),
    "bool": st.one_of(st.none(), st.integers().filter(lambda i: i not in (0, 1)), fractional.filter(
        lambda x: x not in (0.0, 1.0)), letters, small_lists, small_dicts),
    "literal": st.one_of(st.none(), letters.filter(lambda s: s not in {"constant", "cosine", "step", "linear",
                                                                        "offline", "online", "disabled", "hash",
                                                                        "size", "save", "exit"}),
                         st.integers(), small_lists),
    "section": st.one_of(st.none(), st.booleans(), st.integers(), letters, small_lists),
    "list": st.one_of(st.none(), st.booleans(), st.integers(), letters, small_dicts),
}

# dotted key in base() -> expected kind ("?": null is a valid value there)
FIELDS = {
    "name": "str?", "description": "str?",
    "model": "section", "model.name": "str", "model.width": "int", "model.hidden": "int", "model.dropout": "float",
    "data": "section", "data.name": "str", "data.val_fraction": "float", "data.split_seed": "int",
    "data.num_workers": "int", "data.root": "str?", "data.eval_micro_batch_size": "int?",
    "optimizer": "section", "optimizer.name": "str", "optimizer.lr": "float", "optimizer.momentum": "float",
    "optimizer.weight_decay": "float", "optimizer.nesterov": "bool",
    "schedule": "section", "schedule.name": "literal", "schedule.warmup_epochs": "float", "schedule.min_lr": "float",
    "schedule.decay_points": "list", "schedule.gamma": "float", "schedule.warmup_steps": "int?",
    "train": "section", "train.epochs": "int", "train.global_batch_size": "int", "train.micro_batch_size": "int",
    "train.seed": "int", "train.check_consistency_every": "int", "train.label_smoothing": "float",
    "train.collective_timeout_s": "float", "train.steps_per_epoch": "int?", "train.stop_at_step": "int?",
    "train.max_consecutive_skips": "int",
    "method": "section", "method.reducer": "section", "method.reducer.name": "str", "method.reducer.bucket_mb": "float",
    "method.sync": "section", "method.sync.name": "str", "method.order": "section", "method.order.name": "str",
    "deepspeed": "section", "deepspeed.zero_optimization": "section", "deepspeed.zero_optimization.stage": "int",
    "log": "section", "log.every_steps": "int", "log.progress": "bool", "log.dir": "str?",
    "log.wandb": "section", "log.wandb.mode": "literal", "log.wandb.project": "str", "log.wandb.tags": "list",
    "checkpoint": "section", "checkpoint.every_epochs": "int", "checkpoint.every_steps": "int", "checkpoint.keep": "int",
    "checkpoint.dir": "str?", "checkpoint.integrity": "literal", "checkpoint.on_signal": "literal",
}
wrong_typed = st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), WRONG[FIELDS[k]]))


def _allowed_keys(section: str, d: dict) -> set:
    """Keys a section of base() accepts: its schema fields, or name + the registry entry's options."""
    named = {"model": MODELS, "data": DATASETS, "optimizer": OPTIMIZERS, "method.reducer": REDUCERS,
             "method.sync": SYNCS, "method.order": ORDERS}
    if section in named:
        node = d
        for p in section.split("."):
            node = node[p]
        extra = {"root", "num_workers", "eval_micro_batch_size"} if section == "data" else set()
        return {"name"} | set(named[section].get(node["name"]).options.model_fields) | extra
    cls = Recipe
    for p in [p for p in section.split(".") if p]:
        cls = cls.model_fields[p].annotation
    return set(cls.model_fields)


SECTIONS = ["", "model", "data", "optimizer", "schedule", "train", "method", "method.reducer", "method.sync",
            "method.order", "log", "log.wandb", "checkpoint"]
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True)

# arbitrary YAML values: scalars of every type (inf/nan included), nested lists and maps with string or
# integer keys
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(),
                         st.text(max_size=12), st.dates())
yaml_values = st.recursive(yaml_scalars, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-3, 3)), c, max_size=4)),
    max_leaves=10)


def _paths(d, prefix=""):
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.append(key)
        if isinstance(v, dict):
            out += _paths(v, key)
    return out


ALL_PATHS = sorted(_paths(base()))


# ---- properties -------------------------------------------------------------------------------------

@FUZZ
@given(case=wrong_typed)
def test_fuzz_wrong_type_names_the_key(work, case):
    key, value = case
    d = base()
    set_path(d, key, value)
    err = refused(work, d)
    assert under(err, key), (key, value, err.problems)


@FUZZ
@given(section=st.sampled_from(SECTIONS), data=st.data())
def test_fuzz_unknown_key_names_the_key(work, section, data):
    d = base()
    allowed = _allowed_keys(section, d)
    extra = data.draw(identifiers.filter(lambda k: k not in allowed), label="key")
    node = d
    for p in [p for p in section.split(".") if p]:
        node = node[p]
    node[extra] = 1
    err = refused(work, d)
    full = f"{section}.{extra}" if section else extra
    assert keys(err) == [full], err.problems
    assert "unknown" in str(err)


_NAMED = {"model": MODELS, "data": DATASETS, "optimizer": OPTIMIZERS, "method.reducer": REDUCERS,
          "method.sync": SYNCS, "method.order": ORDERS}


@FUZZ
@given(block=st.sampled_from(sorted(_NAMED)), name=st.text(max_size=12))
def test_fuzz_unknown_name_lists_the_allowed(work, block, name):
    registry = _NAMED[block]
    assume(name not in registry)
    d = base()
    set_path(d, block, {"name": name})
    err = refused(work, d)
    assert keys(err) == [f"{block}.name"], err.problems
    assert f"unknown {registry.kind}" in str(err) and registry.names()[0] in str(err)


def _out_of_range():
    """(dotted key, block replacement or None, invalid value strategy) for documented ranges."""
    neg_or_zero = st.integers(max_value=0)
    no_density = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan))
    return [
        ("train.epochs", None, neg_or_zero),
        ("train.global_batch_size", None, neg_or_zero),
        ("train.micro_batch_size", None, neg_or_zero),
        ("train.label_smoothing", None, st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1))),
        ("train.seed", None, st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31))),
        ("train.collective_timeout_s", None, st.one_of(st.floats(max_value=1.0, exclude_max=True),
                                                       st.floats(min_value=604800, exclude_min=True))),
        ("train.max_consecutive_skips", None, st.integers(max_value=-1)),
        ("optimizer.lr", None, st.one_of(st.floats(max_value=0.0), st.just(math.inf),
                                         st.floats(min_value=1e6, exclude_min=True, allow_infinity=False))),
        ("optimizer.momentum", None, st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1))),
        ("schedule.min_lr", None, st.floats(min_value=0.1, exclude_min=True)),  # above the peak lr 0.1
        ("data.val_fraction", None, st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0))),
        ("checkpoint.keep", None, neg_or_zero),
        ("log.every_steps", None, neg_or_zero),
        ("method.reducer.density", ("method.reducer", {"name": "topk"}), no_density),
        ("method.reducer.density", ("method.reducer", {"name": "exdyna"}), no_density),
        ("method.reducer.rank", ("method.reducer", {"name": "acpsgd"}), neg_or_zero),
        ("method.reducer.matrix_approximation_rank", ("method.reducer", {"name": "powersgd"}), neg_or_zero),
        ("method.reducer.bucket_mb", None, st.one_of(st.floats(max_value=0.0), st.just(math.inf))),
        ("method.sync.groups", ("method.sync", {"name": "dssync"}), neg_or_zero),
        ("method.order.project_dim", ("method.order", {"name": "dgrab"}), st.integers(max_value=-1)),
    ]


@FUZZ
@given(case=st.sampled_from(_out_of_range()).flatmap(lambda c: st.tuples(st.just(c[0]), st.just(c[1]), c[2])))
def test_fuzz_out_of_range_value_names_the_key(work, case):
    key, block, value = case
    d = base()
    if block is not None:
        set_path(d, *copy.deepcopy(block))
        if key.startswith("method.sync"):
            d["method"]["reducer"] = {"name": "none"}
    set_path(d, key, value)
    err = refused(work, d)
    assert keys(err) == [key], (value, err.problems)


@FUZZ
@given(world=st.integers(1, 64), micro=st.integers(1, 64), global_batch=st.integers(1, 4096))
def test_fuzz_batch_arithmetic_against_reference(work, world, micro, global_batch):
    d = base()
    d["train"].update(micro_batch_size=micro, global_batch_size=global_batch)
    if global_batch % (world * micro):
        err = refused(work, d, world=world)
        assert keys(err) == ["train.global_batch_size"]
        assert f"{global_batch} is not divisible by world size x micro batch = {world} x {micro}" in str(err)
    else:
        _, r = load(work, d)
        assert r.check_world(world) == (micro, global_batch // (world * micro))


def _dssync(world, groups, **kw) -> dict:
    d = base()
    d["method"] = {"reducer": {"name": "none"}, "sync": {"name": "dssync", "groups": groups, **kw}, "order": {"name": "rr"}}
    d["train"].update(global_batch_size=4 * world, micro_batch_size=1)  # the batch split is not what is tested
    return d


@FUZZ
@given(world=st.integers(1, 48), groups=st.integers(1, 48))
def test_fuzz_dssync_groups_divide_world(work, world, groups):
    d = _dssync(world, groups)
    if world % groups:
        err = refused(work, d, world=world)
        assert keys(err) == ["method.sync.groups"]
        assert f"groups={groups} does not divide the world size {world}" in str(err)
    else:
        _, r = load(work, d)
        r.check_world(world)


@FUZZ
@given(world=st.sampled_from([2, 4, 6, 8]), data=st.data())
def test_fuzz_dssync_patterns_against_reference(work, world, data):
    groups = data.draw(st.sampled_from([g for g in range(1, world + 1) if world % g == 0]), label="groups")
    ranks = st.integers(-1, world)
    group = st.lists(ranks, min_size=0, max_size=world)
    valid_pattern = st.permutations(range(world)).map(
        lambda p: [p[i:i + world // groups] for i in range(0, world, world // groups)])
    pattern = st.one_of(valid_pattern, st.lists(group, min_size=0, max_size=groups + 1))
    patterns = data.draw(st.lists(pattern, min_size=1, max_size=3), label="patterns")
    d = _dssync(world, groups, grouping="patterns", patterns=patterns)
    size = world // groups
    bad = [i for i, pat in enumerate(patterns)
           if sorted(r for g in pat for r in g) != list(range(world)) or len(pat) != groups
           or any(len(g) != size for g in pat)]
    if bad:
        err = refused(work, d, world=world)
        assert keys(err) == [f"method.sync.patterns.{i}" for i in bad]
    else:
        _, r = load(work, d)
        r.check_world(world)


@FUZZ
@given(world=st.integers(1, 64), blocks=st.integers(1, 64))
def test_fuzz_exdyna_blocks_cover_world(work, world, blocks):
    d = base()
    d["method"]["reducer"] = {"name": "exdyna", "num_blocks": blocks}
    d["train"].update(global_batch_size=4 * world, micro_batch_size=1)
    if blocks < world:
        err = refused(work, d, world=world)
        assert keys(err) == ["method.reducer.num_blocks"]
    else:
        _, r = load(work, d)
        r.check_world(world)


PRECISION = {"fp32": {}, "bf16": {"bf16": {"enabled": True}}, "fp16": {"fp16": {"enabled": True}},
             "fp16_static": {"fp16": {"enabled": True, "loss_scale": 128}}}


def _combination_rules(red, sync, period, order, prec, zero, clip):
    """The combination rules docs/guide/recipes.md documents, written out independently of the code under test."""
    rules = []
    if red != "deepspeed" and zero >= 3:
        rules.append("zero-3")
    if sync != "none" and zero >= 1:
        rules.append("sync zero")
    if red == "none" and sync == "none":
        rules.append("no communication")
    if sync in ("local", "dssync"):
        if red == "deepspeed" or (period == "constant" and red != "none") or (period == "postlocal" and red == "none"):
            rules.append("sync reducer")
        if prec != "fp32":
            rules.append("sync precision")
        if clip:
            rules.append("sync clipping")
    if red == "cdgrab" and order != "cdgrab":
        rules.append("cdgrab reducer")
    if order == "cdgrab" and (red != "cdgrab" or sync != "none"):
        rules.append("cdgrab order")
    if red in ("powersgd", "acpsgd", "topk", "exdyna", "signsgd") and prec == "fp16":  # one policy for error feedback
        rules.append("ef fp16")
    return rules


@FUZZ
@given(red=st.sampled_from(REDUCERS.names()), sync=st.sampled_from(SYNCS.names()),
       period=st.sampled_from(["constant", "postlocal"]), order=st.sampled_from(ORDERS.names()),
       prec=st.sampled_from(sorted(PRECISION)), zero=st.integers(0, 3), clip=st.booleans())
def test_fuzz_method_combinations(work, red, sync, period, order, prec, zero, clip):
    d = base()
    sync_block = {"name": sync}
    if sync != "none":
        sync_block["period"] = period
        if period == "postlocal":
            sync_block["switch_step"] = 10
    d["method"] = {"reducer": {"name": red}, "sync": sync_block, "order": {"name": order}}
    d["deepspeed"] = {"zero_optimization": {"stage": zero}, **copy.deepcopy(PRECISION[prec])}
    if clip:
        d["deepspeed"]["gradient_clipping"] = 1.0
    rules = _combination_rules(red, sync, period, order, prec, zero, clip)
    try:
        _, r = load(work, d)
    except RecipeError as err:
        assert str(work[0] / "r.yaml") in str(err)
        assert all(k.startswith(("method.", "deepspeed.")) for k in keys(err)), err.problems
        return
    assert not rules, f"accepted although {rules} apply"
    assert r.method_names() == {"reducer": red, "sync": sync, "order": order}


@FUZZ
@given(path=st.sampled_from(ALL_PATHS), value=yaml_values)
def test_fuzz_any_value_anywhere_is_accepted_or_refused_cleanly(work, path, value):
    d = base()
    set_path(d, path, value)
    try:
        load(work, d)
    except RecipeError as err:
        assert str(work[0] / "r.yaml") in str(err) and err.problems


@FUZZ
@given(doc=yaml_values)
def test_fuzz_any_document_is_refused(work, doc):
    refused(work, doc)  # a recipe needs model, data, optimizer and train sections


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzz_any_text_file_is_refused(work, text):
    refused(work, text=text)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_any_bytes_file_is_refused(work, raw):
    refused(work, raw=raw)


HOST_KEYS = {"data_root", "log_root"}


@FUZZ
@given(host=st.dictionaries(st.one_of(st.sampled_from(sorted(HOST_KEYS)), identifiers), yaml_values, max_size=3))
def test_fuzz_host_file_against_reference(work, host):
    d, _ = work
    hp = d / "fuzz_host.yml"
    hp.write_text(dump(host))
    bad = {k for k in host if k not in HOST_KEYS}
    if not (host.get("data_root") is None or isinstance(host["data_root"], str)):
        bad.add("data_root")
    if "log_root" in host and not isinstance(host["log_root"], str):
        bad.add("log_root")
    rp = d / "r.yaml"
    rp.write_text(dump(base()))
    if bad:
        err = refused(work, base(), host=hp)
        assert {k.split(".")[0] for k in keys(err)} == bad, err.problems
        return
    r = load_recipe(rp, (), str(hp))
    assert r.data.root == host.get("data_root")
    assert r.log.dir == str((Path(host.get("log_root", "runs")) / "quickstart").absolute())


@FUZZ
@given(text=st.text(max_size=30))
def test_fuzz_host_text_is_accepted_or_refused_cleanly(work, text):
    d, _ = work
    hp = d / "fuzz_host.yml"
    hp.write_text(text, encoding="utf-8")
    rp = d / "r.yaml"
    rp.write_text(dump(base()))
    try:
        load_recipe(rp, (), str(hp))
    except RecipeError as err:
        assert str(hp) in str(err)


overrides = st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from(ALL_PATHS + ["nope", "train.nope", "method.reducer.x"]),
              st.text(max_size=12)).map(lambda kv: f"{kv[0]}={kv[1]}"))


@FUZZ
@given(sets=st.lists(overrides, min_size=1, max_size=3))
def test_fuzz_set_overrides_are_accepted_or_refused_cleanly(work, sets):
    d, host = work
    rp = d / "r.yaml"
    rp.write_text(dump(base()))
    try:
        load_recipe(rp, sets, str(host))
    except RecipeError as err:
        assert str(rp) in str(err) or "--set" in str(err), str(err)
