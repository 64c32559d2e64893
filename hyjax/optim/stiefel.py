"""Riemannian steps on the orthogonal group (Stiefel manifold) for `Orthogonal` parameters: the
full-capacity unitary adapter (Wisdom et al. 2016).

For an orthogonal W with Euclidean gradient G, the Cayley retraction

    A = G W^T - W G^T                          (skew-symmetric)
    W_new = (I + lr/2 A)^-1 (I - lr/2 A) W

moves along a descent curve (to first order `W - lr (G - W G^T W)`) and keeps W orthogonal exactly, since
the Cayley transform of a skew-symmetric matrix is orthogonal. Linear solves run in float32, batched
over leading (stacked-layer) axes.

    optimizer = with_orthogonal(optax.adamw(1e-3), learning_rate=0.1)   # Cayley on Orthogonal, AdamW else
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hyjax.adapters.unitary_full import Orthogonal


def _is_orth(node) -> bool:
    return isinstance(node, Orthogonal)


class CayleyState(NamedTuple):
    count: jax.Array  # steps taken, for learning-rate schedules


def cayley_step(w: jax.Array, g: jax.Array, learning_rate) -> jax.Array:
    """`(I + lr/2 A)^-1 (I - lr/2 A) W` with `A = G W^T - W G^T`, for `[..., d, d]` W and G."""
    w32, g32 = w.astype(jnp.float32), g.astype(jnp.float32)
    t = lambda m: jnp.swapaxes(m, -1, -2)  # noqa: E731
    a = g32 @ t(w32) - w32 @ t(g32)  # [..., d, d], skew-symmetric
    eye = jnp.eye(w.shape[-1], dtype=jnp.float32)
    half = 0.5 * learning_rate * a
    return jnp.linalg.solve(eye + half, (eye - half) @ w32).astype(w.dtype)


def cayley_retraction(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Gradient descent on the orthogonal group for every `Orthogonal` parameter: updates are
    `cayley_step(W, G, lr) - W`. Every other parameter is an error (see `with_orthogonal`). Needs params."""

    def init(params):
        del params
        return CayleyState(count=jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("cayley_retraction needs the current params: call update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def step(g, p):
            if not _is_orth(g):
                raise TypeError(f"cayley_retraction updates only Orthogonal parameters, got {type(g).__name__}; "
                                f"use with_orthogonal(inner, learning_rate) to train the others with `inner`")
            return g.replace(matrix=cayley_step(p.matrix, g.matrix, lr) - p.matrix)

        updates = jax.tree.map(step, grads, params, is_leaf=_is_orth)
        return updates, CayleyState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def orthogonal_labels(params: Any) -> Any:
    """"orthogonal" for the leaves of `Orthogonal` nodes, "euclidean" for every other leaf."""
    def label(node):
        if _is_orth(node):
            return jax.tree.map(lambda _: "orthogonal", node)
        return "euclidean"

    return jax.tree.map(label, params, is_leaf=_is_orth)


def with_orthogonal(inner: optax.GradientTransformation,
                    learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Cayley steps (`cayley_retraction(learning_rate)`) on `Orthogonal` parameters, `inner` on the rest."""
    return optax.multi_transform({"orthogonal": cayley_retraction(learning_rate), "euclidean": inner},
                                 orthogonal_labels)
