"""Zeroth-order (MeZO-style two-point SPSA) updates of the base weights, for the ZO + FO hybrid.

With a random direction `z ~ N(0, I)` over every zeroth-order weight `theta`,

    g = (L(theta + mu z) - L(theta - mu z)) / (2 mu)

is a finite-difference estimate of the directional derivative `grad L . z` (exact up to O(mu^2)), and
`g z` an estimate of the gradient: `E[(grad L . z) z] = E[z z^T] grad L = grad L`. Each step averages
`directions` such estimates and moves `theta <- theta - lr (mean_i g_i z_i + weight_decay theta)`.

`z` is never stored. It is regenerated from the step's key, the direction and the weight's index
wherever it is needed (perturbing, then updating), by `jax.random.normal` inside the jitted step.
With JAX's partitionable threefry (`jax_threefry_partitionable`, on by default) each device computes
only the shard of `z` its weights hold and the values do not depend on the mesh, so every process
perturbs consistently without communicating. The zeroth-order part therefore needs the weights, one
working copy of them (each perturbation, and at the end the updated weights, are written into it in
place; stacked weights one layer at a time) and forward passes: no gradients, no optimizer state.

The zeroth-order weights live in `TrainState.base` (checkpointed with the run): `ZerothOrder` is the
method's `hyjax.methods.OwnWeights`. `split` takes them out of the frozen tree (an adapted weight gives
its `base`, a plain weight itself) and `join` puts them back; `wrap` (`zeroth_order_step`) extends a
first-order training step into the hybrid's step.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hyjax.adapters.node import AdaptedWeight
from hyjax.adapters.targets import iter_paths, map_paths, nest


@dataclasses.dataclass(frozen=True)
class ZerothOrder:
    """How a run's base weights are trained by SPSA.

    targets: regexes over weight paths (`layers/attn/q_proj`, `embed`); a weight whose path matches
      one fully is trained zeroth-order, whether or not an adapter sits on it.
    mu: perturbation scale. directions: SPSA directions averaged per step (two forward passes each).
    schedule: learning rate of the zeroth-order update by step. weight_decay: decoupled, relative to lr.
    """

    targets: tuple[str, ...]
    mu: float
    directions: int
    schedule: optax.Schedule
    weight_decay: float = 0.0

    def matches(self, path: str) -> bool:
        return any(re.fullmatch(pattern, path) for pattern in self.targets)

    def split(self, frozen: dict) -> tuple[dict, dict]:
        """`(base, rest)`: the zeroth-order weights by path, and `frozen` without them (an adapted
        weight keeps its adapter with `base=None`, a plain weight becomes None). Works on any tree of
        the frozen tree's structure (arrays, shapes, axes)."""
        taken = {}

        def take(path, leaf):
            if leaf is None or not self.matches(path):
                return leaf
            if isinstance(leaf, AdaptedWeight):
                if leaf.base is None:  # trained first-order (full fine-tuning): not ours
                    return leaf
                taken[path] = leaf.base
                return leaf.replace(base=None)
            taken[path] = leaf
            return None

        rest = map_paths(take, frozen)
        if not taken:
            raise ValueError(f"the zeroth-order targets {list(self.targets)} match no frozen weight; available: "
                             f"{[path for path, _ in iter_paths(frozen)]}")
        return nest(taken), rest

    def join(self, base: dict, rest: dict) -> dict:
        """The inverse of `split` (`join_base`)."""
        return join_base(base, rest)

    def wrap(self, first_order, batch_loss):
        """The ZO + FO hybrid's step around a first-order step (`zeroth_order_step`)."""
        return zeroth_order_step(first_order, batch_loss, self)


def join_base(base: dict | None, rest: dict) -> dict:
    """The inverse of `ZerothOrder.split` (`base` None: `rest` itself)."""
    if base is None:
        return rest
    weights = dict(iter_paths(base))

    def put(path, leaf):
        if path not in weights:
            return leaf
        return leaf.replace(base=weights[path]) if isinstance(leaf, AdaptedWeight) else weights[path]

    return map_paths(put, rest)


def _z(key: jax.Array, layer, like: jax.Array) -> jax.Array:
    """The direction of one weight (its own `key`) at `layer` (None: a weight without layer axis)."""
    return jax.random.normal(key if layer is None else jax.random.fold_in(key, layer), like.shape, jnp.float32)


def _write(out: jax.Array, w: jax.Array, new) -> jax.Array:
    """`new(w, layer)` (float32 math, stored in out's dtype) written into `out`'s buffer. A weight with a
    leading layer axis (ndim >= 3) is done one layer at a time, so only one layer's random numbers
    exist at once; inside a loop that carries `out`, or with `out` donated, the write is in place."""
    if w.ndim < 3:
        return out.at[...].set(new(w.astype(jnp.float32), None).astype(out.dtype))

    in_place = out is w  # then read each layer from the loop's own buffer (not yet overwritten there)

    def layer(l, out):
        source = out if in_place else w
        return out.at[l].set(new(source[l].astype(jnp.float32), l).astype(out.dtype))

    return jax.lax.fori_loop(0, w.shape[0], layer, out)


def _weight_key(key: jax.Array, direction, index: int) -> jax.Array:
    """The key of the `index`-th weight's part of direction `direction`."""
    return jax.random.fold_in(jax.random.fold_in(key, direction), index)


def perturbed(base: Any, key: jax.Array, direction, scale, into: Any = None) -> Any:
    """`base + scale * z_direction`, written into `into`'s buffers (default: a new copy)."""
    outs, treedef = jax.tree.flatten(base if into is None else into)
    return treedef.unflatten([
        _write(out, w, lambda w, l, k=_weight_key(key, direction, j): w + scale * _z(k, l, w))
        for j, (out, w) in enumerate(zip(outs, jax.tree.leaves(base)))])


def projected_gradients(loss_fn, base: Any, key: jax.Array, mu: float, directions: int):
    """`(g, loss_plus, loss_minus, work)`: the two-point SPSA estimates `g [directions]` of the directional
    derivatives of `loss_fn(weights)` at `base` along the directions drawn from `fold_in(key, i)`, the
    losses they come from, and the working copy (for `spsa_update(..., into=work)`).

    One loop over the `2 * directions` evaluations carries a single working copy of the weights, and
    each perturbation `base +- mu z_i` is written into it in place: the weights plus one copy, whatever
    the number of directions. The `j`-th weight's part of direction i is drawn from
    `fold_in(fold_in(key, i), j)` (and `fold_in(.., l)` for its layer l)."""
    index = jnp.repeat(jnp.arange(directions), 2)
    sign = jnp.tile(jnp.array([1.0, -1.0], jnp.float32), directions)

    def evaluate(work, inputs):
        i, s = inputs
        work = perturbed(base, key, i, s * mu, into=work)
        return work, loss_fn(work)

    work, losses = jax.lax.scan(evaluate, base, (index, sign))
    plus, minus = losses[0::2], losses[1::2]
    return (plus - minus) / (2.0 * mu), plus, minus, work


def spsa_update(base: Any, key: jax.Array, g: jax.Array, learning_rate: jax.Array, weight_decay: float = 0.0,
                into: Any = None) -> Any:
    """`base - lr (mean_i g_i z_i + weight_decay base)`, regenerating each direction `z_i` (drawn as in
    `projected_gradients`), written into `into`'s buffers (`projected_gradients`'s working copy, so the
    step needs no other copy of the weights; default: a new copy). Directions whose estimate is not
    finite are skipped."""
    g = jnp.where(jnp.isfinite(g), g, 0.0) / g.shape[0]
    leaves, treedef = jax.tree.flatten(base)

    def new(j):
        def updated(w, layer):
            def add(i, total):
                return total + g[i] * _z(_weight_key(key, i, j), layer, w)

            step = jax.lax.fori_loop(0, g.shape[0], add, jnp.zeros(w.shape, jnp.float32))
            return w * (1.0 - learning_rate * weight_decay) - learning_rate * step
        return updated

    outs = leaves if into is None else jax.tree.leaves(into)
    return treedef.unflatten([_write(out, w, new(j)) for j, (out, w) in enumerate(zip(outs, leaves))])


def zeroth_order_step(first_order, batch_loss, zeroth_order: ZerothOrder):
    """The ZO + FO hybrid's step around a first-order step.

    `first_order(state, frozen, batch, key) -> (state, metrics)` is the adapters' backprop step and
    `batch_loss(trainable, frozen, opt_state, batch, key)` the step's loss by forward passes alone.
    The returned `step(state, frozen, batch, key)` (with `state.base` the zeroth-order weights and
    `frozen` the rest) splits `key` into the first-order step's randomness and the SPSA directions',
    estimates the directional derivatives at the current point (same adapters, same dropout), takes the
    first-order step there, and moves `state.base` by `spsa_update` in the SPSA working copy. A skipped
    step changes no weight: when the first-order gradient is not finite (the optimizer skips the
    adapters' update) or any SPSA estimate is not finite, the base weights keep their values (the SPSA
    update and its weight decay run at learning rate 0) and so do the adapters and their optimizer
    state. Added metrics: `zo_projected_grad` (the mean estimate), `zo_loss_difference` (mean L+ - L-)
    and `zo_learning_rate`.
    """

    def step(state, frozen, batch, key):
        key, zo_key = jax.random.split(key)
        g, plus, minus, work = projected_gradients(
            lambda base: batch_loss(state.trainable, join_base(base, frozen), state.opt_state, batch, key),
            state.base, zo_key, zeroth_order.mu, zeroth_order.directions)
        updated, metrics = first_order(state, join_base(state.base, frozen), batch, key)
        finite = jnp.all(jnp.isfinite(g))
        skipped = jnp.maximum(metrics["skipped"], jnp.logical_not(finite).astype(jnp.int32))
        learning_rate = zeroth_order.schedule(state.step)
        applied = jnp.where(skipped > 0, jnp.zeros_like(learning_rate), learning_rate)  # lr 0: w stays w
        base = spsa_update(state.base, zo_key, g, applied, zeroth_order.weight_decay, into=work)  # in the working copy
        trainable, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                            (updated.trainable, updated.opt_state), (state.trainable, state.opt_state))
        metrics = {**metrics, "skipped": skipped, "zo_projected_grad": jnp.mean(g),
                   "zo_loss_difference": jnp.mean(plus - minus), "zo_learning_rate": learning_rate}
        return updated.replace(trainable=trainable, opt_state=opt_state, base=base), metrics

    return step
