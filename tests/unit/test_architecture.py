"""The shape of the house (docs/dev/architecture.md), checked on the source: the import graph of ``ds_ext/`` has no
cycle and no edge that points up a layer; no installed file is over 600 lines and no function over 120; nothing
installed imports ``benchmarks/``. Imports made inside functions count as edges too."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ds_ext"

GROUND = {"ds_ext.comm", "ds_ext.meter", "ds_ext.registry", "ds_ext.spec", "ds_ext.testing", "ds_ext.stop_signals",
          "ds_ext.build_lock"}
METHODS = ("ds_ext.reducers", "ds_ext.sync", "ds_ext.order", "ds_ext.hierarchy", "ds_ext.topology", "ds_ext.ops",
           "ds_ext.op_builder")
ABOVE_METHODS = ("ds_ext.deepspeed", "ds_ext.trainer", "ds_ext.costmodel", "ds_ext.hf", "ds_ext.data", "ds_ext.models",
                 "ds_ext.methods", "ds_ext.report", "ds_ext.train")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 120


def _modules(root: Path) -> Dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODS = _modules(PKG)


def _targets(name: str, path: Path) -> Set[str]:
    """Every module (of ds_ext, or benchmarks) this file imports, anywhere in it."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only: not an import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            for b in bases:
                if b.split(".")[0] in ("ds_ext", "benchmarks"):
                    out.add(b)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] not in ("ds_ext", "benchmarks"):
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in MODS else base)
    out.discard(name)
    return out


EDGES = {m: _targets(m, p) for m, p in MODS.items()}


def _under(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _cycles() -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph = {m: {t for t in ts if t in MODS and t != "ds_ext"} for m, ts in EDGES.items()}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def strong(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle():
    assert _cycles() == []


def test_the_checker_sees_a_cycle():  # the check can fail
    global EDGES
    saved = EDGES
    try:
        EDGES = {**saved, "ds_ext.comm": saved["ds_ext.comm"] | {"ds_ext.registry"},
                 "ds_ext.registry": saved["ds_ext.registry"] | {"ds_ext.comm"}}
        assert ["ds_ext.comm", "ds_ext.registry"] in _cycles()
    finally:
        EDGES = saved


def _violations(sources, forbidden) -> List[str]:
    return sorted(f"{m} imports {t}" for m, ts in EDGES.items() if _under(m, sources)
                  for t in ts if _under(t, forbidden))


def test_ground_floor_imports_nothing_above_it():
    bad = sorted(f"{m} imports {t}" for m in GROUND if m in EDGES for t in EDGES[m]
                 if t.startswith("ds_ext.") and t not in GROUND)
    assert bad == []


def test_methods_import_neither_integration_nor_application():
    assert _violations(METHODS, ABOVE_METHODS) == []


def test_deepspeed_layer_never_imports_the_trainer():
    assert _violations(("ds_ext.deepspeed",), ("ds_ext.trainer", "ds_ext.costmodel", "ds_ext.hf")) == []


def test_data_and_models_do_not_import_the_application():
    assert _violations(("ds_ext.data", "ds_ext.models"), ("ds_ext.trainer", "ds_ext.deepspeed", "ds_ext.costmodel")) == []


def test_nothing_installed_imports_benchmarks():
    assert _violations(("ds_ext",), ("benchmarks",)) == []


def _long_functions(path: Path) -> List[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_file_and_function_sizes(path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)}: {lines} lines"
    assert _long_functions(path) == []
