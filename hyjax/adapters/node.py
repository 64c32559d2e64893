"""`AdaptedWeight`: a frozen weight and an adapter acting on it, living in the weight's slot of the tree.

Every method defines one subclass (a pytree dataclass). Its leaves are either frozen (`base`, random
keys, mixing weights) or trainable (the fields named in `TRAINABLE`), so trainable parameters are chosen
by type, never by hand-written masks. In the model's scanned layers every leaf carries the weight's
leading `layers` axis; inside the scan each node sees one layer, where `apply_to` runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
from flax import struct

from hyjax.adapters.stacking import split_keys


class AdaptedWeight(struct.PyTreeNode):
    """Base class of adapted weights. `base` is the frozen `[..., d_in, d_out]` weight.

    Subclasses implement `apply_to` (on activations, for training), `merged_2d` (the plain weight, for
    export) and `unmerge_2d` (the base weight back from a merged one), each for a single 2-D weight.
    """

    base: jax.Array
    NAME: ClassVar[str] = "adapter"
    TRAINABLE: ClassVar[tuple[str, ...]] = ()
    # Logical axis names of each array field but `base` (which keeps the weight's own) for one 2-D
    # weight; "in"/"out" stand for the base weight's names (see hyjax.sharding.axes). Unlisted fields
    # are replicated.
    AXES: ClassVar[dict[str, tuple[str | None, ...]]] = {}

    def apply_to(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def merged_2d(self) -> jax.Array:
        raise NotImplementedError

    def unmerge_2d(self, merged: jax.Array) -> jax.Array:
        raise NotImplementedError

    def with_rng(self, key: jax.Array | None) -> "AdaptedWeight":
        """The node with fresh randomness (dropout) for one step; `None` switches it off. Default: none."""
        return self

    # ---------------------------------------------------------------- stacked-layer plumbing

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return self.base.shape[:-2]

    def merged(self) -> jax.Array:
        """The equivalent plain weight, for any number of leading (stacked-layer) axes."""
        return _vmap_leading(type(self).merged_2d, len(self.leading_shape))(self)

    def unmerge(self, merged: jax.Array) -> "AdaptedWeight":
        """This adapter with `base` recovered from a merged weight (the inverse of `merged`)."""
        base = _vmap_leading(type(self).unmerge_2d, len(self.leading_shape))(self, merged)
        return self.replace(base=base)

    def trainable(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.TRAINABLE}

    def frozen(self) -> "AdaptedWeight":
        return self.replace(**{name: None for name in self.TRAINABLE})


class DropoutKeyed:
    """`with_rng` for adapted weights with a static `dropout` rate and a `dropout_key` leaf: one key per
    stacked layer while training, none (dropout off) for evaluation."""

    def with_rng(self, key):
        if self.dropout == 0:
            return self
        if key is None:
            return self.replace(dropout_key=None)
        return self.replace(dropout_key=split_keys(key, self.leading_shape))


def _vmap_leading(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn
