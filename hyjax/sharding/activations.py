"""Sharding constraints on activations by logical names, active only inside `activation_sharding`.

The model marks a few activations (`constrain(x, ("batch", "seq", "embed"))`) without knowing any
mesh; the training step traces the model inside `activation_sharding(layout)`, which turns the marks
into `with_sharding_constraint` on that layout. Outside it (single-device use, generation) they do
nothing. Without the marks XLA's propagation may split the hidden dimension like the FSDP-split
weights instead of the batch, multiplying activation memory.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_ACTIVE = contextvars.ContextVar("hyjax_activation_layout", default=None)


@contextlib.contextmanager
def activation_sharding(layout):
    """Activations marked with `constrain` follow `layout` (a `hyjax.sharding.Layout`) while tracing."""
    token = _ACTIVE.set(layout)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`x` constrained to the active layout's sharding of logical `names` (no-op without one)."""
    layout = _ACTIVE.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(names))
