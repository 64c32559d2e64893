"""`AdaptedWeight`: a frozen weight and an adapter acting on it, living in the weight's slot of the tree.

Every method defines one subclass (a pytree dataclass). Its leaves are either frozen (`base`, random
keys, mixing weights) or trainable (the fields named in `TRAINABLE`), so trainable parameters are chosen
by type, never by hand-written masks. In the model's scanned layers every leaf carries the weight's
leading `layers` axis; inside the scan each node sees one layer, where `apply_to` runs.

Each subclass also converts itself to and from Hugging Face PEFT's format (the `PEFT_*` class
attributes and `peft_*` / `from_peft` methods, used by `hyjax.adapters.peft_io`); the defaults say that
PEFT cannot hold the adapter.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import numpy as np
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
    # Frozen fields drawn from data at start-up (LoRA-GA's initial factors, from the gradient estimate):
    # they cannot be recomputed exactly elsewhere (another mesh sums the gradient in another order), so
    # checkpoints keep them and a restored run is rebuilt from them (`hyjax.adapters.starting_values`).
    STARTING: ClassVar[tuple[str, ...]] = ()

    # Hugging Face PEFT (see hyjax.adapters.peft_io). PEFT_TYPE: the `peft_type` the adapter is written
    # as (None: PEFT cannot hold it); PEFT_CONFIG: that type's fixed adapter_config.json entries;
    # PEFT_SAVED_WHOLE: the weight is trained fully and written whole (PEFT's `modules_to_save`).
    # The class that reads a PEFT_TYPE back defines `from_peft` and, in PEFT_TENSORS, the type's tensor
    # names per module, each with its identity value (filled in for layers an adapter leaves out).
    PEFT_TYPE: ClassVar[str | None] = None
    PEFT_CONFIG: ClassVar[dict[str, Any]] = {}
    PEFT_SAVED_WHOLE: ClassVar[bool] = False
    PEFT_TENSORS: ClassVar[dict[str, float]] = {}

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

    def starting(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.STARTING}

    def frozen(self) -> "AdaptedWeight":
        return self.replace(**{name: None for name in self.TRAINABLE})

    # ---------------------------------------------------------------- Hugging Face PEFT

    def peft_settings(self, path: str) -> dict[str, Any]:
        """PEFT's hyperparameters of this adapter (written to adapter_config.json; one set per tree).
        Raises `peft_unsupported` naming `path` where PEFT cannot represent it. For PEFT_TYPE classes."""
        raise NotImplementedError(f"{type(self).__name__} declares PEFT_TYPE={self.PEFT_TYPE!r} without peft_settings")

    def peft_layers(self, num_layers: int | None) -> list:
        """Per layer (`num_layers`; one entry for an unstacked weight, `None`): the PEFT tensors of the
        layer's adapter by name, in PEFT's layout, or the whole trained weight `W^T` `[d_out, d_in]` as one
        array for a layer trained fully. For PEFT_TYPE and PEFT_SAVED_WHOLE classes."""
        raise NotImplementedError(f"{type(self).__name__} has no PEFT form")

    @classmethod
    def check_peft_config(cls, peft: dict[str, Any], source: str) -> None:
        """Raises a ValueError starting `{source}: ` for settings of PEFT's adapter_config `peft` that
        `from_peft` cannot read. Default: none."""

    @classmethod
    def from_peft(cls, peft: dict[str, Any], base: jax.Array, tensors: dict[str, np.ndarray]) -> "AdaptedWeight":
        """The adapter on `base` read from PEFT's adapter_config `peft` and `tensors` (PEFT_TENSORS' names,
        PEFT's layout, stacked like `base`). Defined by the class that imports its PEFT_TYPE."""
        raise NotImplementedError(f"{cls.__name__} does not import PEFT adapters")


class DropoutKeyed:
    """`with_rng` for adapted weights with a static `dropout` rate and a `dropout_key` leaf: one key per
    stacked layer while training, none (dropout off) for evaluation."""

    def with_rng(self, key):
        if self.dropout == 0:
            return self
        if key is None:
            return self.replace(dropout_key=None)
        return self.replace(dropout_key=split_keys(key, self.leading_shape))


def peft_unsupported(reason: str) -> ValueError:
    """The error for an adapter tree PEFT's format cannot hold; it points to the merged export."""
    return ValueError(f"PEFT cannot represent this adapter tree: {reason}. Write a merged Hugging Face "
                      "checkpoint instead with hyjax.adapters.export_merged(folder, config, adapted_params)")


def peft_kernel(w) -> np.ndarray:
    """A `[..., d_in, d_out]` kernel (or factor) in PEFT's (torch Linear) layout `[..., d_out, d_in]`, float32."""
    return np.swapaxes(np.asarray(w, np.float32), -1, -2)


def peft_per_layer(tensors: dict[str, np.ndarray], num_layers: int | None) -> list[dict[str, np.ndarray]]:
    """PEFT tensors stacked over `num_layers` layers split into one dict per layer (`None`: unstacked, one)."""
    if not num_layers:
        return [tensors]
    return [{name: value[i] for name, value in tensors.items()} for i in range(num_layers)]


def _vmap_leading(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn
