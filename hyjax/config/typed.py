"""Nested dicts (parsed YAML) to frozen dataclasses and back, with errors that name the dotted key.

`build(cls, tree)` checks every key against the dataclass fields (unknown keys name the closest valid
ones), checks every value against the field's type, and constructs the (validating) dataclass. Types
understood: bool, int, float (ints are accepted; never nan or infinite), str, None,
unions (`int | None`), `tuple[X, ...]`, fixed tuples `tuple[X, Y]` (from YAML lists), nested dataclasses,
and `dict[str, Any]`, a free mapping whose reader checks it (a registered method's `method.settings`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration is invalid; the message names the dotted key, the value and what is allowed."""


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def unknown_key(prefix: str, key: str, valid, source: str = "") -> ConfigError:
    """`unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'?` (+ where it came from)."""
    close = difflib.get_close_matches(str(key), list(valid), n=3, cutoff=0.5)
    where = f" (in {source})" if source else ""
    if close:
        hint = " or ".join(repr(join(prefix, c)) for c in close)
        return ConfigError(f"unknown key {join(prefix, key)!r}; did you mean {hint}?{where}")
    return ConfigError(f"unknown key {join(prefix, key)!r}; valid keys of "
                       f"{prefix or 'the config'}: {sorted(valid)}{where}")


def check_keys(tree: Mapping, cls, prefix: str = "", source: str = "") -> None:
    """Raises `ConfigError` for the first key of `tree` (recursively) that `cls` has no field for."""
    types_ = field_types(cls)
    for key, value in tree.items():
        if key not in types_:
            raise unknown_key(prefix, key, types_, source)
        sub = _section_type(types_[key])
        if sub is not None and isinstance(value, Mapping):
            check_keys(value, sub, join(prefix, key), source)


def check_path(cls, dotted: str, source: str = ""):
    """The type of the field `dotted` (e.g. `method.lora.rank`) names; raises `ConfigError` if none."""
    prefix = ""
    tp = cls
    for key in dotted.split("."):
        if _is_mapping(tp):  # a free mapping (a method's own settings): what it holds is checked by its reader
            return Any
        if cls is None:
            raise ConfigError(f"{prefix!r} is a value, not a section, so {dotted!r} names nothing"
                              + (f" (in {source})" if source else ""))
        types_ = field_types(cls)
        if key not in types_:
            raise unknown_key(prefix, key, types_, source)
        tp = types_[key]
        cls = _section_type(tp)
        prefix = join(prefix, key)
    return tp


def build(cls, tree: Mapping | None, prefix: str = ""):
    """An instance of dataclass `cls` from `tree`; missing keys take the field defaults."""
    tree = {} if tree is None else tree
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {tree!r}")
    check_keys(tree, cls, prefix)
    types_ = field_types(cls)
    kwargs = {key: convert(types_[key], value, join(prefix, key)) for key, value in tree.items()}
    for key, tp in types_.items():  # nested sections not given still get built (and validated)
        if key not in kwargs and is_section(tp):
            kwargs[key] = build(tp, {}, join(prefix, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        message = str(err)
        starts_with_field = any(re.match(rf"{name}[=\[]", message) for name in types_)
        where = f"{prefix}." if starts_with_field and prefix else (f"{prefix}: " if prefix else "")
        raise ConfigError(f"{where}{message}") from err


def convert(tp, value, key: str):
    """`value` checked against (and, for floats and tuples, converted to) type `tp`."""
    if is_section(tp):
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if tp is Any:
        return value
    if _is_mapping(tp):
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
            value = [value]  # a single pattern where a list of patterns is expected
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items ({_type_name(tp)}), got {value!r}")
        return tuple(convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    raise TypeError(f"config field {key} has a type the loader does not understand: {tp}")


def _is_mapping(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def to_plain(obj):
    """Dataclasses to dicts and tuples to lists, recursively: what YAML can write."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _section_type(tp):
    """The dataclass inside `tp` (itself, or the non-None member of an optional), else None."""
    if is_section(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if is_section(a)]
        return sections[0] if len(sections) == 1 else None
    return None


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return str(tp)


def _type_error(key: str, tp, value) -> ConfigError:
    return ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
