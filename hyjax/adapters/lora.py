"""LoRA: `y = x W0 + s (dropout(x) A) B`, A Kaiming-uniform, B zero, so training starts at W0.

Shapes (our `[d_in, d_out]` kernel layout): A `[d_in, r]`, B `[r, d_out]`. Hugging Face PEFT stores
`lora_A.weight = A^T` (`[r, d_in]`) and `lora_B.weight = B^T` (`[d_out, r]`). The scale s is `alpha / r`,
or `alpha / sqrt(r)` with rsLoRA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hyjax.adapters.node import AdaptedWeight, DropoutKeyed, peft_kernel, peft_per_layer
from hyjax.adapters.stacking import StackedInit
from hyjax.model.config import DTYPES
from hyjax.validation import one_of


class LoRAWeight(DropoutKeyed, AdaptedWeight):
    """A frozen weight plus a low-rank update applied to activations."""

    a: jax.Array = None  # [d_in, r]
    b: jax.Array = None  # [r, d_out]
    dropout_key: jax.Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    NAME: ClassVar[str] = "lora"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("a", "b")
    AXES: ClassVar[dict] = {**AdaptedWeight.AXES, "a": ("in+out", "out"), "b": ("in", "out+in")}
    PEFT_TYPE: ClassVar[str | None] = "LORA"
    PEFT_CONFIG: ClassVar[dict] = {"use_rslora": False, "init_lora_weights": True}  # scale = lora_alpha / r
    PEFT_TENSORS: ClassVar[dict[str, float]] = {"lora_A.weight": 0.0, "lora_B.weight": 0.0}

    def apply_to(self, x):
        y = jnp.dot(x, self.base.astype(x.dtype))
        h = x
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        update = jnp.dot(jnp.dot(h, self.a.astype(x.dtype)), self.b.astype(x.dtype))
        return y + self.scale * update

    def delta_2d(self):
        return self.scale * jnp.dot(self.a.astype(jnp.float32), self.b.astype(jnp.float32))

    def merged_2d(self):
        return (self.base.astype(jnp.float32) + self.delta_2d()).astype(self.base.dtype)

    def unmerge_2d(self, merged):
        return (merged.astype(jnp.float32) - self.delta_2d()).astype(merged.dtype)

    # ---------------------------------------------------------------- Hugging Face PEFT

    def peft_settings(self, path):
        rank = self.a.shape[-1]
        return {"r": int(rank), "lora_alpha": self.scale * rank, "lora_dropout": self.dropout}

    def peft_layers(self, num_layers):
        return peft_per_layer({"lora_A.weight": peft_kernel(self.a), "lora_B.weight": peft_kernel(self.b)},
                              num_layers)

    @classmethod
    def check_peft_config(cls, peft, source):
        for key in ("use_dora", "lora_bias"):
            if peft.get(key):
                raise ValueError(f"{source}: {key}=true is not supported by import_peft")
        for key in ("rank_pattern", "alpha_pattern"):
            if peft.get(key):
                raise ValueError(f"{source}: per-module {key}={peft[key]} is not supported by import_peft")

    @classmethod
    def from_peft(cls, peft, base, tensors):
        rank = int(peft["r"])
        scale = peft["lora_alpha"] / (np.sqrt(rank) if peft.get("use_rslora") else rank)
        a = np.swapaxes(tensors["lora_A.weight"], -1, -2)  # [..., d_in, r]
        b = np.swapaxes(tensors["lora_B.weight"], -1, -2)  # [..., r, d_out]
        if a.shape[-1] != rank:
            raise ValueError(f"PEFT adapter declares r={rank} but lora_A has rank {a.shape[-1]}")
        return cls(base=base, a=jnp.asarray(a), b=jnp.asarray(b), scale=float(scale),
                   dropout=float(peft.get("lora_dropout", 0.0)))


@dataclasses.dataclass(frozen=True)
class LoRAConfig(StackedInit):
    """LoRA hyperparameters: rank r, alpha (scale alpha/r, or alpha/sqrt(r) with `rslora`), dropout on the
    adapter's input, and the dtype of A and B."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    dtype: str = "float32"
    name: ClassVar[str] = "lora"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        one_of("dtype", self.dtype, DTYPES)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def init(self, base: jax.Array, key: jax.Array, gradient=None) -> LoRAWeight:
        """A ~ Kaiming-uniform(a=sqrt(5)) as in PEFT (bound 1/sqrt(d_in)), B = 0."""
        d_in, d_out = base.shape
        if self.rank > min(d_in, d_out):
            raise ValueError(f"LoRA rank={self.rank} is above min(d_in, d_out)={min(d_in, d_out)} of a "
                             f"[{d_in}, {d_out}] weight, the largest rank its update can have; lower the rank")
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (d_in, self.rank), jnp.float32, -bound, bound).astype(self.dtype)
        return LoRAWeight(base=base, a=a, b=jnp.zeros((self.rank, d_out), self.dtype), scale=self.scale,
                          dropout=self.dropout)
