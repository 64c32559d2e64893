"""Initialising a method on a stacked (`[layers, d_in, d_out]`) weight, one 2-D matrix at a time."""

from __future__ import annotations

import math
from typing import ClassVar

import jax


def split_keys(key: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """One key per index of the leading shape `lead` (the key itself when there is none)."""
    if not lead:
        return key
    keys = jax.random.split(key, math.prod(lead))
    return keys.reshape(lead + keys.shape[1:])


class StackedInit:
    """Mixin for method configs whose `init(base_2d, key, gradient_2d)` builds one node for a single
    `[d_in, d_out]` matrix: `init_stacked` maps it over the stacked layer axes with one key each."""

    TARGETS: ClassVar[str] = "projections"  # default targets: the attention and MLP projections

    def init(self, base: jax.Array, key: jax.Array, gradient: jax.Array | None = None):
        raise NotImplementedError

    def init_stacked(self, base: jax.Array, key: jax.Array, gradient: jax.Array | None = None,
                     stacked_axes: int = 0):
        """`stacked_axes` leading axes of `base` index layers; the rest must be one matrix."""
        if base.ndim != stacked_axes + 2:
            raise ValueError(f"method {self.name!r} adapts matrices; got a weight of shape {base.shape} "
                             f"with {stacked_axes} stacked layer axis(es)")
        lead = base.shape[:-2]
        keys = split_keys(key, lead)
        fn = lambda w, k, g: self.init(w, k, g)  # noqa: E731
        for _ in lead:
            fn = jax.vmap(fn)
        return fn(base, keys, gradient)
