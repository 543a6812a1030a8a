"""The method cards (``ds_ext/cards/*.md``, ``python -m ds_ext.methods``): one card per registered method and
no card without one, every section present, the options tables equal to the code's Options classes (names and
defaults), the CLI, no paths outside the repository, the docs index, and the code facts the cards state as
deviations."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ds_ext import methods
from ds_ext.reducers.base import error_feedback_reducers
from ds_ext.registry import MethodView

ROOT = Path(__file__).resolve().parents[2]
CARDS = methods.all_cards()


def test_cards_ship_inside_the_package():
    assert (ROOT / "ds_ext" / "cards").is_dir()
    assert methods.card_names() == sorted(p.stem for p in (ROOT / "ds_ext" / "cards").glob("*.md"))
    copies = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")} & set(methods.card_names())
    assert copies == set(), f"docs/methods holds copies of cards {sorted(copies)}: link to ds_ext/cards instead"


def test_every_registered_method_has_a_card_and_every_card_a_method():
    covered = {}
    for name, card in CARDS.items():
        for entry in card.covers:
            assert entry not in covered, f"{entry} is covered by cards {covered[entry]} and {name}"
            covered[entry] = name
    registered = set(methods.registered())
    assert registered - set(covered) == set(), "registered without a card"
    assert set(covered) - registered == set(), "card names a method that is not registered"
    for name, card in CARDS.items():
        if card.mode:  # a mode card is the option of that name, present in some Options class
            assert methods.card_options(card), name
        else:
            assert card.covers, name
            # a card is named after one of the entries it covers
            assert name in {n for _, n in card.covers}, name


@pytest.mark.parametrize("name", sorted(CARDS))
def test_card_has_every_section_in_order(name):
    card = CARDS[name]
    heads = list(card.sections)
    assert [h for h in heads if h in methods.SECTIONS] == list(methods.SECTIONS), f"{name}: sections {heads}"
    for section in methods.SECTIONS:
        assert card.sections[section].strip(), f"{name}: section {section!r} is empty"
    assert card.title and len(card.title) <= 120, name
    lines = card.text.count("\n")
    assert 30 <= lines <= 100, f"{name}: {lines} lines"


@pytest.mark.parametrize("name", sorted(CARDS))
def test_options_table_matches_the_code(name):
    card = CARDS[name]
    assert methods.option_problems(card) == []
    fields = {f for _, _, cls in methods.card_options(card) for f in cls.model_fields}
    if not fields:
        assert card.options == [], f"{name}: the method takes no options but the card lists some"


def test_option_check_catches_a_wrong_default_and_a_missing_and_an_unknown_option():
    card = CARDS["topk"]
    text = card.text.replace("| `density` | `0.001` |", "| `density` | `0.01` |")
    text = text.replace("| `exchange` | `allgather` |", "| `exchnge` | `allgather` |")
    problems = " ".join(methods.option_problems(methods.parse_card("topk", text)))
    assert "default of 'density'" in problems
    assert "'exchnge' is not a field" in problems
    assert "'exchange' is missing" in problems
    bad_bool = card.text.replace("| `error_feedback` | `true` |", "| `error_feedback` | `1` |")
    assert methods.option_problems(methods.parse_card("topk", bad_bool))  # 1 is not true


@pytest.mark.parametrize("path", sorted((ROOT / "ds_ext" / "cards").glob("*.md")) + [ROOT / "docs" / "methods" / "README.md"],
                         ids=lambda p: p.name if p.name != "README.md" else "docs-index")
def test_no_paths_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    for bad in ("../shared", "/work/", "shared/seeds", "shared/reference"):
        assert bad not in text, f"{path.name} mentions {bad!r}"
    # every repository path a card names exists
    for rel in set(re.findall(r"\b((?:ds_ext|tests|recipes|run|docs)/[\w./-]+\.(?:py|yaml|sh|md))\b", text)):
        assert (ROOT / rel).exists(), f"{path.name} names {rel}, which does not exist"


def test_docs_index_links_every_card():
    index = (ROOT / "docs" / "methods" / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((\.\./\.\./ds_ext/cards/([a-z0-9_]+)\.md)\)", index)
    assert sorted(n for _, n in links) == sorted(CARDS)
    for rel, _ in links:
        assert (ROOT / "docs" / "methods" / rel).resolve().is_file()


# ------------------------------------------------------------------------------------------- CLI
def test_cli_list(capsys):
    assert methods.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out] == sorted(CARDS)
    for ln in out:
        name, kind = ln.split()[:2]
        assert kind == CARDS[name].kind and ln.rstrip().endswith(CARDS[name].title)


def test_cli_show_and_registered_aliases(capsys):
    assert methods.main(["show", "powersgd"]) == 0
    assert capsys.readouterr().out == CARDS["powersgd"].text
    assert methods.main(["show", "sequential"]) == 0  # a registered name covered by another card
    assert capsys.readouterr().out.startswith("# rr:")
    assert methods.main(["options", "exdyna"]) == 0
    generated = methods.parse_options_table(capsys.readouterr().out)
    assert sorted(r.name for r in generated) == sorted(r.name for r in CARDS["exdyna"].options)


def test_cli_unknown_name_exits_2_with_one_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "ds_ext.methods", "show", "no-such-method"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no-such-method" in lines[0]
    for name in CARDS:
        assert name in lines[0]


# ------------------------------------------------------------------ the facts the cards state as deviations
def test_powersgd_follows_pytorchs_strict_rule_at_equality():
    from ds_ext.reducers.lowrank import PowerSGDReducer

    n = m = 8
    r, rate = 2, 2.0  # n*m == rate*(n+m)*r == 64
    assert not PowerSGDReducer.compresses(n, m, r, rate)  # as PyTorch's _should_compress: (n+m)*r*rate < n*m
    assert "n * m >= rate" not in CARDS["powersgd"].sections["Deviations from the reference code"]
    assert "(n+m) * r * rate < n*m" in CARDS["powersgd"].sections["Options"]


def test_qsr_first_round_is_the_rule_at_the_first_lr_without_warmup():
    from ds_ext.sync.schedules import QSR

    q = QSR(alpha=0.0175, h_base=4, warmup_steps=0)
    assert q.first_h(0.001) == q.rule(0.001) == 306  # as the reference's adjust_h() before training
    assert "adjust_h" in CARDS["local"].sections["Deviations from the reference code"]


def test_constant_period_shortens_the_last_round():
    from ds_ext.sync.schedules import Constant, simulate

    assert simulate(Constant(4, total_steps=10), lambda s: 0.1, 10) == [(0, 4, False), (4, 4, False), (8, 2, False)]
    assert Constant(4, total_steps=10).next_h(8, 0.1) == 2


def test_dssync_patterns_follow_the_sync_count():
    from ds_ext.sync.dssync import DSSync, default_patterns

    fake = SimpleNamespace(options=SimpleNamespace(grouping="patterns", groups=2, seed=0), world_size=4, group_size=2,
                           patterns=default_patterns(4, 2), pool=[])
    seq = [DSSync.grouping(fake, i) for i in range(5)]
    assert seq[0] == seq[2] == seq[4] == [[0, 1], [2, 3]] and seq[1] == seq[3] == [[0, 3], [1, 2]]
    # the default counts over the whole run; the reference's per-epoch restart is the option
    assert "pattern_restart: epoch" in CARDS["dssync"].sections["Deviations from the reference code"]


def test_dgrab_drops_each_ranks_remainder():
    from ds_ext.order.dgrab import DGrab

    o = DGrab(103, 0, 2, 0)  # shard of 51 per rank (one example of 103 unused)
    steps, note = o.plan(1, 2, 51 // 2)  # the trainer's whole optimizer steps: 25 x 2 microbatches
    assert o.shard_size == 51 and steps == 25 and o.dropped_examples == 1 and "not used" in note


@pytest.mark.parametrize("reducer", error_feedback_reducers())
def test_fp16_dynamic_loss_scaling(reducer):
    view = MethodView(names={"reducer": reducer, "sync": "none", "order": "rr"},
                      deepspeed={"fp16": {"enabled": True}})
    problems = view.problems()
    assert len(problems) == 1 and "fp16 dynamic loss scaling" in problems[0][1], problems  # every EF reducer alike
    static = MethodView(names=view.names, deepspeed={"fp16": {"enabled": True, "loss_scale": 128}})
    assert static.problems() == []
    assert "fp16" in CARDS[reducer].sections["Deviations from the reference code"]
