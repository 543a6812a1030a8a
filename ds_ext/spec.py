"""The method-block schema shared by recipes, the ``ds_ext`` block of a DeepSpeed config and ``attach()``.

A method block is ``{name: <registry name>, <option>: <value>, ...}`` (``NamedBlock``); the ``reducer`` /
``sync`` / ``order`` blocks together are a ``MethodSection``. ``method_section`` validates one given outside
a recipe; ``_validate_blocks`` checks each block's options against its registry entry's ``Options`` and
``_convert`` turns pydantic's errors into (dotted key, message) pairs naming what is allowed. Every
problem is a ``RecipeError`` (a ``ValueError``) naming the source, the key and what is allowed.
"""
from __future__ import annotations

import reprlib
import types
import typing
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from .registry import ORDERS, REDUCERS, SYNCS, Options, Registry, UnknownName, load_builtin


class RecipeError(ValueError):
    """A recipe problem: ``problems`` is a list of (dotted key, message)."""

    def __init__(self, source: str, problems: Sequence[Tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{source}: {key}: {msg}" if key else f"{source}: {msg}" for key, msg in self.problems]
        super().__init__("\n".join(lines))


def _numeric_annotation(ann) -> bool:
    """True for ``int``, ``float`` and their ``Optional`` forms (not for unions that admit ``bool``)."""
    args = typing.get_args(ann) if typing.get_origin(ann) in (Union, types.UnionType) else (ann,)
    args = [a for a in args if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


_BOOL_FOR_NUMBER = "expected a number, got a boolean"


class Section(BaseModel):
    """A recipe section: unknown keys are refused; so is ``true``/``false`` for a numeric key (pydantic's
    lax mode would read it as 1/0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(v, bool) and field is not None and _numeric_annotation(field.annotation):
            raise ValueError(f"{_BOOL_FOR_NUMBER} ({v!r})")
        return v


class NamedBlock(BaseModel):
    """``{name: <registry name>, <option>: <value>, ...}``; options are validated by the registry
    entry's own ``Options`` model after the schema pass (see ``_validate_blocks``)."""

    model_config = ConfigDict(extra="allow")
    name: str
    _options: Optional[Options] = PrivateAttr(default=None)

    _no_bool_for_number = field_validator("*", mode="before")(Section._no_bool_for_number.__func__)

    @property
    def params(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def options(self) -> Options:
        assert self._options is not None, "recipe not validated"
        return self._options

    @property
    def checked(self) -> Optional[Options]:
        """The validated options, or None when they did not validate (or the recipe was not checked)."""
        return self._options


class MethodSection(Section):
    reducer: NamedBlock = Field(default_factory=lambda: NamedBlock(name="allreduce"))
    sync: NamedBlock = Field(default_factory=lambda: NamedBlock(name="none"))
    order: NamedBlock = Field(default_factory=lambda: NamedBlock(name="rr"))
    #: what deepspeed.gradient_clipping clips: the reduced gradient (after) or each rank's local one (before);
    #: ds_ext/deepspeed/clipping.py
    clip: Literal["after", "before"] = "after"


# ---- errors from pydantic, with the allowed values spelled out ---------------------------------

def _field_model(cls: Type[BaseModel], loc: Sequence) -> Optional[Type[BaseModel]]:
    """The model class that owns the last element of ``loc`` (for listing allowed keys)."""
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of an offending value, depth- and length-limited (a fuzzed value can be huge or nested
    thousands deep, where plain ``repr`` raises RecursionError)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _convert(err: ValidationError, root: Type[BaseModel], prefix: Tuple = ()) -> List[Tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in prefix + loc)
        if e["type"] == "extra_forbidden":
            owner = _field_model(root, loc[:-1])
            allowed = sorted(owner.model_fields) if owner else []
            if owner is not None and issubclass(owner, NamedBlock):
                allowed = ["name"]  # options are checked per registry entry
            msg = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("value_error",):
                msg += f" (got {_short(e['input'])})"
        out.append((key, msg))
    return out


def _validate_blocks(root: BaseModel, named: Mapping[Tuple[str, ...], Registry], prefix: Tuple[str, ...] = (),
                     set_hint: bool = True) -> List[Tuple[str, str]]:
    """Each named block's options against its registry entry's ``Options`` (keys reported under ``prefix``;
    ``set_hint``: the message shows how to replace the block with ``--set``, which only a recipe has)."""
    problems = []
    for path, registry in named.items():
        block = root
        for p in path:
            block = getattr(block, p)
        path = prefix + path
        key = ".".join(path)
        try:
            entry = registry.get(block.name)
        except UnknownName as e:
            problems.append((f"{key}.name", str(e)))
            continue
        params = block.params
        bools = [(f"{key}.{k}", f"{_BOOL_FOR_NUMBER} ({v!r})") for k, v in params.items()
                 if isinstance(v, bool) and entry.options.field_of(k) is not None
                 and _numeric_annotation(entry.options.model_fields[entry.options.field_of(k)].annotation)]
        if bools:  # pydantic's lax mode would read true/false as 1/0
            problems += bools
            continue
        try:
            block._options = entry.options.model_validate(params)
        except ValidationError as e:
            for k, msg in _convert(e, entry.options, prefix=path):
                if msg.startswith("unknown key"):
                    allowed = sorted(entry.options.model_fields)
                    msg = f"unknown option for {registry.kind} {block.name!r}; allowed: {', '.join(allowed) or '(none)'}"
                    if set_hint:
                        msg += (f" (to switch {key} on the command line, replace the whole block: "
                                f"--set '{key}={{name: {block.name}}}')")
                problems.append((k, msg))
    return problems


_METHOD_BLOCKS = {("reducer",): REDUCERS, ("sync",): SYNCS, ("order",): ORDERS}


def method_section(block: Any, source: str = "ds_config", prefix: str = "ds_ext") -> MethodSection:
    """A method specification outside a recipe (the ``ds_ext`` block of a DeepSpeed config, or the ``method``
    argument of ``ds_ext.attach``), validated with the recipe's schema and messages: the same ``reducer`` /
    ``sync`` / ``order`` blocks as a recipe's ``method`` section, each ``{name: ..., <option>: ...}`` or a
    bare name. Raises ``RecipeError`` (a ``ValueError``) naming ``prefix.<key>`` and what is allowed."""
    load_builtin()
    if not isinstance(block, Mapping):
        raise RecipeError(source, [(prefix, "must be a mapping with the keys reducer, sync, order "
                                            f"(got {_short(block)})")])
    raw = {k: ({"name": v} if isinstance(v, str) and k != "clip" else v) for k, v in block.items()}
    try:
        section = MethodSection.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(source, _convert(e, MethodSection, prefix=(prefix,))) from None
    problems = _validate_blocks(section, _METHOD_BLOCKS, (prefix,), set_hint=False)
    if problems:
        raise RecipeError(source, problems)
    return section


def near_miss_keys(config: Mapping) -> List[str]:
    """The keys of a DeepSpeed config that look like a misspelled ``ds_ext`` block: the same letters once case,
    ``-``, ``_``, ``.`` and spaces are ignored (``ds-ext``, ``DS_EXT``, ``dsext``, ``"ds_ext "``), or one edit away
    (``ds_ect``, ``ds_exts``). ``ds_ext`` itself is not one."""
    import difflib
    import re

    out = []
    for key in config:
        if not isinstance(key, str) or key == "ds_ext":
            continue
        squashed = re.sub(r"[\s._-]+", "", key.lower())
        if squashed == "dsext" or difflib.SequenceMatcher(None, key.lower().strip(), "ds_ext").ratio() >= 0.8:
            out.append(key)
    return out


def near_miss_block(config: Mapping, source: str = "DeepSpeed config", prefix: str = "") -> None:
    """Raise ``RecipeError`` naming the key when a DeepSpeed config has no ``ds_ext`` block but a near miss
    (``near_miss_keys``): ds_ext reads only ``ds_ext``, so the block would be ignored and plain allreduce
    attached without a word. ``prefix``: where the config sits in the source (a recipe's ``deepspeed.``)."""
    if not isinstance(config, Mapping) or "ds_ext" in config:
        return
    keys = near_miss_keys(config)
    if keys:
        raise RecipeError(source, [(f"{prefix}{k}", 'looks like the ds_ext block misspelled: ds_ext reads its methods only '
                                             'from a key spelled exactly "ds_ext" (as written the block would be '
                                             f'ignored and plain allreduce attached); rename {k!r} to "ds_ext"')
                                   for k in keys])


def block_parts(spec, default: str):
    """(name, options dict or Options) of one method block: a recipe ``NamedBlock``, a dict or a plain name
    (``default`` when absent). Shared by ``attach()``, the trainer's set-up and the Hugging Face route."""
    if spec is None:
        return default, {}
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        spec = dict(spec)
        return spec.pop("name", default), spec
    opts = spec.checked if spec.checked is not None else spec.params
    return spec.name, opts
