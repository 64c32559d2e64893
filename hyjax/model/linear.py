"""The one projection every weight of the model goes through, so adapters can act on activations."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@runtime_checkable
class LinearOperator(Protocol):
    """A weight that applies itself to activations (an adapted weight: base plus adapter)."""

    def apply_to(self, x: jax.Array) -> jax.Array:
        """`x [..., d_in] -> [..., d_out]`, in x's dtype."""

    def merged(self) -> jax.Array:
        """The equivalent plain weight array."""


def linear(x: jax.Array, w) -> jax.Array:
    """`y = x @ w` for a `[d_in, d_out]` kernel; an adapted weight applies itself to `x` instead.

    The kernel is cast to the activations' dtype, so `x`'s dtype is the compute dtype.
    """
    if isinstance(w, LinearOperator):
        return w.apply_to(x)
    return jnp.dot(x, w.astype(x.dtype))


def dense(w) -> jax.Array:
    """The weight as a plain array: itself, or an adapted weight's merged value (for weights that are
    not projections, such as the embedding table and norm scales)."""
    if isinstance(w, LinearOperator):
        return w.merged()
    return w
