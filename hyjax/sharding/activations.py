"""Sharding constraints on activations by logical names, active only inside `activation_sharding`.

The model marks a few activations (`constrain(x, ("batch", "seq", "embed"))`) without knowing any
mesh; the training step traces the model inside `activation_sharding(layout)`, which turns the marks
into `with_sharding_constraint` on that layout. Outside it (single-device use, generation) they do
nothing. Without the marks XLA's propagation may split the hidden dimension like the FSDP-split
weights instead of the batch, multiplying activation memory.

Pallas kernels are custom calls the partitioner cannot split: `on_local_tokens` runs one under
`shard_map`, each device applying it to its own rows of the batch; `on_local_heads` runs attention on
each device's rows and heads.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_ACTIVE = contextvars.ContextVar("hyjax_activation_layout", default=None)
_FEATURES = contextvars.ContextVar("hyjax_input_features", default=None)


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar, value):
    """`variable` set to `value` inside the block, restored after it."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def activation_sharding(layout):
    """Activations marked with `constrain` follow `layout` (a `hyjax.sharding.Layout`) while tracing."""
    return _setting(_ACTIVE, layout)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`x` constrained to the active layout's sharding of logical `names` (no-op without one)."""
    layout = _ACTIVE.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(names))


def input_features(name: str | None):
    """While tracing a projection: the logical name of its input's last axis ("embed", "heads", "mlp"),
    for kernels that run per device (`on_local_tokens`). Set by `hyjax.model.linear`."""
    return _setting(_FEATURES, name)


def on_local_tokens(fn, x: jax.Array, *whole: jax.Array, window: int | None = None,
                    whole_feature_axes: tuple[int, ...] = ()) -> jax.Array:
    """`fn(x, *whole)` for activations `x [batch, ..., features]`, each device computing its own rows.

    Inside `activation_sharding` this is a `shard_map` over the layout's batch axes: x's rows split like
    the batch, `whole` (a layer's rotation) gathered on every device like an FSDP weight, the result split
    like x's rows. `fn` must act on rows independently (a Pallas kernel per token); its custom_vjp is kept.
    Outside a layout, `fn(x, *whole)`.

    Features split over the mesh (the input of o_proj and down_proj over tensor, see `input_features`) are
    gathered, unless `fn` acts on aligned windows of `window` features independently and each device's
    part of the features is a whole number of windows: then every device keeps its features and takes
    its part of each `whole[i]` along axis `whole_feature_axes[i]` (the butterfly's blocks), and nothing is
    gathered but the rotation.
    """
    layout = _ACTIVE.get()
    if layout is None:
        return fn(x, *whole)
    batch, features = layout.spec(("batch", _FEATURES.get()))
    ways = layout.ways_of(features)
    if features is None or window is None or (x.shape[-1] // ways) % window or x.shape[-1] % ways:
        features = None  # gathered
    rows = P(batch, *(None,) * (x.ndim - 2), features)
    axes = whole_feature_axes or (None,) * len(whole)
    whole_specs = [P() if features is None or axis is None else P(*(None,) * axis, features) for axis in axes]
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(rows, *whole_specs), out_specs=rows,
                         check_vma=False)(x, *whole)


def on_local_heads(fn, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """`fn(q, k, v, segment_ids)` for attention (`q [batch, seq, heads, head_dim]`, `k, v [batch, seq,
    kv_heads, head_dim]`, `segment_ids [batch, seq]`), each device computing its own rows and heads.

    Inside `activation_sharding` this is a `shard_map`: rows split like the batch, query heads like
    "heads", the sequence whole on every device. Key/value heads split with the query heads when each
    device's query heads are whole groups of its own key/value heads; otherwise they are first repeated
    up to one per query head (O(seq) memory), so every device holds the ones its query heads use.
    Outside a layout, `fn(q, k, v, segment_ids)`.
    """
    layout = _ACTIVE.get()
    if layout is None:
        return fn(q, k, v, segment_ids)
    batch, heads = layout.spec(("batch", "heads"))
    ways = layout.ways_of(heads)
    if q.shape[2] % ways:
        heads = None  # gathered
    elif k.shape[2] % ways:
        k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))
    per_head = P(batch, None, heads, None)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(per_head, per_head, per_head, P(batch, None)),
                         out_specs=per_head, check_vma=False)(q, k, v, segment_ids)
