"""Checks the config dataclasses run in `__post_init__`, shared by `hyjax.config` and `hyjax.data`.

Each raises `ValueError` with a message that starts with `field=value` (the config loader prefixes the
section, giving e.g. `train.schedule='cosin' must be one of [...]`). This module imports neither package,
so both can use it.
"""

from __future__ import annotations

import difflib
import re


def one_of(field: str, value, allowed) -> None:
    """Raises `field='x' must be one of [...]` (with the closest choice) unless value is allowed."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{field}={value!r} must be one of {list(allowed)}{hint}")


def at_least(field: str, value, low, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ValueError(f"{field}={value!r} must be >= {low}" + (" (or null)" if allow_none else ""))


def in_range(field: str, value, low, high, low_open=False, high_open=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
        raise ValueError(f"{field}={value!r} must be in {interval}" + (" (or null)" if allow_none else ""))


def valid_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regular expression: {err}") from err
