"""OFT / BOFT: rotate the input of a frozen weight by an orthogonal butterfly matrix, then scale outputs.

For `d_in` inputs, block size b and m butterfly factors, the trainable parameters are, as in Hugging
Face PEFT (`tuners/boft/layer.py`), `r` (PEFT's `boft_R` `[m, d_in / b, b, b]`, zero init; stored here
with each block's b x b entries in one axis, `[m, d_in / b, b * b]`: lane-dense on TPU, where a minor
axis of b = 16 would pad to 128 lanes, and split over the base weight's d_out mesh axes, see
`hyjax.adapters.axes`) and a per-output scale `s` `[d_out]` (PEFT's `boft_s`, stored there as
`[d_out, 1]`, init 1). Each b x b block becomes orthogonal through PEFT's Cayley transform

    S = (r - r^T) / 2,   C(r) = (I - S)(I + S)^-1   (computed in float32),

and the m factors, interleaved with PEFT's butterfly permutations, form an orthogonal `R` (see
`pallas_kernels.butterfly`). For row-vector tokens x and our `[d_in, d_out]` kernel W0 the layer is

    y = ((x @ R) @ W0) * s,

exactly PEFT's `Linear.forward` (no bias in LLaMA). m = 1 is OFT (block-diagonal R). The rotation is
applied to the activations factor by factor (`butterfly_apply`), never as a dense d_in x d_in matrix;
`merged_2d` builds `(R @ W0) * s` only for export. The parameters exchange with PEFT's one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hyjax.adapters.node import AdaptedWeight, DropoutKeyed, peft_per_layer, peft_unsupported
from hyjax.adapters.stacking import StackedInit
from hyjax.sharding.activations import on_local_tokens
from pallas_kernels.butterfly import butterfly_apply, butterfly_apply_transposed, superblock_size
from pallas_kernels.dispatch import use_pallas

# How BOFT's r is stored, recorded in run fingerprints (`Method.form`): runs saved with 4-D blocks are refused.
FLAT_BLOCKS_FORM = "boft_R stored [m, d_in / b, b * b]"


def cayley(r: jax.Array, neumann_terms: int = 0) -> jax.Array:
    """Orthogonal `(I - S)(I + S)^-1` of `S = (r - r^T) / 2` for a batch `[..., b, b]`, in float32.

    neumann_terms = 0 solves exactly (PEFT's `cayley_batch`); k > 0 replaces `(I + S)^-1` by the first k
    terms of its Neumann series `sum_j (-S)^j` (no solve, as in OFTv2; accurate for small ||S|| only, and
    then orthogonal only up to a term of order ||S||^k).
    """
    r = r.astype(jnp.float32)
    skew = 0.5 * (r - jnp.swapaxes(r, -1, -2))
    eye = jnp.broadcast_to(jnp.eye(r.shape[-1], dtype=jnp.float32), r.shape)
    if neumann_terms == 0:
        # (I + S)^-1 and (I - S) commute, so this equals PEFT's right-division (I - S)(I + S)^-1.
        return jnp.linalg.solve(eye + skew, eye - skew)
    series, power = eye, eye
    for _ in range(1, neumann_terms):
        power = -power @ skew
        series = series + power
    return (eye - skew) @ series


def flatten_blocks(blocks: jax.Array) -> jax.Array:
    """`[..., n, b, b]` blocks as stored, `[..., n, b * b]`."""
    return blocks.reshape(*blocks.shape[:-2], blocks.shape[-1] ** 2)


def block_size_of(r: jax.Array) -> int:
    """b of stored blocks `[..., n, b * b]`."""
    b = math.isqrt(r.shape[-1])
    if b * b != r.shape[-1]:
        raise ValueError(f"BOFT parameters of shape {r.shape} do not hold b x b blocks in their last axis")
    return b


def unflatten_blocks(r: jax.Array) -> jax.Array:
    """Stored `[..., n, b * b]` blocks as `[..., n, b, b]`."""
    b = block_size_of(r)
    return r.reshape(*r.shape[:-1], b, b)


class BOFTWeight(DropoutKeyed, AdaptedWeight):
    """A frozen weight whose input is rotated by an orthogonal butterfly and whose outputs are scaled."""

    r: jax.Array = None  # [m, d_in / b, b * b], PEFT's boft_R with each block's entries in one axis
    s: jax.Array = None  # [d_out], PEFT's boft_s[:, 0]
    dropout_key: jax.Array | None = None
    dropout: float = struct.field(pytree_node=False, default=0.0)
    neumann_terms: int = struct.field(pytree_node=False, default=0)
    impl: str = struct.field(pytree_node=False, default="auto")
    interpret: bool = struct.field(pytree_node=False, default=False)
    NAME: ClassVar[str] = "boft"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("r", "s")
    AXES: ClassVar[dict] = {**AdaptedWeight.AXES, "r": (None, "in+out", "out"), "s": ("out+in",)}
    PEFT_TYPE: ClassVar[str | None] = "BOFT"
    PEFT_CONFIG: ClassVar[dict] = {"boft_block_num": 0, "init_weights": True}
    PEFT_TENSORS: ClassVar[dict[str, float]] = {"boft_R": 0.0, "boft_s": 1.0}  # identity: r = 0, s = 1

    @property
    def block_size(self) -> int:
        return block_size_of(self.r)

    def blocks(self) -> jax.Array:
        """The orthogonal `[m, d_in / b, b, b]` blocks, with block dropout when a dropout key is set."""
        blocks = cayley(unflatten_blocks(self.r), self.neumann_terms)
        if self.dropout > 0 and self.dropout_key is not None:
            blocks = _block_dropout(blocks, self.dropout, self.dropout_key)
        return blocks

    def rotate(self, x):
        """`x @ R` for activations `[..., d_in]`, factor by factor (never a dense R). The Pallas kernel runs
        on each device's rows of a sharded batch (`on_local_tokens`)."""
        def apply(x, blocks):
            lead, d_in = x.shape[:-1], x.shape[-1]
            rotated = butterfly_apply(x.reshape(-1, d_in), blocks, impl=self.impl, interpret=self.interpret)
            return rotated.reshape(*lead, d_in)

        if use_pallas(self.impl):  # each device rotates its tokens; its own windows where features are split
            window = superblock_size(self.r.shape[-3], self.block_size)
            return on_local_tokens(apply, x, self.blocks(), window=window, whole_feature_axes=(1,))
        return apply(x, self.blocks())

    def apply_to(self, x):
        return jnp.dot(self.rotate(x), self.base.astype(x.dtype)) * self.s.astype(x.dtype)

    def rotate_rows(self, w: jax.Array, inverse: bool = False) -> jax.Array:
        """`R @ w` (or `R^T @ w`) for a `[d_in, n]` matrix, in float32 (export only)."""
        blocks = cayley(unflatten_blocks(self.r), self.neumann_terms)
        op = butterfly_apply if inverse else butterfly_apply_transposed  # (w^T R^T)^T = R w
        return op(w.astype(jnp.float32).T, blocks, impl="xla").T

    def merged_2d(self):
        merged = self.rotate_rows(self.base) * self.s.astype(jnp.float32)
        return merged.astype(self.base.dtype)

    def unmerge_2d(self, merged):
        unscaled = merged.astype(jnp.float32) / self.s.astype(jnp.float32)
        return self.rotate_rows(unscaled, inverse=True).astype(merged.dtype)

    # ---------------------------------------------------------------- Hugging Face PEFT

    def peft_settings(self, path):
        if self.neumann_terms:
            raise peft_unsupported(f"{path} uses a Neumann-series Cayley transform, PEFT's BOFT only the exact one")
        return {"boft_block_size": self.block_size, "boft_n_butterfly_factor": int(self.r.shape[-3]),
                "boft_dropout": self.dropout}

    def peft_layers(self, num_layers):
        return peft_per_layer({"boft_R": np.asarray(unflatten_blocks(self.r), np.float32),
                               "boft_s": np.asarray(self.s, np.float32)[..., None]}, num_layers)

    @classmethod
    def from_peft(cls, peft, base, tensors):
        # boft_R: [..., m, d_in / b, b, b]; boft_s: [..., d_out, 1]
        return cls(base=base, r=flatten_blocks(jnp.asarray(tensors["boft_R"])),
                   s=jnp.asarray(tensors["boft_s"][..., 0]),
                   dropout=float(peft.get("boft_dropout", 0.0)))


def _block_dropout(blocks: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """PEFT's multiplicative dropout: in one randomly chosen factor, `int(rate * n_blocks)` randomly
    chosen blocks become the identity (the rotation stays orthogonal)."""
    m, n_blocks, b, _ = blocks.shape
    factor_key, block_key = jax.random.split(key)
    factor = jax.random.randint(factor_key, (), 0, m)
    dropped = jax.random.permutation(block_key, n_blocks) < int(rate * n_blocks)  # [n_blocks]
    mask = (jnp.arange(m)[:, None] == factor) & dropped[None, :]  # [m, n_blocks]
    return jnp.where(mask[:, :, None, None], jnp.eye(b, dtype=blocks.dtype), blocks)


@dataclasses.dataclass(frozen=True)
class BOFTConfig(StackedInit):
    """BOFT hyperparameters (PEFT's names in brackets).

    block_size: b, the size of each orthogonal block [boft_block_size]; must divide d_in.
    n_factors: m, butterfly factors [boft_n_butterfly_factor]; 1 is OFT. b * 2**(m-1) must divide d_in.
    dropout: multiplicative dropout [boft_dropout]: during training blocks of one random factor are
        replaced by the identity with this rate (needs `adapters.with_rng`).
    neumann_terms: 0 for the exact Cayley transform, k > 0 for a k-term Neumann series (faster, approximate).
    impl: butterfly kernel, "auto" | "xla" | "pallas"; interpret: run the Pallas kernel in interpret mode.
    """

    block_size: int = 8
    n_factors: int = 1
    dropout: float = 0.0
    neumann_terms: int = 0
    impl: str = "auto"
    interpret: bool = False
    name: ClassVar[str] = "boft"

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"BOFT block_size={self.block_size} must be at least 1")
        if self.n_factors < 1:
            raise ValueError(f"BOFT n_factors={self.n_factors} must be at least 1 (1 is OFT)")
        if self.n_factors > 1 and self.block_size % 2:
            raise ValueError(f"BOFT block_size={self.block_size} must be even when n_factors={self.n_factors} > 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"BOFT dropout={self.dropout} must be in [0, 1)")
        if self.neumann_terms < 0:
            raise ValueError(f"BOFT neumann_terms={self.neumann_terms} must be 0 (exact Cayley) or positive")
        if self.impl not in ("auto", "xla", "pallas"):
            raise ValueError(f"BOFT impl={self.impl!r} must be one of 'auto', 'xla', 'pallas'")

    def validate(self, d_in: int) -> None:
        """Raises unless the butterfly fits `d_in` inputs (PEFT's own conditions)."""
        b, m = self.block_size, self.n_factors
        if d_in % b:
            raise ValueError(f"BOFT block_size={b} must divide the weight's d_in={d_in}; choose a divisor of {d_in}")
        window = b * 2 ** (m - 1)
        if d_in % window:
            raise ValueError(f"BOFT needs block_size * 2**(n_factors - 1) = {b} * 2**{m - 1} = {window} to divide "
                             f"d_in={d_in}; lower n_factors or block_size")

    def init(self, base: jax.Array, key: jax.Array, gradient=None) -> BOFTWeight:
        """r = 0 (R = I) and s = 1, so training starts at W0."""
        d_in, d_out = base.shape
        self.validate(d_in)
        b = self.block_size
        return BOFTWeight(base=base, r=jnp.zeros((self.n_factors, d_in // b, b * b), jnp.float32),
                          s=jnp.ones((d_out,), jnp.float32), dropout=self.dropout,
                          neumann_terms=self.neumann_terms, impl=self.impl, interpret=self.interpret)
