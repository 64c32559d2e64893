"""Unitary adapter (uRNN, Arjovsky et al. 2016): the input is rotated by an exactly orthogonal map.

The d_in input features of a token pair into h = d_in/2 complex numbers, `z = x[:h] + i x[h:]`, and

    U = D3 R2 F^-1 D2 Pi R1 F D1

with unit-modulus phases `D_k = diag(exp(i theta_k))`, Householder reflections
`R_k = I - 2 v_k v_k^H / ||v_k||^2`, a fixed permutation Pi and the unitary FFT F (the operator and its
Pallas kernels: `pallas_kernels.unitary`). Read as a real map of the d_in features U is orthogonal, costs
O(d log d) per token and has 3.5 d_in parameters: theta `[3, h]` (1.5 d_in) and the two complex
reflection vectors `[2, 2 (re, im), h]` (2 d_in).

In our `[d_in, d_out]` row layout a token x becomes

    y = U(x) @ W0',    W0' = U0 W0   (U0 = U(theta0): W0's d_out columns each rotated by U0),

so at init `U0(x) @ W0' = x U0^T U0 W0 = x W0`: the random initial phases and reflections (random so
that gradients are not degenerate, as in the uRNN) are folded into the frozen weight once, by running U0
over W0's columns as if they were d_out tokens; no dense d x d matrix is ever built. The merged weight is
`U^T W0'`, computed the same way with the transposed operator.

The reflection vectors are `UnitVectors`: `hyjax.optim.unit_norm` finds them by that type and projects
them back to unit norm after each optimizer step (the map is orthogonal for any nonzero v; the projection
keeps the parametrisation well conditioned). `UnitaryConfig(full_capacity=True)` instead trains a dense
orthogonal matrix for small d_in (`hyjax.adapters.unitary_full`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyjax.adapters.node import AdaptedWeight
from hyjax.adapters.stacking import StackedInit
from hyjax.adapters.unitary_full import UnitaryFullWeight
from hyjax.sharding.activations import on_local_tokens
from pallas_kernels import dispatch
from pallas_kernels.unitary import unitary_apply, unitary_apply_transposed


class UnitVectors(struct.PyTreeNode):
    """Parameters held at unit norm over their last two axes: each `[2, h]` slice is one complex vector as
    (real, imaginary) planes. The type marks them for `hyjax.optim.unit_norm.project_unit_norm`."""

    vectors: jax.Array

    def normalized(self) -> "UnitVectors":
        """These vectors divided by their norms (over the last two axes), computed in float32."""
        v = self.vectors.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(v * v, axis=(-2, -1), keepdims=True))
        return self.replace(vectors=(v / norm).astype(self.vectors.dtype))

    def norms(self) -> jax.Array:
        """The norm of each vector: shape `vectors.shape[:-2]`."""
        v = self.vectors.astype(jnp.float32)
        return jnp.sqrt(jnp.sum(v * v, axis=(-2, -1)))


@functools.lru_cache(maxsize=64)
def fixed_permutation(h: int, seed: int) -> np.ndarray:
    """The permutation Pi of the h complex features: a function of (h, seed) only, so it is never stored."""
    return np.random.default_rng(seed).permutation(h).astype(np.int32)


def _operator(x, theta, v, perm_seed, transpose, impl):
    fn = unitary_apply_transposed if transpose else unitary_apply
    interpret = dispatch.use_pallas(impl) and dispatch.target_backend() not in dispatch.PALLAS_PLATFORMS
    perm = fixed_permutation(theta.shape[-1], perm_seed)
    return fn(x, theta, v, perm, impl=impl, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rotate(x, theta, v, perm_seed, transpose, impl):
    """The operator, keeping only its real inputs for the backward pass, which recomputes the complex
    intermediates (an O(d log d) pass per token). Saving them would also fail under the model's
    `remat="none"` (everything saveable): JAX's remat inserts `reduce_precision`, which rejects complex
    residuals."""
    return _operator(x, theta, v, perm_seed, transpose, impl)


def _rotate_fwd(x, theta, v, perm_seed, transpose, impl):
    return _operator(x, theta, v, perm_seed, transpose, impl), (x, theta, v)


def _rotate_bwd(perm_seed, transpose, impl, residuals, cotangent):
    _, vjp = jax.vjp(lambda *args: _operator(*args, perm_seed, transpose, impl), *residuals)
    return vjp(cotangent)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


class UnitaryWeight(AdaptedWeight):
    """`y = U(x) @ base`, base the frozen weight with U(theta0) folded in (see the module docstring)."""

    theta: jax.Array = None  # [3, h]: phases of D1, D2, D3
    reflections: UnitVectors = None  # vectors [2, 2, h]: R1, R2 as (re, im) planes
    perm_seed: int = struct.field(pytree_node=False, default=0)
    impl: str = struct.field(pytree_node=False, default="auto")
    NAME: ClassVar[str] = "unitary"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("theta", "reflections")
    AXES: ClassVar[dict] = {**AdaptedWeight.AXES, "theta": (None, "in+out"), "reflections": (None, None, "in+out")}

    @property
    def perm(self) -> np.ndarray:
        return fixed_permutation(self.theta.shape[-1], self.perm_seed)

    def rotate(self, x: jax.Array, *, transpose: bool = False, impl: str | None = None) -> jax.Array:
        """`U x` (or `U^T x`) for each row of x `[tokens, d_in]`. impl defaults to the node's; "pallas"
        runs interpreted on CPU."""
        return _rotate(x, self.theta, self.reflections.vectors, self.perm_seed, transpose, impl or self.impl)

    def apply_to(self, x):
        def apply(x, theta, vectors):
            lead, d_in = x.shape[:-1], x.shape[-1]
            rotated = _rotate(x.reshape(-1, d_in), theta, vectors, self.perm_seed, False, self.impl)
            return rotated.reshape(*lead, d_in)

        # Each device rotates its own rows of a sharded batch with the whole operator: a Pallas kernel
        # cannot be split, nor can the FFT over the features (XLA's partitioner fails on it).
        rotated = on_local_tokens(apply, x, self.theta, self.reflections.vectors)
        return jnp.dot(rotated, self.base.astype(x.dtype))

    def _rotate_columns(self, w, transpose):
        """U (or U^T) applied to each of the d_out columns of a `[d_in, d_out]` matrix, in float32."""
        return self.rotate(w.astype(jnp.float32).T, transpose=transpose, impl="xla").T

    def merged_2d(self):
        return self._rotate_columns(self.base, transpose=True).astype(self.base.dtype)

    def unmerge_2d(self, merged):
        return self._rotate_columns(merged, transpose=False).astype(merged.dtype)


@dataclasses.dataclass(frozen=True)
class UnitaryConfig(StackedInit):
    """Unitary-adapter options.

    impl: the operator's implementation, "auto" (Pallas on TPU/GPU, XLA on CPU), "xla" or "pallas"
    (interpreted on CPU). perm_seed: seed of the fixed permutation Pi. full_capacity: train a dense
    orthogonal d_in x d_in matrix instead (Wisdom et al. 2016; Cayley steps in `hyjax.optim.stiefel`),
    allowed up to d_in = max_full_capacity_dim. dtype: of the trainable parameters.
    """

    impl: str = "auto"
    full_capacity: bool = False
    max_full_capacity_dim: int = 1024
    perm_seed: int = 0
    dtype: str = "float32"
    name: ClassVar[str] = "unitary"

    def __post_init__(self):
        dispatch.use_pallas(self.impl)  # validates impl
        if self.max_full_capacity_dim < 1:
            raise ValueError(f"max_full_capacity_dim={self.max_full_capacity_dim} must be at least 1")

    def init_stacked(self, base: jax.Array, key: jax.Array, gradient=None, stacked_axes: int = 0):
        """As `StackedInit`'s, with a sharded base first gathered along d_in: folding U0 into W0 runs the
        FFT over d_in, which XLA's partitioner cannot split."""
        sharding = None if isinstance(base, jax.core.Tracer) else getattr(base, "sharding", None)
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (base.ndim - len(sharding.spec))
            base = jax.device_put(base, NamedSharding(sharding.mesh, P(*spec[:-2], None, spec[-1])))
        return super().init_stacked(base, key, gradient, stacked_axes)

    def init(self, base: jax.Array, key: jax.Array, gradient=None) -> AdaptedWeight:
        """uRNN initialisation: phases uniform in [-pi, pi), reflection vectors with real and imaginary
        parts uniform in [-1, 1] (then unit norm); U(theta0) folded into the frozen weight."""
        return _init(self, base, key)

    def _init(self, base, key):
        d_in = base.shape[0]
        if self.full_capacity:
            if d_in > self.max_full_capacity_dim:
                raise ValueError(
                    f"full-capacity unitary adapter is dense (d_in x d_in) and allowed only up to "
                    f"max_full_capacity_dim={self.max_full_capacity_dim}; got d_in={d_in} (weight shape "
                    f"{base.shape}). Use full_capacity=False (O(d log d)) or raise max_full_capacity_dim.")
            return UnitaryFullWeight.identity(base, self.dtype)
        if d_in % 2:
            raise ValueError(
                f"the unitary adapter pairs input features into complex numbers, so d_in must be even; got "
                f"d_in={d_in} (weight shape {base.shape}). Exclude this weight from the targets or use "
                f"full_capacity=True.")
        h = d_in // 2
        k_theta, k_v = jax.random.split(key)
        theta = jax.random.uniform(k_theta, (3, h), jnp.float32, -math.pi, math.pi)
        v = jax.random.uniform(k_v, (2, 2, h), jnp.float32, -1.0, 1.0)
        node = UnitaryWeight(base=base, theta=theta.astype(self.dtype),
                             reflections=UnitVectors(v.astype(self.dtype)).normalized(),
                             perm_seed=self.perm_seed, impl=self.impl)
        return node.replace(base=node.unmerge_2d(base))


@functools.partial(jax.jit, static_argnums=0)
def _init(config: UnitaryConfig, base, key):
    """`UnitaryConfig.init` compiled once per shape (eager, its many small ops dominate setup time)."""
    return config._init(base, key)
