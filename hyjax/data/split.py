"""`train_eval_split`: hold out part of a training file, deterministically by seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def train_eval_split(
    rows: Sequence[Any], *, fraction: float | None = None, count: int | None = None, seed: int = 0
) -> tuple[Any, Any]:
    """Split `rows` into (train, held out): `count` rows, or `fraction` of them, drawn by `seed`.

    Both parts keep file order. `rows` may be a `Rows` (the parts are `Rows` with their original line
    numbers), a `datasets.Dataset` (parts are Datasets) or any sequence (parts are lists).
    """
    n = len(rows)
    if (fraction is None) == (count is None):
        raise ValueError("pass exactly one of fraction= or count=.")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{fraction=} must be in (0, 1).")
        count = max(1, int(round(fraction * n)))
    if not 0 < count < n:
        raise ValueError(f"cannot hold out {count=} of {n} rows; both parts must be non-empty.")
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:count]] = True
    train_idx, eval_idx = np.flatnonzero(~held), np.flatnonzero(held)
    if hasattr(rows, "select"):
        return rows.select(train_idx), rows.select(eval_idx)
    return [rows[int(i)] for i in train_idx], [rows[int(i)] for i in eval_idx]
