"""The bundled recipes, usable from an installed package.

    python -m ds_ext.trainer.recipe.bundled list             # every bundled recipe with a one-line description
    python -m ds_ext.trainer.recipe.bundled show NAME        # print the YAML
    python -m ds_ext.trainer.recipe.bundled copy NAME [DEST] # write it to DEST (default ./NAME.yaml) to edit and run

The repository's top-level ``recipes/*.yaml`` are the source: a wheel carries copies of them as
``ds_ext/_recipes/*.yaml`` (written by the ``build_py`` step of ``setup.py``), and a source checkout or
editable install reads ``recipes/`` itself. ``ds_ext.load_recipe("quickstart")`` resolves a bare bundled
name through ``bundled_path`` when no file of that name exists.

``copy`` sets the copy's top-level ``name:`` to the destination's file name without ``.yaml`` (``copy quickstart
my.yaml`` writes ``name: my``): the run directory defaults to ``<log_root>/<name>``, so an edited copy never
writes into the runs of the recipe it came from.

Exit codes: 0 done, 2 unknown recipe name, a destination that exists (never overwritten) or cannot be written.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[2]  # the ds_ext package directory
BUNDLED_DIR = _PACKAGE / "_recipes"  # inside an installed wheel
CHECKOUT_DIR = _PACKAGE.parent / "recipes"  # source checkout / editable install
DESCRIPTION_WIDTH = 100


def recipe_dir() -> Optional[Path]:
    """Where the bundled recipes are: the wheel's ``ds_ext/_recipes``, else the checkout's ``recipes/``
    (only when it sits next to this package's ``setup.cfg``, so an unrelated ``site-packages/recipes``
    is never read); None when neither exists."""
    if BUNDLED_DIR.is_dir():
        return BUNDLED_DIR
    if CHECKOUT_DIR.is_dir() and (_PACKAGE.parent / "setup.cfg").is_file():
        return CHECKOUT_DIR
    return None


def bundled() -> Dict[str, Path]:
    """{name: path} of every bundled recipe, sorted by name (the name is the file name without ``.yaml``)."""
    d = recipe_dir()
    if d is None:
        log.warning("no bundled recipes found (looked in %s and %s)", BUNDLED_DIR, CHECKOUT_DIR)
        return {}
    return {p.stem: p for p in sorted(d.glob("*.yaml")) if p.is_file()}


def _bare(name: str) -> Optional[str]:
    """``name`` without a trailing ``.yaml`` when it is a bare file name (no directory part), else None."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    return name[:-5] if name.endswith(".yaml") else name


def bundled_path(name: str) -> Optional[Path]:
    """The bundled recipe called ``name`` (``quickstart`` or ``quickstart.yaml``), or None."""
    bare = _bare(str(name))
    return bundled().get(bare) if bare else None


def leading_comment(text: str) -> List[str]:
    """The lines of the comment block a YAML text starts with, ``#`` and one space removed."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def describe(text: str, width: int = DESCRIPTION_WIDTH) -> str:
    """One line from the leading comment: its first paragraph (up to a blank or indented comment line),
    first sentence, shortened to ``width`` characters at a word boundary. "" when there is no comment."""
    para = []
    for line in leading_comment(text):
        if not line.strip() or line.startswith(" "):
            break
        para.append(line.strip())
    joined = " ".join(para)
    # a sentence ends at ". " before a capital letter (not inside "e.g. x" or "1. 5")
    m = re.search(r"\.\s+(?=[A-Z])", joined)
    first = joined[:m.start() + 1] if m else joined
    if len(first) <= width:
        return first
    cut = first[:width - 3]
    if " " in cut:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:(") + "..."


_NAME_LINE = re.compile(r"^name:[^\n]*$", re.MULTILINE)


def renamed(text: str, name: str) -> str:
    """``text`` (a recipe's YAML) with its top-level ``name:`` set to ``name``: the line replaced in place (the
    comments around it kept), or added after the leading comment block when there is none."""
    line = f"name: {name}" if re.fullmatch(r"[A-Za-z0-9_.-]+", name) else f"name: {json.dumps(name)}"
    if _NAME_LINE.search(text):
        return _NAME_LINE.sub(lambda _: line, text, count=1)
    lines = text.splitlines(keepends=True)
    head = len(leading_comment(text))
    return "".join(lines[:head] + [line + "\n"] + lines[head:])


def _unknown(name: str, known: Sequence[str]) -> str:
    return f"unknown recipe {name!r}; known: {', '.join(known) if known else '(none bundled)'}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.trainer.recipe.bundled", description="List, show or copy the bundled recipes.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{list,show,copy}")
    sub.add_parser("list", help="the bundled recipes, one line each")
    p = sub.add_parser("show", help="print a recipe's YAML")
    p.add_argument("name")
    p = sub.add_parser("copy", help="write a recipe to DEST (default ./NAME.yaml); an existing file is never replaced")
    p.add_argument("name")
    p.add_argument("dest", nargs="?", default=None, help="file, or an existing directory to write NAME.yaml into")
    a = ap.parse_args(argv)

    recipes = bundled()
    if a.cmd == "list":
        if not recipes:
            print("no bundled recipes found", file=sys.stderr)
            return 1
        w = max(map(len, recipes))
        for name, path in recipes.items():
            print(f"{name:<{w}}  {describe(path.read_text(encoding='utf-8'))}".rstrip())
        return 0

    path = bundled_path(a.name)
    if path is None:
        print(_unknown(a.name, list(recipes)), file=sys.stderr)
        return 2
    text = path.read_text(encoding="utf-8")
    if a.cmd == "show":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0

    dest = Path(a.dest) if a.dest else Path(f"{path.stem}.yaml")
    if dest.is_dir():
        dest = dest / f"{path.stem}.yaml"
    name = dest.name[:-5] if dest.name.endswith(".yaml") else dest.stem
    try:
        with open(dest, "x", encoding="utf-8") as f:  # "x": never replaces an existing file
            f.write(renamed(text, name))
    except FileExistsError:
        print(f"{dest} exists; not overwritten (remove it or give another DEST)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cannot write {dest}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {dest} (from recipe {path.stem}, with name: {name}: its runs go to <log_root>/{name}); run it on 2 "
          f"processes with: deepspeed --num_gpus 2 --module ds_ext.train --recipe {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
