"""Choosing which weights an adapter acts on: an ordered table of (regex, method) rules over paths.

A path names a leaf of the parameter dict with `/` between keys, e.g. `layers/attn/q_proj`. The first
rule whose pattern matches the whole path decides; a rule with method `None` keeps the weight frozen;
a path no rule matches stays frozen.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

PROJECTIONS = r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))_proj"

# Default target patterns per model family, by the kind of method.
DEFAULT_TARGETS: dict[str, dict[str, str]] = {
    "llama": {
        "projections": PROJECTIONS,   # structured adapters: every attention and MLP projection
        "everything": r".*",          # full fine-tuning: every parameter
    },
}


def stacked_axes(path: str) -> int:
    """How many leading axes of the leaf at `path` index layers (the scanned layers carry one)."""
    return 1 if path.startswith("layers/") else 0


def default_pattern(kind: str = "projections", family: str = "llama") -> str:
    """The default target pattern of a kind of method (an adapter config's `TARGETS`: "projections"
    or "everything") for a model family."""
    if family not in DEFAULT_TARGETS:
        raise KeyError(f"no default targets for model family {family!r}; known: {sorted(DEFAULT_TARGETS)}")
    return DEFAULT_TARGETS[family][kind]


def iter_paths(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`(path, leaf)` for every leaf of a nested dict (adapted weights count as leaves)."""
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from iter_paths(value, path)
        else:
            yield path, value


def map_paths(fn: Callable[[str, Any], Any], tree: dict, prefix: str = "") -> dict:
    """A nested dict of the same keys with `fn(path, leaf)` at every leaf."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out[key] = map_paths(fn, value, path) if isinstance(value, dict) else fn(path, value)
    return out


def nest(flat: dict[str, Any]) -> dict:
    """`{"a/b": x}` -> `{"a": {"b": x}}`: a nested dict from path-keyed values."""
    out: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def match_rule(rules, path: str):
    """The method of the first rule whose pattern matches all of `path` (None when no rule does)."""
    for pattern, method in rules:
        if re.fullmatch(pattern, path):
            return method
    return None


def validate_patterns(rules) -> None:
    for pattern, _ in rules:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"target pattern {pattern!r} is not a valid regular expression: {err}") from err
