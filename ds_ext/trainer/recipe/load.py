"""Reading a recipe: the YAML file (measured against the alias-bomb limits before use), ``--set a.b=value``
overrides, the per-host paths file, an existing DeepSpeed config (``ds_config.py``) and validation
against the schema (``schema.py``).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml
from pydantic import ValidationError

from ...registry import load_builtin
from ...spec import RecipeError, _convert
from .ds_config import ds_config_problems
from .schema import (
    HostConfig, Recipe, _cross_section, _deepspeed_problems, _non_finite, _validate_named, check_combination)


# ---- loading ------------------------------------------------------------------------------------

# A YAML document may reuse a node through an anchor (``&x``) and aliases (``*x``). PyYAML's safe_load
# shares one object for every alias, so nine levels of nine aliases load in microseconds, but anything that
# copies or serialises the recipe afterwards (validation, json.dumps for the checkpoint metadata, the
# wandb config) expands them: 9**9 values, a "billion laughs". ``_expansion_problem`` measures the
# document as the tree it expands to, without expanding it, and stops as soon as a limit is passed.
YAML_MAX_VALUES = 100_000  # scalars, keys and containers, counted as a tree; a real recipe has a few hundred
YAML_MAX_CHARS = 10_000_000  # characters of text (keys and strings), counted as a tree


def _expansion_problem(data: Any, top: str = "") -> Optional[Tuple[str, str]]:
    """(key, message) when ``data`` expands to more than ``YAML_MAX_VALUES`` values or ``YAML_MAX_CHARS``
    characters of text once aliases are followed, or contains itself (a cycle never ends); else None.
    ``key`` is the top-level key of ``data`` (a dict) under which the limit was passed, or ``top``.
    Iterative and bounded: at most ``YAML_MAX_VALUES + 1`` nodes are visited whatever the document."""
    values = chars = 0
    shared = False  # an object met twice: the document uses aliases
    seen: set = set()  # ids of the containers and strings visited
    path: set = set()  # ids of the containers on the way down to the current node
    stack: List[Tuple[Any, str, bool]] = [(data, top, False)]
    while stack:
        node, key, leaving = stack.pop()
        if leaving:
            path.discard(id(node))
            continue
        values += 1
        ident = id(node)
        if isinstance(node, (str, bytes)):
            chars += len(node)
            if len(node) > 1:  # Python shares some one-character strings by itself
                shared = shared or ident in seen
                seen.add(ident)
        if values > YAML_MAX_VALUES or chars > YAML_MAX_CHARS:
            what = f"{YAML_MAX_VALUES:,} values" if values > YAML_MAX_VALUES else f"{YAML_MAX_CHARS:,} characters"
            how = (" through YAML aliases (*name repeating an &name anchor); refused without expanding it" if shared
                   else "; a recipe needs far fewer")
            return key, f"expands to more than {what}{how}"
        if not isinstance(node, (dict, list, tuple, set, frozenset)):
            continue
        if ident in path:
            return key, "contains itself through a YAML alias (*name inside its own &name anchor), so it never ends"
        shared = shared or ident in seen
        seen.add(ident)
        path.add(ident)
        stack.append((node, key, True))
        if isinstance(node, dict):
            at_top = node is data and not top
            for k, v in node.items():
                sub = str(k) if at_top else key
                stack.append((k, sub, False))
                stack.append((v, sub, False))
        else:
            stack.extend((v, key, False) for v in node)
    return None


def parse_overrides(overrides: Sequence[str]) -> List[Tuple[List[str], Any, str]]:
    out = []
    for item in overrides or ():
        if "=" not in item:
            raise RecipeError("--set", [(item, "expected key=value, e.g. --set train.epochs=3")])
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise RecipeError("--set", [(key, "empty key component")])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as e:
            # ValueError: PyYAML's constructors raise it for e.g. 2024-13-45 (a date) or !!int abc
            raise RecipeError("--set", [(key, f"value {raw!r} is not valid YAML: {e or type(e).__name__}")]) from None
        problem = _expansion_problem(value, key.strip())
        if problem:
            raise RecipeError("--set", [(problem[0], f"value {problem[1]}")])
        out.append((parts, value, item))
    return out


def apply_overrides(raw: dict, overrides: Sequence[str]) -> Dict[str, str]:
    """Apply ``a.b=value`` overrides to the raw dict in place; returns {dotted key: original text}."""
    applied = {}
    for parts, value, text in parse_overrides(overrides):
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError("--set", [(".".join(parts), f"{'.'.join(parts[:i + 1])} is not a section")])
            node = nxt
        node[parts[-1]] = value
        applied[".".join(parts)] = text
    return applied


def find_host_config(explicit: Optional[str] = None) -> Optional[Path]:
    """--host-config > $DS_EXT_HOST_CONFIG > ./.config_<hostname>.yml > <repo>/.config_<hostname>.yml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DS_EXT_HOST_CONFIG")
    if env:
        return Path(env)
    name = f".config_{socket.gethostname()}.yml"
    for d in (Path.cwd(), Path(__file__).resolve().parents[3]):  # ./ and the repository root
        if (d / name).is_file():
            return d / name
    return None


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RecipeError(str(path), [("", f"{what} file not found")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [("", f"{what} file is not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    except OSError as e:
        raise RecipeError(str(path), [("", f"cannot read the {what} file: {e.strerror or e}")]) from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # ValueError: PyYAML's constructors raise it for e.g. 2024-13-45 (read as a date) or !!int abc
        raise RecipeError(str(path), [("", f"not valid YAML: {e}")]) from None
    except RecursionError:
        raise RecipeError(str(path), [("", "not usable YAML: nested too deeply")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [("", f"top level must be a mapping, got {type(data).__name__}")])
    problem = _expansion_problem(data)
    if problem:
        raise RecipeError(str(path), [problem])
    return data


def load_host_config(path: Optional[Path]) -> HostConfig:
    if path is None:
        return HostConfig()
    raw = _read_yaml(path, "per-host config")
    try:
        return HostConfig.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(str(path), _convert(e, HostConfig)) from None


def recipe_from_dict(raw: dict, source: str = "<dict>", host: Optional[HostConfig] = None,
                     applied: Optional[Dict[str, str]] = None, host_file: Optional[str] = None) -> Recipe:
    load_builtin()
    applied = applied or {}
    raw = dict(raw)
    merge = ds_config_problems(raw, source, applied)
    if merge:
        raise RecipeError(source, _mark_overrides(merge, applied))
    try:
        recipe = Recipe.model_validate(raw)  # not Recipe(**raw): a YAML key may be an int or a date
    except ValidationError as e:
        raise RecipeError(source, _mark_overrides(_convert(e, Recipe), applied)) from None
    recipe._source = source
    recipe._host_file = host_file
    problems = _validate_named(recipe) + _deepspeed_problems(recipe.deepspeed)
    if not problems:
        problems = _non_finite(recipe) + _cross_section(recipe)
    if not problems:
        problems = check_combination(recipe)
    if problems:
        raise RecipeError(source, _mark_overrides(problems, applied))
    _resolve_paths(recipe, host or HostConfig(), source, host_file)
    return recipe


def _mark_overrides(problems, applied):
    out = []
    for key, msg in problems:
        for okey, text in applied.items():
            if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
                msg += f" [from --set {text}]"
                break
        out.append((key, msg))
    return out


def _resolve_paths(recipe: Recipe, host: HostConfig, source: str, host_file: Optional[str] = None) -> None:
    stem = recipe.name or (Path(source).stem if source and not source.startswith("<") else "run")
    host_name = host_file or "the default per-host settings"
    if recipe.data.root is None and host.data_root is not None:
        recipe.data.root = host.data_root
        recipe._origin["data.root"] = f"data_root in {host_name}"
    # a log.dir / checkpoint.dir that is given is used as given (relative: to the working directory, as every
    # other path on the command line); only the default run directory is put under the host's log_root
    if recipe.log.dir:
        log_dir = Path(recipe.log.dir).expanduser()
    else:
        log_dir = Path(host.log_root) / stem
        recipe._origin["log.dir"] = f"log_root ({host.log_root}) in {host_name}"
        if not recipe.checkpoint.dir:
            recipe._origin["checkpoint.dir"] = recipe._origin["log.dir"]
    log_dir = log_dir.absolute()
    recipe.log.dir = str(log_dir)
    ck = Path(recipe.checkpoint.dir).expanduser() if recipe.checkpoint.dir else log_dir / "checkpoints"
    recipe.checkpoint.dir = str(ck.absolute())


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = (), host_config: Optional[str] = None) -> Recipe:
    """Read a recipe YAML, apply ``--set`` overrides and the per-host file, validate everything. A bare
    name with no such file (``"quickstart"``) is a bundled recipe (``python -m ds_ext.trainer.recipe.bundled list``)."""
    path = Path(path)
    if not path.exists():
        from .bundled import bundled_path

        path = bundled_path(str(path)) or path
    raw = _read_yaml(path, "recipe")
    applied = apply_overrides(raw, overrides)
    host_path = find_host_config(host_config)
    host = load_host_config(host_path)
    return recipe_from_dict(raw, str(path), host, applied, str(host_path) if host_path else None)
