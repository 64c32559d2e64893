"""Full fine-tuning: the whole weight is trainable (the baseline, and Hybrid-LoRA's selected modules)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from hyjax.adapters.node import AdaptedWeight, peft_kernel


class FullWeight(AdaptedWeight):
    """A weight trained as it is. Works on any leaf (projections, embeddings, norm scales)."""

    NAME: ClassVar[str] = "full"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("base",)
    PEFT_SAVED_WHOLE: ClassVar[bool] = True

    def apply_to(self, x):
        return jnp.dot(x, self.base.astype(x.dtype))

    def merged(self):
        return self.base

    def unmerge(self, merged):
        return self.replace(base=merged)

    def peft_layers(self, num_layers):
        whole = peft_kernel(self.base)
        return list(whole) if num_layers else [whole]


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """Train the targeted weights fully."""

    name: ClassVar[str] = "full"
    TARGETS: ClassVar[str] = "everything"  # default targets: every parameter (hyjax.adapters.targets)

    def init_stacked(self, base: jax.Array, key: jax.Array, gradient=None, stacked_axes: int = 0) -> FullWeight:
        return FullWeight(base=base)
