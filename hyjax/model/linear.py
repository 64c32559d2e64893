"""The one projection every weight of the model goes through, so adapters can act on activations."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from hyjax.sharding.activations import input_features


@runtime_checkable
class LinearOperator(Protocol):
    """A weight that applies itself to activations (an adapted weight: base plus adapter)."""

    def apply_to(self, x: jax.Array) -> jax.Array:
        """`x [..., d_in] -> [..., d_out]`, in x's dtype."""

    def merged(self) -> jax.Array:
        """The equivalent plain weight array."""


@runtime_checkable
class LayerStacked(Protocol):
    """A weight over all stacked layers that the layer scan cannot slice as it is (Hybrid-LoRA's
    fully trained layers), with an equivalent form whose every leaf has the leading `layers` axis."""

    def scan_form(self):
        """The equivalent weight whose leaves all slice along axis 0, one slice per layer."""


def scan_ready(params):
    """The parameter tree with every `LayerStacked` weight replaced by its `scan_form()`, so the
    layer scan can slice every leaf (called by `hyjax.model.apply` and `decode`)."""
    return jax.tree.map(lambda w: w.scan_form() if isinstance(w, LayerStacked) else w, params,
                        is_leaf=lambda w: isinstance(w, LayerStacked))


def linear(x: jax.Array, w, features: str | None = None) -> jax.Array:
    """`y = x @ w` for a `[d_in, d_out]` kernel; an adapted weight applies itself to `x` instead.

    The kernel is cast to the activations' dtype, so `x`'s dtype is the compute dtype. features: the
    logical name of x's last axis (the kernel's d_in: "embed", "heads", "mlp"), which tells an adapter's
    per-device kernels how the features are split (`hyjax.sharding.activations.input_features`).
    """
    if isinstance(w, LinearOperator):
        with input_features(features):
            return w.apply_to(x)
    return jnp.dot(x, w.astype(x.dtype))


def dense(w) -> jax.Array:
    """The weight as a plain array: itself, or an adapted weight's merged value (for weights that are
    not projections, such as the embedding table and norm scales)."""
    if isinstance(w, LinearOperator):
        return w.merged()
    return w
