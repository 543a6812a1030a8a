"""Method cards: one short markdown page per method, shipped with the package (``ds_ext/cards/<name>.md``).

A card says what a method sends and when (collectives, bytes per step as a formula in the parameter
shapes), its options (name, default, meaning: checked against the method's ``Options`` class by
``tests/unit/test_method_cards.py``), when to use it and when not, the paper's recommended hyper-parameters,
its failure modes and its deviations from the papers' reference code.

    python -m ds_ext.methods list              # name, kind, one line per card
    python -m ds_ext.methods show NAME         # print a card (a card name, or a registered name it covers)
    python -m ds_ext.methods options NAME      # the Options table as the code defines it (for card authors)
    python -m ds_ext.methods compose           # which methods compose: docs/guide/composing.md's tables

Card layout (parsed here):

* line 1: ``# <name>: <one line>``;
* a line ``**Kind:** reducer `x`, order `y` ...`` naming the registry entries the card covers, or
  ``**Kind:** mode ...`` for a mode that is an option of several methods (the card's name is the option);
* ``## <section>`` headings, every one of ``SECTIONS``;
* under ``## Options`` a table ``| option | default | meaning |`` with the option and its default in
  backticks (defaults written as YAML, as a recipe would), or no table when the method takes no options.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

log = logging.getLogger(__name__)

#: the sections every card has, in this order
SECTIONS = (
    "Summary",
    "What it sends and when",
    "Options",
    "When to use / when not",
    "Recommended hyper-parameters",
    "Failure modes",
    "Deviations from the reference code",
    "Source",
)
KINDS = ("reducer", "sync", "order")
MODE = "mode"

_TITLE = re.compile(r"^# ([a-z0-9_]+): (.+)$")
_KIND_LINE = re.compile(r"^\*\*Kind:\*\*\s*(.+)$", re.MULTILINE)
_COVERS = re.compile(r"\b(reducer|sync|order) `([a-z0-9_]+)`")
_SECTION = re.compile(r"^## (.+?)\s*$", re.MULTILINE)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


@dataclass
class OptionRow:
    name: str
    default: str  # as written in the card (YAML)
    meaning: str


@dataclass
class Card:
    name: str
    title: str
    text: str
    covers: List[Tuple[str, str]] = field(default_factory=list)  # (kind, registered name)
    mode: bool = False
    sections: Dict[str, str] = field(default_factory=dict)
    options: List[OptionRow] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.mode:
            return MODE
        return "+".join(dict.fromkeys(k for k, _ in self.covers))


class CardError(ValueError):
    """A card file that does not follow the layout (the message names the card)."""


# ------------------------------------------------------------------------------------------- reading
def cards_dir():
    """The directory of the card files (a ``Traversable``: works from a checkout and an installed package)."""
    return resources.files("ds_ext").joinpath("cards")


def card_names() -> List[str]:
    return sorted(p.name[:-3] for p in cards_dir().iterdir() if p.name.endswith(".md"))


def card_text(name: str) -> str:
    return cards_dir().joinpath(f"{name}.md").read_text(encoding="utf-8")


def parse_card(name: str, text: str) -> Card:
    lines = text.splitlines()
    m = _TITLE.match(lines[0]) if lines else None
    if not m or m.group(1) != name:
        raise CardError(f"card {name}: the first line must be '# {name}: <one line>'")
    card = Card(name=name, title=m.group(2).strip(), text=text)
    km = _KIND_LINE.search(text)
    if not km:
        raise CardError(f"card {name}: no '**Kind:**' line")
    kind_text = km.group(1).strip()
    if kind_text.startswith(MODE):
        card.mode = True
    else:
        card.covers = _COVERS.findall(kind_text)
        if not card.covers:
            raise CardError(f"card {name}: the Kind line names no registry entry (reducer `x`, sync `y`, order `z`)")
    heads = list(_SECTION.finditer(text))
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        card.sections[h.group(1)] = text[h.end():end].strip("\n")
    card.options = parse_options_table(card.sections.get("Options", ""), name)
    return card


def parse_options_table(section: str, name: str = "?") -> List[OptionRow]:
    rows = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("|")]
    out = []
    for ln in rows[2:]:  # header, separator
        cells = [c.strip() for c in _CELL_SPLIT.split(ln.strip().strip("|"))]
        if len(cells) < 3:
            raise CardError(f"card {name}: options row {ln!r} needs 3 cells (option, default, meaning)")
        out.append(OptionRow(cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    return out


def read_card(name: str) -> Card:
    return parse_card(name, card_text(name))


def all_cards() -> Dict[str, Card]:
    return {n: read_card(n) for n in card_names()}


def resolve(name: str, cards: Optional[Dict[str, Card]] = None) -> Optional[str]:
    """The card for ``name``: a card of that name, else the card whose Kind line covers a registry entry of
    that name (``sequential`` -> ``rr``), else None."""
    cards = all_cards() if cards is None else cards
    if name in cards:
        return name
    for cname, card in cards.items():
        if any(n == name for _, n in card.covers):
            log.debug("method %r is described by card %r", name, cname)
            return cname
    return None


# ------------------------------------------------------------------------------------ the code's side
def _registries():
    from .registry import ORDERS, REDUCERS, SYNCS, load_builtin

    load_builtin()
    return {"reducer": REDUCERS, "sync": SYNCS, "order": ORDERS}


def registered() -> List[Tuple[str, str]]:
    """Every (kind, name) in the reducer, sync and order registries."""
    return [(kind, n) for kind, reg in _registries().items() for n in reg.names()]


def options_class(kind: str, name: str) -> Type:
    return _registries()[kind].get(name).options


def card_options(card: Card) -> List[Tuple[str, str, Type]]:
    """The ``(kind, name, Options class)`` a card's table describes: its covered entries, or for a mode card
    every registered entry whose Options has a field of the card's name."""
    if not card.mode:
        return [(k, n, options_class(k, n)) for k, n in card.covers]
    out = []
    for kind, reg in _registries().items():
        for n in reg.names():
            cls = reg.get(n).options
            if card.name in cls.model_fields:
                out.append((kind, n, cls))
    return out


def field_default(finfo) -> Any:
    """A pydantic field's default (``REQUIRED`` when it has none)."""
    if finfo.is_required():
        return REQUIRED
    return finfo.get_default(call_default_factory=True)


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


def format_default(value: Any) -> str:
    """A default as a recipe (YAML) writes it: ``true``, ``null``, ``25``, ``0.001``, ``faithful``."""
    if value is REQUIRED:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parse_default(text: str) -> Any:
    """The value a card's default cell stands for (YAML; ``required`` for a field without default)."""
    import yaml

    if text == "required":
        return REQUIRED
    return yaml.safe_load(text)


def same_default(written: Any, actual: Any) -> bool:
    """Whether a card's default equals the code's (booleans only equal booleans; 25 equals 25.0)."""
    if actual is REQUIRED or written is REQUIRED:
        return written is actual
    if isinstance(actual, bool) or isinstance(written, bool):
        return type(actual) is type(written) and actual == written
    return written == actual


def generated_table(fields: Sequence[Tuple[str, Any]], meanings: Optional[Dict[str, str]] = None) -> str:
    """Markdown ``| option | default | meaning |`` for ``(name, FieldInfo)`` pairs (meaning: the field's
    description, else ``meanings[name]`` (the card's), and the aliases the meaning does not already name)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for fname, finfo in fields:
        meaning = finfo.description.replace("|", "\\|") if finfo.description else (meanings or {}).get(fname, "")
        choices = [a for a in (getattr(finfo.validation_alias, "choices", ()) or ())
                   if a != fname and not re.search(rf"\b{re.escape(a)}\b", meaning)]
        if choices:
            meaning += f" (alias: {', '.join(choices)})"
        rows.append(f"| `{fname}` | `{format_default(field_default(finfo))}` | {meaning} |")
    return "\n".join(rows)


def option_problems(card: Card) -> List[str]:
    """Where a card's options table and the code disagree (empty when they agree)."""
    problems = []
    entries = card_options(card)
    written = {r.name: r for r in card.options}
    if len(written) != len(card.options):
        problems.append(f"card {card.name}: an option is listed twice")
    for kind, name, cls in entries:
        fields = cls.model_fields
        for oname, row in written.items():
            if oname not in fields:
                if not card.mode:
                    owners = [f"{k} {n}" for k, n, c in entries if oname in c.model_fields]
                    if owners:
                        continue  # a field of another entry the card covers (cdgrab: the order's project_dim)
                problems.append(f"card {card.name}: option {oname!r} is not a field of {kind} {name!r} "
                                f"({cls.__name__}: {', '.join(fields) or 'no options'})")
                continue
            want = field_default(fields[oname])
            try:
                got = parse_default(row.default)
            except Exception as e:  # noqa: BLE001 -- a YAML error in a card is a card problem
                problems.append(f"card {card.name}: default of {oname!r} ({row.default!r}) is not YAML: {e}")
                continue
            if not same_default(got, want):
                problems.append(f"card {card.name}: default of {oname!r} is {row.default!r}, "
                                f"the code says {format_default(want)!r} ({kind} {name}: {cls.__name__})")
        if not card.mode:
            for fname in fields:
                if fname not in written:
                    problems.append(f"card {card.name}: {kind} {name!r} option {fname!r} is missing from the table")
    if card.mode and not entries:
        problems.append(f"card {card.name}: mode card, but no registered Options class has a field {card.name!r}")
    if card.mode and card.name not in written:
        problems.append(f"card {card.name}: mode card without a row for its own option {card.name!r}")
    return problems


# ------------------------------------------------------------------------------ which methods compose
#: the synchronizer settings the composition tables cover: (column, sync name, options)
SYNC_SETTINGS = (
    ("none", "none", {}),
    ("local", "local", {}),
    ("local, qsr", "local", {"period": "qsr", "alpha": 0.01}),
    ("local, postlocal", "local", {"period": "postlocal", "switch_step": 100}),
    ("dssync", "dssync", {}),
    ("dssync, postlocal", "dssync", {"period": "postlocal", "switch_step": 100}),
)


def compose_problems(reducer: str, sync: Tuple[str, dict], order: str) -> List[str]:
    """What the methods' own ``check`` rules (``registry.MethodView.problems``, as the recipe check and ``attach``
    run them) say against this combination, default options otherwise, no DeepSpeed settings, any world size.
    A method's quoted name reads ``<reducer>`` / ``<sync>`` / ``<order>`` (unless two roles share the name), so
    that one message stands for every combination it refuses."""
    from .registry import MethodView

    regs = _registries()
    names = {"reducer": reducer, "sync": sync[0], "order": order}
    opts = {"reducer": regs["reducer"].validated(reducer), "sync": regs["sync"].validated(*sync),
            "order": regs["order"].validated(order)}
    out = []
    for _, msg in MethodView(names=names, options=opts).problems():
        for role, name in names.items():
            if list(names.values()).count(name) == 1:  # "reducer 'x'", "got 'x'" -> "reducer <reducer>"
                msg = re.sub(rf"(\b{role} |\bgot )'{re.escape(name)}'", rf"\1<{role}>", msg)
        out.append(msg)
    return out


def _table(rows: List[str], cols: List[str], cell, what: str, notes: List[str]) -> List[str]:
    """A markdown table of ``cell(row, col)`` problems: ``yes``, or ``no (n)`` with note n (collected in
    ``notes``)."""
    out = [f"| {what} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        cells = []
        for col in cols:
            probs = cell(row, col)
            for m in probs:
                if m not in notes:
                    notes.append(m)
            cells.append("yes" if not probs else "no (" + ", ".join(str(notes.index(m) + 1) for m in probs) + ")")
        out.append(f"| `{row}` | " + " | ".join(cells) + " |")
    return out


def compose_markdown() -> str:
    """The composition tables of ``docs/guide/composing.md``, generated from the methods' rules (a test checks the
    page holds exactly this text)."""
    regs = _registries()
    reducers, orders = regs["reducer"].names(), regs["order"].names()
    syncs = {label: (name, opts) for label, name, opts in SYNC_SETTINGS}
    notes: List[str] = []
    lines = ["### Reducer and synchronizer (order `rr`)", ""]
    lines += _table(reducers, list(syncs), lambda r, s: compose_problems(r, syncs[s], "cdgrab" if r == "cdgrab" else "rr"),
                    "reducer", notes)
    lines += ["", "(The `cdgrab` row is checked with its order `cdgrab`, which it needs.)", "",
              "### Order and reducer (sync `none`)", ""]
    lines += _table(orders, reducers, lambda o, r: compose_problems(r, syncs["none"], o), "order", notes)
    lines += ["", "### Order and synchronizer (reducer `none`; `allreduce` for the post-local periods)", ""]
    lines += _table(orders, [s for s in syncs if s != "none"], lambda o, s: compose_problems(
        "allreduce" if "postlocal" in s else "none", syncs[s], o), "order", notes)
    lines += ["", "### Why a combination is refused", ""]
    lines += [f"{i}. {m}" for i, m in enumerate(notes, 1)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def _cmd_list(cards: Dict[str, Card]) -> int:
    width = max(len(n) for n in cards)
    kwidth = max(len(c.kind) for c in cards.values())
    for name, card in cards.items():
        print(f"{name:<{width}}  {card.kind:<{kwidth}}  {card.title}")
    return 0


def _unknown(name: str, cards: Dict[str, Card]) -> int:
    aliases = sorted({n for c in cards.values() for _, n in c.covers} - set(cards))
    extra = f" (also registered names: {', '.join(aliases)})" if aliases else ""
    print(f"unknown method {name!r}; known: {', '.join(cards)}{extra}", file=sys.stderr)
    return 2


def _cmd_show(name: str, cards: Dict[str, Card]) -> int:
    found = resolve(name, cards)
    if found is None:
        return _unknown(name, cards)
    sys.stdout.write(cards[found].text if cards[found].text.endswith("\n") else cards[found].text + "\n")
    return 0


def _cmd_options(name: str, cards: Dict[str, Card]) -> int:
    found = resolve(name, cards)
    if found is None:
        regs = [(k, n) for k, n in registered() if n == name]
        if not regs:
            return _unknown(name, cards)
        entries = [(k, n, options_class(k, n)) for k, n in regs]
    else:
        entries = card_options(cards[found])
    seen: Dict[str, Any] = {}
    for _, _, cls in entries:
        for fname, finfo in cls.model_fields.items():
            if found is not None and cards[found].mode and fname != found:
                continue
            seen.setdefault(fname, finfo)
    if not seen:
        print(f"{name}: no options")
        return 0
    meanings = {r.name: r.meaning for r in cards[found].options} if found is not None else {}
    print(generated_table(list(seen.items()), meanings))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.methods",
                                 description="The method cards: what each method sends, its options, when to use it, "
                                             "its failure modes and its deviations from the papers' code.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="one line per card: name, kind, summary")
    p = sub.add_parser("show", help="print a card")
    p.add_argument("name")
    p = sub.add_parser("options", help="the Options table as the code defines it")
    p.add_argument("name")
    sub.add_parser("compose", help="which methods compose (the tables of docs/guide/composing.md)")
    args = ap.parse_args(argv)
    if args.cmd == "compose":
        print(compose_markdown())
        return 0
    cards = all_cards()
    if args.cmd == "list":
        return _cmd_list(cards)
    if args.cmd == "show":
        return _cmd_show(args.name, cards)
    return _cmd_options(args.name, cards)


if __name__ == "__main__":
    sys.exit(main())
