"""Unit-norm constraint: after each optimizer step, every `UnitVectors` parameter (the unitary adapter's
Householder reflection vectors) is projected back onto the unit sphere.

Two ways to use it, found by type in any tree (the adapted tree, or `split_trainable`'s trainable part):

    optimizer = optax.chain(optax.adamw(1e-3), unit_norm_projection())   # last in the chain
    updates, state = optimizer.update(grads, state, trainable)           # params are required
    trainable = optax.apply_updates(trainable, updates)                  # now unit norm

or `trainable = project_unit_norm(optax.apply_updates(trainable, updates))` by hand.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from hyjax.adapters.unitary import UnitVectors


def _is_unit(node) -> bool:
    return isinstance(node, UnitVectors)


def project_unit_norm(params: Any) -> Any:
    """`params` with every `UnitVectors` node normalised over its last two axes; other leaves unchanged."""
    return jax.tree.map(lambda n: n.normalized() if _is_unit(n) else n, params, is_leaf=_is_unit)


def unit_norm_projection() -> optax.GradientTransformation:
    """An Optax transform, to put last in a chain, whose updates land every `UnitVectors` parameter on the
    unit sphere: `u' = project(p + u) - p` for those, other updates unchanged. Needs `params`."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("unit_norm_projection needs the current params: call update(updates, state, params)")

        def project(u, p):
            if not _is_unit(u):
                return u
            target = UnitVectors(p.vectors + u.vectors).normalized()
            return u.replace(vectors=target.vectors - p.vectors)

        return jax.tree.map(project, updates, params, is_leaf=_is_unit), state

    return optax.GradientTransformation(init, update)
