"""Full-capacity unitary adapter (Wisdom et al. 2016) for small d_in: a dense orthogonal input rotation.

`y = (x @ W) @ W0` with W a real `[d_in, d_in]` orthogonal matrix, the identity at init (so nothing is
folded into W0). W is an `Orthogonal` parameter: `hyjax.optim.stiefel` updates it with the Cayley
retraction, which keeps `W^T W = I` exactly (up to rounding) instead of projecting after the fact.
Dense by construction (d_in^2 parameters, O(d_in^2) per token), hence only for small d_in
(`UnitaryConfig(full_capacity=True, max_full_capacity_dim=...)`).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from hyjax.adapters.node import AdaptedWeight


class Orthogonal(struct.PyTreeNode):
    """A square matrix kept orthogonal (`matrix^T matrix = I`) by its optimizer; the type marks it for
    `hyjax.optim.stiefel`."""

    matrix: jax.Array  # [..., d, d]


class UnitaryFullWeight(AdaptedWeight):
    """`y = (x @ W) @ base` with W orthogonal."""

    rotation: Orthogonal = None  # matrix [d_in, d_in]
    NAME: ClassVar[str] = "unitary_full"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("rotation",)
    AXES: ClassVar[dict] = {**AdaptedWeight.AXES, "rotation": ("in", "out")}

    @classmethod
    def identity(cls, base: jax.Array, dtype: str = "float32") -> "UnitaryFullWeight":
        return cls(base=base, rotation=Orthogonal(jnp.eye(base.shape[0], dtype=dtype)))

    def apply_to(self, x):
        rotated = jnp.dot(x, self.rotation.matrix.astype(x.dtype))  # [..., d_in]
        return jnp.dot(rotated, self.base.astype(x.dtype))

    def merged_2d(self):
        w = self.rotation.matrix.astype(jnp.float32)
        return jnp.dot(w, self.base.astype(jnp.float32)).astype(self.base.dtype)

    def unmerge_2d(self, merged):
        w = self.rotation.matrix.astype(jnp.float32)
        return jnp.dot(w.T, merged.astype(jnp.float32)).astype(merged.dtype)
