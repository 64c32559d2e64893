"""Hybrid BOFT + LoRA-GA (arXiv 2507.18076): every targeted weight carries both branches, mixed per layer.

For row-vector tokens x, our `[d_in, d_out]` kernel W0, the BOFT rotation R and scale s
(`hyjax.adapters.boft`) and LoRA-GA factors a, b with their frozen initial values a0, b0 and scale eta
(`hyjax.adapters.lora_ga`):

    mix="weight":  y = s * ((x M) @ W0) + (1 - lam) * eta * ((x a) b - (x a0) b0),   M = (1 - lam) I + lam R
    mix="update":  y = ((x @ R) @ W0) * s + eta * ((x a) b - (x a0) b0)

The LoRA-GA branch is computed without cancellation, as two low-rank terms that are each update-sized:

    (x a) b - (x a0) b0 = (x (a - a0)) b + (x a0) (b - b0)

Early in training `(x a) b` and `(x a0) b0` are each much larger than their difference (a0, b0 carry
LoRA-GA's scale c, the update is lr-sized), and in bf16 their subtraction would keep only a few bits of
it; the factor differences are taken in the factors' own dtype (float32) before the compute dtype sees
them, so each term is as small as the update it carries.

With mix="weight" the branches mix on the input side, where the rotation already acts: `x M` is computed
on the activations as `(1 - lam) x + lam (x R)` (M is never built), so each projection multiplies by W0
once, as LoRA does. The output scale s applies to the whole projection (it belongs to neither branch);
no one-matmul form keeps a per-output scale on the BOFT branch alone.

At init R = I, s = 1, a = a0, b = b0, so y = x @ W0 exactly. The hybrid keeps W0 itself (not LoRA-GA's
offset weight): its BOFT branch rotates W0, and the LoRA-GA offset `-eta a0 b0` is applied to the
activations, so nothing of the gradient-based init is folded into the frozen weight.

With `lora_start="zero"` the LoRA branch is plain LoRA instead (`lora`: Kaiming-uniform a, b = 0, scale
alpha / r, no gradient needed; a0 = a, b0 = 0 keep the same formulas): a control that tells what LoRA-GA's
start is worth to the hybrid.

`lam` (one scalar per 2-D weight, `[layers]` when stacked, init 0.5) is a frozen leaf: it is never
trained. The `hyjax.optim.hybrid_weights` Optax transform computes it from the two branches' gradient
norms and keeps it in the optimizer state; `set_lambdas` writes it into the nodes before each forward
pass. With mix="update" the forward ignores lam (it only scales the branches' updates).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from hyjax.adapters.boft import BOFTConfig, BOFTWeight, cayley, unflatten_blocks
from hyjax.adapters.lora import LoRAConfig
from hyjax.adapters.lora_ga import LoRAGAConfig
from hyjax.adapters.node import AdaptedWeight, DropoutKeyed
from hyjax.adapters.stacking import StackedInit
from hyjax.adapters.targets import iter_paths, map_paths
from pallas_kernels.butterfly import superblocks

MIXES = ("weight", "update")
LORA_STARTS = ("gradient", "zero")  # the LoRA branch starts as LoRA-GA, or as plain LoRA (B = 0)

# The form of mix="weight" in use, recorded in run fingerprints: runs saved with another form are refused.
WEIGHT_MIX_FORM = "input-side: y = s * (((1 - lam) x + lam x R) W0) + (1 - lam) * lora"


class HybridWeight(DropoutKeyed, AdaptedWeight):
    """A frozen weight W0 with a BOFT branch (`boft_r`, `boft_s`) and a LoRA-GA branch (`lora_a`,
    `lora_b`, frozen `lora_a0`, `lora_b0`), mixed by the frozen per-layer weight `lam`."""

    boft_r: jax.Array = None   # [m, d_in / b, b * b]  PEFT's boft_R, blocks flattened (skew part used)
    boft_s: jax.Array = None   # [d_out]              PEFT's boft_s
    lora_a: jax.Array = None   # [d_in, r]
    lora_b: jax.Array = None   # [r, d_out]
    lora_a0: jax.Array = None  # [d_in, r]   frozen initial a
    lora_b0: jax.Array = None  # [r, d_out]  frozen initial b
    lam: jax.Array = None      # []  share of the BOFT branch (frozen; set by the optimizer transform)
    dropout_key: jax.Array | None = None  # BOFT's block dropout, when `dropout` > 0 (see `with_rng`)
    eta: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    mix: str = struct.field(pytree_node=False, default="weight")
    neumann_terms: int = struct.field(pytree_node=False, default=0)
    impl: str = struct.field(pytree_node=False, default="auto")
    interpret: bool = struct.field(pytree_node=False, default=False)
    NAME: ClassVar[str] = "hybrid"
    # The trainable fields of each branch, by mix: with mix="weight" the scale s acts on the whole projection.
    BRANCHES: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "weight": {"boft": ("boft_r",), "lora": ("lora_a", "lora_b")},
        "update": {"boft": ("boft_r", "boft_s"), "lora": ("lora_a", "lora_b")}}
    TRAINABLE: ClassVar[tuple[str, ...]] = ("boft_r", "boft_s", "lora_a", "lora_b")
    AXES: ClassVar[dict] = {**AdaptedWeight.AXES, "boft_r": (None, "in+out", "out"), "boft_s": ("out+in",),
                            "lora_a": ("in+out", "out"), "lora_b": ("in", "out+in"),
                            "lora_a0": ("in+out", "out"), "lora_b0": ("in", "out+in")}
    STARTING: ClassVar[tuple[str, ...]] = ("lora_a0", "lora_b0")
    # Rank of each trainable field for one 2-D weight; axes before these are stacked-layer axes.
    CORE_NDIM: ClassVar[dict[str, int]] = {"boft_r": 3, "boft_s": 1, "lora_a": 2, "lora_b": 2}

    def boft(self) -> BOFTWeight:
        """The BOFT branch as a node of its own, `((x @ R) @ W0) * s`."""
        return BOFTWeight(base=self.base, r=self.boft_r, s=self.boft_s, dropout_key=self.dropout_key,
                          dropout=self.dropout, neumann_terms=self.neumann_terms, impl=self.impl,
                          interpret=self.interpret)

    def _lora_terms(self):
        """`((a - a0, b), (a0, b - b0))` in float32: two factor pairs whose products sum to `a b - a0 b0`,
        neither of them large (the differences are update-sized). Two pairs, not one concatenated rank-2r
        pair: XLA's TPU compiler mis-fuses the gradient of a concatenation of FSDP-split factors."""
        f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
        a, b, a0, b0 = f32(self.lora_a), f32(self.lora_b), f32(self.lora_a0), f32(self.lora_b0)
        return (a - a0, b), (a0, b - b0)

    def _lora_delta(self, x):
        """`eta ((x a) b - (x a0) b0)`, computed as `eta ((x (a - a0)) b + (x a0) (b - b0))`."""
        return self.eta * sum(jnp.dot(jnp.dot(x, p.astype(x.dtype)), q.astype(x.dtype)) for p, q in self._lora_terms())

    def apply_to(self, x):
        lora = self._lora_delta(x)
        if self.mix == "update":
            return self.boft().apply_to(x) + lora
        lam = self.lam.astype(x.dtype)
        mixed = x + lam * (self.boft().rotate(x) - x)  # x M = (1 - lam) x + lam (x R)
        y = jnp.dot(mixed, self.base.astype(x.dtype)) * self.boft_s.astype(x.dtype)
        return y + (1 - lam) * lora

    def _lora_delta_2d(self):
        return self.eta * sum(p @ q for p, q in self._lora_terms())

    def merged_2d(self):
        rotated = self.boft().merged_2d().astype(jnp.float32)  # (R @ W0) * s
        if self.mix == "update":
            merged = rotated + self._lora_delta_2d()
        else:  # (M @ W0) * s + (1 - lam) C
            lam, w0, s = self.lam.astype(jnp.float32), self.base.astype(jnp.float32), self.boft_s.astype(jnp.float32)
            merged = (1 - lam) * w0 * s + lam * rotated + (1 - lam) * self._lora_delta_2d()
        return merged.astype(self.base.dtype)

    def unmerge_2d(self, merged):
        """W0 from a merged weight. mix="update": `R^T (M' - C) / s`. mix="weight": `(M' - (1 - lam) C) / s
        = M W0` is solved inside each window of the butterfly (R, and so M = (1 - lam) I + lam R, is block
        diagonal in windows of `b 2^(m-1)` features): `[windows, w, w]` small systems."""
        lam = self.lam.astype(jnp.float32)
        if self.mix == "update":
            return self.boft().unmerge_2d(merged.astype(jnp.float32) - self._lora_delta_2d()).astype(merged.dtype)
        target = (merged.astype(jnp.float32) - (1 - lam) * self._lora_delta_2d()) / self.boft_s.astype(jnp.float32)
        d_in, d_out = target.shape
        blocks = cayley(unflatten_blocks(self.boft_r), self.neumann_terms)
        sup = superblocks(blocks, d_in)  # [m, windows, w, w], x @ R order
        windows = sup[0]
        for factor in sup[1:]:
            windows = windows @ factor  # R's diagonal blocks: x @ R = x @ sup[0] @ sup[1] @ ...
        n, w = windows.shape[0], windows.shape[-1]
        systems = (1 - lam) * jnp.eye(w, dtype=jnp.float32) + lam * windows  # M's diagonal blocks
        w0 = jnp.linalg.solve(systems, target.reshape(n, w, d_out)).reshape(d_in, d_out)
        return w0.astype(merged.dtype)


@dataclasses.dataclass(frozen=True)
class HybridConfig(StackedInit):
    """The hybrid's two branches and how they mix: mix="weight" (lam weights the branches' outputs) or
    "update" (both outputs unweighted; lam scales the branches' optimizer updates). lam starts at 0.5.

    Initialisation needs each target's averaged full gradient (LoRA-GA; see `estimate_gradients`), or
    the node's saved `starting` values."""

    boft: BOFTConfig = BOFTConfig()
    lora_ga: LoRAGAConfig = LoRAGAConfig()
    lora: LoRAConfig = LoRAConfig()  # the LoRA branch with lora_start="zero"
    mix: str = "weight"
    lora_start: str = "gradient"
    name: ClassVar[str] = "hybrid"

    def __post_init__(self):
        if self.mix not in MIXES:
            raise ValueError(f"hybrid mix={self.mix!r} must be one of {MIXES}")
        if self.lora_start not in LORA_STARTS:
            raise ValueError(f"hybrid lora_start={self.lora_start!r} must be one of {LORA_STARTS}")

    def _starting_factors(self, base, gradient, key):
        """`(a0, b0, eta)`: LoRA-GA's from the gradient, or plain LoRA's (a0 Kaiming, b0 = 0, alpha / r);
        a checkpoint's saved values (a dict) in either case."""
        if self.lora_start == "gradient":
            a0, b0 = self.lora_ga.starting_factors(base, gradient, key, names=HybridWeight.STARTING)
            return a0, b0, self.lora_ga.scale
        if isinstance(gradient, dict):
            return gradient["lora_a0"], gradient["lora_b0"], self.lora.scale
        plain = self.lora.init(base, key)
        return plain.a, plain.b, self.lora.scale

    def init(self, base: jax.Array, key: jax.Array, gradient=None) -> HybridWeight:
        boft_key, lora_key = jax.random.split(key)
        rotation = self.boft.init(base, boft_key)
        a0, b0, eta = self._starting_factors(base, gradient, lora_key)
        return HybridWeight(base=base, boft_r=rotation.r, boft_s=rotation.s, lora_a=a0, lora_b=b0, lora_a0=a0,
                            lora_b0=b0, lam=jnp.full((), 0.5, jnp.float32), eta=eta, mix=self.mix,
                            dropout=self.boft.dropout,
                            neumann_terms=self.boft.neumann_terms, impl=self.boft.impl,
                            interpret=self.boft.interpret)


def set_lambdas(params: dict, lambdas: Mapping) -> dict:
    """`params` with each hybrid node's `lam` replaced by its value in `lambdas`: nested like the
    parameters (as `hyjax.optim.current_lambdas(opt_state)` gives them) or flat `{path: value}`, each
    shaped like the weight's layer axes."""
    values = dict(iter_paths(dict(lambdas)))
    hybrid_paths = [path for path, leaf in iter_paths(params) if isinstance(leaf, HybridWeight)]
    missing = sorted(set(hybrid_paths) - set(values))
    if missing:
        raise KeyError(f"no lambda for hybrid weights {missing}; lambdas are given for {sorted(values)}")

    def put(path, leaf):
        if not isinstance(leaf, HybridWeight):
            return leaf
        lam = jnp.asarray(values[path], jnp.float32)
        if lam.shape != leaf.leading_shape:
            raise ValueError(f"lambda for {path} has shape {lam.shape}; its weight's layer axes are "
                             f"{leaf.leading_shape}")
        return leaf.replace(lam=lam)

    return map_paths(put, params)
