"""Hybrid-LoRA: a few layers of a stacked weight trained fully, LoRA on the others.

`SelectiveWeight` adapts a weight stacked over layers, `base [L, d_in, d_out]`. The chosen layers
(`chosen [k]`, sorted) are trained as they are, through `full [k, d_in, d_out]` (initialised to their
base weights); every other layer l computes LoRA's `x W0_l + s (dropout(x) a_l) b_l`:

    y_l = x full_j                               l = chosen[j]
    y_l = x W0_l + s (dropout(x) a_l) b_l        otherwise

The model scans its layers by slicing every leaf along axis 0, which `full` (k != L) does not allow,
so the model converts the node first (`hyjax.model.linear.scan_ready`) into its `scan_form`: a
`LoRAWeight` on `base.at[chosen].set(full)` whose `b` is zeroed on the chosen layers. Gradients then
reach `full` through the scatter, and `a`, `b` of chosen layers get exactly zero gradient.

Which modules to choose: `hyjax.methods.hybrid_lora.module_scores`. `selective_spec` turns a choice into an
`AdapterSpec`: LoRA where nothing is chosen, full fine-tuning where everything is, this node between.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hyjax.adapters.api import AdapterSpec
from hyjax.adapters.full import FullConfig
from hyjax.adapters.lora import LoRAConfig, LoRAWeight
from hyjax.adapters.node import AdaptedWeight, DropoutKeyed, peft_kernel
from hyjax.adapters.targets import stacked_axes


class SelectiveWeight(DropoutKeyed, AdaptedWeight):
    """A stacked frozen weight with fully trained layers `chosen` (their weights in `full`) and LoRA
    factors `a`, `b` acting on the other layers. Only ever applied through `scan_form`."""

    a: jax.Array = None       # [L, d_in, r]
    b: jax.Array = None       # [L, r, d_out]
    full: jax.Array = None    # [k, d_in, d_out]  the chosen layers' trained weights
    chosen: jax.Array = None  # [k] int32, sorted, distinct (frozen)
    dropout_key: jax.Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    NAME: ClassVar[str] = "hybrid_lora"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("a", "b", "full")
    AXES: ClassVar[dict] = {**AdaptedWeight.AXES, "a": ("in+out", "out"), "b": ("in", "out+in"),
                            "full": ("in", "out")}
    # PEFT: LoRA on the other layers, the chosen layers written whole (`modules_to_save`).
    PEFT_TYPE: ClassVar[str | None] = LoRAWeight.PEFT_TYPE
    PEFT_CONFIG: ClassVar[dict] = LoRAWeight.PEFT_CONFIG

    def scan_form(self) -> LoRAWeight:
        """The equivalent `LoRAWeight` with every leaf stacked over all L layers: the chosen layers'
        base replaced by `full` and their LoRA switched off (`b` times a per-layer 0/1 mask)."""
        num_layers = self.base.shape[0]
        lora_on = jnp.ones((num_layers,), self.b.dtype).at[self.chosen].set(0)
        base = jnp.asarray(self.base)  # host (numpy) trees are merged for export too
        return LoRAWeight(base=base.at[self.chosen].set(self.full.astype(base.dtype)), a=self.a,
                          b=self.b * lora_on[:, None, None], dropout_key=self.dropout_key, scale=self.scale,
                          dropout=self.dropout)

    def apply_to(self, x):
        raise TypeError("a SelectiveWeight holds all layers of a stacked weight and cannot be applied to one "
                        "layer's activations; apply its scan_form() (hyjax.model.apply does this itself)")

    def merged(self) -> jax.Array:
        """The plain stacked weight: `full` on the chosen layers, `base + s a b` on the others."""
        return self.scan_form().merged()

    def unmerge(self, merged: jax.Array) -> "SelectiveWeight":
        """`base = merged - s a b` on the other layers (the chosen layers keep their base weight) and
        `full = merged[chosen]`, so that `unmerge(M).merged() == M`."""
        lora = LoRAWeight(base=self.base, a=self.a, b=self.b, scale=self.scale).unmerge(merged)
        base = jnp.asarray(lora.base).at[self.chosen].set(self.base[self.chosen])
        return self.replace(base=base, full=merged[self.chosen].astype(self.full.dtype))

    def _lora(self) -> LoRAWeight:
        """The LoRA of every layer, chosen ones included (PEFT export replaces those)."""
        return LoRAWeight(base=self.base, a=self.a, b=self.b, scale=self.scale, dropout=self.dropout)

    def peft_settings(self, path):
        return self._lora().peft_settings(path)

    def peft_layers(self, num_layers):
        layers = self._lora().peft_layers(num_layers)
        for j, i in enumerate(np.asarray(self.chosen).tolist()):
            layers[i] = peft_kernel(self.full[j])
        return layers


@dataclasses.dataclass(frozen=True)
class SelectiveConfig:
    """Hybrid-LoRA on one stacked weight: layers `chosen` trained fully, `lora` on the others.

    `chosen` is stored sorted; it must hold distinct layer indices (range checked against the weight).
    """

    lora: LoRAConfig
    chosen: tuple[int, ...]
    name: ClassVar[str] = "hybrid_lora"
    TARGETS: ClassVar[str] = "projections"  # default targets (hyjax.adapters.targets)

    def __post_init__(self):
        chosen = tuple(sorted(int(i) for i in self.chosen))
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"hybrid_lora chosen={self.chosen} repeats a layer; list each layer once")
        object.__setattr__(self, "chosen", chosen)

    def init_stacked(self, base: jax.Array, key: jax.Array, gradient=None, stacked_axes: int = 0) -> SelectiveWeight:
        """LoRA initialised as `LoRAConfig.init` on every layer; `full` = the chosen layers' base weights."""
        if stacked_axes != 1 or base.ndim != 3:
            raise ValueError(f"method 'hybrid_lora' chooses layers of a weight stacked over one layer axis; got "
                             f"shape {base.shape} with {stacked_axes} stacked layer axis(es). Use FullConfig or "
                             "LoRAConfig for it (selective_spec does)")
        num_layers = base.shape[0]
        outside = [i for i in self.chosen if not 0 <= i < num_layers]
        if outside:
            raise ValueError(f"hybrid_lora chosen layers {outside} are outside 0..{num_layers - 1} of a weight of "
                             f"shape {base.shape}")
        lora = self.lora.init_stacked(base, key, None, stacked_axes)
        chosen = jnp.asarray(self.chosen, jnp.int32)
        return SelectiveWeight(base=base, a=lora.a, b=lora.b, full=base[chosen], chosen=chosen, scale=lora.scale,
                               dropout=lora.dropout)


def selective_spec(chosen: Mapping[str, tuple[int, ...]], lora: LoRAConfig, num_layers: int) -> AdapterSpec:
    """The `AdapterSpec` of a Hybrid-LoRA selection, one rule per target path (`re.escape(path)`).

    `chosen` maps every target path to its fully trained layers (an unstacked weight, e.g. `lm_head`,
    counts as one layer 0). Nothing chosen: `lora`; every layer (or the unstacked weight): `FullConfig()`;
    else `SelectiveConfig(lora, layers)`.
    """
    rules = []
    for path, layers in sorted(chosen.items()):
        count = num_layers if stacked_axes(path) else 1
        outside = [i for i in layers if not 0 <= i < count]
        if outside:
            raise ValueError(f"chosen layers {outside} of {path} are outside 0..{count - 1}")
        if not layers:
            method = lora
        elif len(set(layers)) == count:
            method = FullConfig()
        else:
            method = SelectiveConfig(lora, tuple(layers))
        rules.append((re.escape(path), method))
    return AdapterSpec(tuple(rules))
