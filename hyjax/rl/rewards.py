"""Verifiable rewards: functions of a generated completion and its data row, returning a float.

A reward is any callable `reward(completion: str, row: Mapping[str, Any]) -> float`. `REWARDS` holds the
built-in ones by name; a config names those, or a callable of its own as `package.module:function`
(imported when the run is set up, so a typo fails before anything is compiled):

    final_number   1.0 when the number after the completion's last `####` equals the row's answer
                   (GSM8K's convention: the answer column ends in `#### <number>`), else 0.0
    answer_format  1.0 when the completion ends its reasoning with `#### <number>`, whatever the number
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from hyjax.data.math_problems import extract_final_answer

Reward = Callable[[str, Mapping[str, Any]], float]

_FINAL_LINE = re.compile(r"####\s*-?\$?\s*[\d,]*\.?\d+\s*$")


def final_number(completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """1.0 when the completion's final number (after its last `####`) equals the row's, else 0.0."""
    wanted = extract_final_answer(str(row[answer_column]))
    got = extract_final_answer(completion)
    return float(wanted is not None and got == wanted)


def answer_format(completion: str, row: Mapping[str, Any]) -> float:
    """1.0 when the completion's last line is `#### <number>`, else 0.0."""
    lines = completion.strip().splitlines()
    return float(bool(lines) and _FINAL_LINE.fullmatch(lines[-1].strip()) is not None)


REWARDS: dict[str, Reward] = {"final_number": final_number, "answer_format": answer_format}


def resolve_reward(name: str) -> Reward:
    """The reward `name`: a key of `REWARDS`, or `package.module:function` imported from the Python path.

    Raises ValueError naming the known rewards, or what the import could not find."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward {name!r} is neither one of {sorted(REWARDS)} nor a callable written "
                         "package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({err})") from err
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no callable {attribute!r}")
    return function
