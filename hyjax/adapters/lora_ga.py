"""LoRA-GA (Wang et al. 2024, arXiv 2407.05000): LoRA initialised from the full weight's gradient.

The recipe, as in the authors' code (github.com/Outsider565/LoRA-GA, `lora_ga_init`):

1. Average the full gradient of every targeted weight over N batches (`estimate_gradients`; the
   authors use 64 batches of 2).
2. Randomized SVD of the gradient, `G = U S V^T` in the authors' `[d_out, d_in]` layout.
3. `A0 = V^T[:r]` (top-r right singular vectors), `B0 = U[:, r:2r]` (the next r left singular vectors,
   "ArB2r"), **without** singular values; "stable" scale multiplies both by `d_out^(1/4) / sqrt(gamma)`.
4. Offset the frozen weight, `W0' = W0 - eta B0 A0` with `eta = alpha / sqrt(r)`, so the model is
   unchanged at step 0.

Why the first step follows the gradient. With `dW = eta B A`, one SGD step of size lr gives
`dL/dA = eta B^T G`, `dL/dB = eta G A^T` and, to first order in lr,
`eta (B1 A1 - B0 A0) = -lr eta^2 (B0 B0^T G + G A0^T A0)`. With orthonormal singular vectors
(times the common scale c) that is `-lr eta^2 c^2 (U_{r:2r} U_{r:2r}^T G + G V_r V_r^T)`
`= -lr eta^2 c^2 sum_{i<2r} s_i u_i v_i^T`: exactly the best rank-2r approximation of `-G`.
Plain LoRA (B = 0) only gets `-lr s^2 G A^T A`, a random rank-r projection of the gradient.

Our layout. Kernels are `[d_in, d_out]`, so our gradient is the authors' `G^T = V S U^T`: its *left*
singular vectors are the authors' V and its *right* ones the authors' U. Hence `a = A0^T = P[:, :r]`
and `b = B0^T = Q^T[r:2r]` for our `G_ours = P S Q^T`; `d_out` is `base.shape[-1]`.

How Hugging Face PEFT's port (peft 0.21, `tuners/lora/layer.py: lora_ga_init`) differs from the authors:
  * it multiplies `B0` by the singular values `S[r:2r]` (the authors use none), so B0's columns are no
    longer unit vectors and the first step's update weights the directions by `s_i^2` instead of
    `s_i` (it is no longer the rank-2r approximation of G);
  * its "stable" scale multiplies only B by `d_out^(1/4)/sqrt(gamma)`, the authors scale A and B;
  * its offset uses LoRA's `scaling` (`alpha / r` unless `use_rslora`), the paper's `alpha / sqrt(r)`;
  * it rewrites the base weight in place and deletes the gradient, and when an adapter is loaded
    without the gradient it silently falls back to Kaiming init (the loaded state must then carry the
    modified base weight, or the model is wrong).

Precision. The offset is folded into the frozen weight once, so in bf16 `W0' = W0 - eta B0 A0` is
rounded like any bf16 weight, but it is not W0-sized: for SmolLM2's 576 x 576 projections (W0 entries about
0.02) the offset's entries are about 2x W0's, and the step-0 model differs from W0 by 2.3x a plain bf16
copy's rounding. With a bf16 forward, `x W0' + eta (x a) b` adds two outputs each 10-100x the early update
they carry, so rounding them keeps little of it: three Adam steps of 1e-4 lose about half of the update
(27% at 2e-4, 5% at 1e-3; the f32 forward loses none). The hybrid keeps W0 unfolded and computes its LoRA-GA
branch as `(x (a - a0)) b + (x a0) (b - b0)` instead (`hyjax.adapters.hybrid`), which keeps the update to bf16's
own rounding; LoRA-GA alone keeps the authors' folded form, so run it with an f32 forward.

Checkpoints. `LoRAGAWeight` keeps the initial factors `a0`, `b0` as frozen leaves (its `STARTING`
fields), so the original weight is `base + eta a0 b0`. They are a deterministic function of
`(gradient, key)`, but the SVD of a gradient summed in another order (another mesh) may pick other
singular vectors where singular values nearly tie, so checkpoints keep `a0`, `b0` and a restored run
is rebuilt from them (`apply(..., gradients=starting_values(saved))`), never from a new gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Iterable

import jax
import jax.numpy as jnp
import optax

from hyjax.adapters.lora import LoRAWeight
from hyjax.adapters.stacking import StackedInit
from hyjax.adapters.targets import default_pattern, iter_paths, map_paths, match_rule, nest
from hyjax.model import apply as model_apply
from hyjax.model.config import DTYPES
from hyjax.validation import one_of

# --------------------------------------------------------------------------------- the node


class LoRAGAWeight(LoRAWeight):
    """LoRA on the offset weight `base = W0 - eta a0 b0`; `a0`, `b0` (frozen) are the initial factors.

    `apply_to`, `merged_2d` and `unmerge_2d` are LoRA's (on `base`), with `scale = eta`.
    """

    a0: jax.Array = None  # [d_in, r]  frozen copy of the initial a
    b0: jax.Array = None  # [r, d_out] frozen copy of the initial b
    NAME: ClassVar[str] = "lora_ga"
    AXES: ClassVar[dict] = {**LoRAWeight.AXES, "a0": ("in+out", "out"), "b0": ("in", "out+in")}
    STARTING: ClassVar[tuple[str, ...]] = ("a0", "b0")
    # A PEFT LoRA would sit on the pretrained W0, this one sits on the offset base: export it merged.
    PEFT_TYPE: ClassVar[str | None] = None

    def original_base_2d(self) -> jax.Array:
        """The weight before the offset, `W0 = base + eta a0 b0`."""
        offset = self.scale * jnp.dot(self.a0.astype(jnp.float32), self.b0.astype(jnp.float32))
        return (self.base.astype(jnp.float32) + offset).astype(self.base.dtype)

    def delta_factors_2d(self) -> tuple[jax.Array, jax.Array]:
        """`(a2, b2)` of rank 2r with `merged = W0 + eta a2 b2` on the *original* W0: a plain LoRA
        (`a2 = [a, a0]`, `b2 = [b; -b0]`), e.g. for exporting to tools that keep W0 unchanged."""
        return jnp.concatenate([self.a, self.a0], axis=1), jnp.concatenate([self.b, -self.b0], axis=0)


# ------------------------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True)
class LoRAGAConfig(StackedInit):
    """LoRA-GA hyperparameters.

    rank, alpha: LoRA rank r and alpha; the adapter scale is `eta = alpha / sqrt(r)`.
    gamma, stable_scale: with `stable_scale`, a0 and b0 are multiplied by `d_out^(1/4) / sqrt(gamma)`.
    n_batches, batch_size: how many batches (of how many sequences) `estimate_gradients` should average.
    svd_oversample: random columns beyond 2r in the randomized SVD (None: 2r, i.e. q = 4r as the authors).
    svd_iterations: power iterations of the randomized SVD (the authors: 4).
    dtype: dtype of a and b.
    """

    rank: int = 8
    alpha: float = 16.0
    gamma: float = 16.0
    stable_scale: bool = True
    n_batches: int = 64
    batch_size: int = 2
    svd_oversample: int | None = None
    svd_iterations: int = 4
    dtype: str = "float32"
    name: ClassVar[str] = "lora_ga"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA-GA rank={self.rank} must be at least 1")
        if self.gamma <= 0:
            raise ValueError(f"LoRA-GA gamma={self.gamma} must be positive")
        if self.n_batches < 1 or self.batch_size < 1:
            raise ValueError(f"LoRA-GA n_batches={self.n_batches} and batch_size={self.batch_size} must be >= 1")
        if self.svd_iterations < 0 or (self.svd_oversample is not None and self.svd_oversample < 0):
            raise ValueError(f"svd_iterations={self.svd_iterations} and svd_oversample={self.svd_oversample} "
                             "must be non-negative")
        one_of("dtype", self.dtype, DTYPES)

    @property
    def scale(self) -> float:
        """eta = alpha / sqrt(r)."""
        return self.alpha / math.sqrt(self.rank)

    def factors(self, gradient: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`(a0 [d_in, r], b0 [r, d_out])` from one `[d_in, d_out]` gradient (see the module docstring)."""
        d_in, d_out = gradient.shape
        r = self.rank
        if 2 * r > min(d_in, d_out):
            raise ValueError(f"LoRA-GA needs 2 * rank={2 * r} <= min(d_in, d_out)={min(d_in, d_out)} "
                             f"for a [{d_in}, {d_out}] weight; lower the rank")
        oversample = 2 * r if self.svd_oversample is None else self.svd_oversample
        q = min(2 * r + oversample, d_in, d_out)
        p, _, qt = randomized_svd(gradient.astype(jnp.float32), q, self.svd_iterations, key)
        a0, b0 = p[:, :r], qt[r:2 * r]
        if self.stable_scale:
            c = d_out ** 0.25 / math.sqrt(self.gamma)
            a0, b0 = a0 * c, b0 * c
        return a0.astype(self.dtype), b0.astype(self.dtype)

    def starting_factors(self, base: jax.Array, start, key: jax.Array, names=("a0", "b0")):
        """`(a0, b0)` of one `[d_in, d_out]` weight: from `start`, its averaged full gradient, or as a
        checkpoint kept them (`start` a dict holding them under `names`)."""
        if isinstance(start, dict):
            return start[names[0]], start[names[1]]
        if start is None:
            raise ValueError(MISSING_GRADIENT)
        if start.shape != base.shape:
            raise ValueError(f"LoRA-GA gradient shape {start.shape} differs from its weight's {base.shape}")
        return self.factors(start, key)

    def init(self, base: jax.Array, key: jax.Array, gradient=None) -> LoRAGAWeight:
        """The LoRA-GA node of one `[d_in, d_out]` weight; `gradient` is its averaged full gradient (or
        the node's saved `starting` values)."""
        a0, b0 = self.starting_factors(base, gradient, key)
        offset = self.scale * jnp.dot(a0.astype(jnp.float32), b0.astype(jnp.float32))
        shifted = (base.astype(jnp.float32) - offset).astype(base.dtype)
        return LoRAGAWeight(base=shifted, a=a0, b=b0, a0=a0, b0=b0, scale=self.scale)


MISSING_GRADIENT = (
    "LoRA-GA initialises from each target's full gradient, and none was given: compute them with "
    "`grads = hyjax.adapters.estimate_gradients(model_config, params, batches, targets=spec)` and pass "
    "`hyjax.adapters.apply(spec, params, key, gradients=grads)`")


# ------------------------------------------------------------------------- randomized SVD


def randomized_svd(m: jax.Array, q: int, iterations: int, key: jax.Array):
    """`(U [rows, q], S [q], Vt [q, cols])` with `m ~ U diag(S) Vt` (Halko et al. 2011, as
    `torch.svd_lowrank`): a Gaussian sketch, `iterations` re-orthonormalised power iterations, and an
    exact SVD of the small `q x cols` projection. Deterministic given `key`."""
    omega = jax.random.normal(key, (m.shape[1], q), m.dtype)
    basis, _ = jnp.linalg.qr(m @ omega)
    for _ in range(iterations):
        z, _ = jnp.linalg.qr(m.T @ basis)
        basis, _ = jnp.linalg.qr(m @ z)
    u, s, vt = jnp.linalg.svd(basis.T @ m, full_matrices=False)
    return basis @ u, s, vt


# ------------------------------------------------------------------- estimating the gradients


def next_token_loss(model_config, params: dict, batch) -> jax.Array:
    """Mean next-token cross-entropy. `batch`: tokens `[batch, seq]`, or a dict with `tokens` and
    optional `loss_mask` (1 where a token is predicted, aligned with `tokens`) and `segment_ids`."""
    if not isinstance(batch, dict):
        batch = {"tokens": batch}
    tokens = batch["tokens"]
    logits = model_apply(model_config, params, tokens, segment_ids=batch.get("segment_ids"))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    mask = batch.get("loss_mask")
    mask = jnp.ones_like(losses) if mask is None else mask[:, 1:].astype(losses.dtype)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def estimate_gradients(model_config, params: dict, batches: Iterable[Any], *,
                       targets: Any = None, loss_fn: Callable | None = None, n_batches: int = 64) -> dict:
    """The full gradient of every targeted weight, averaged over the first `n_batches` of `batches`.

    Returns a nested dict with the targets' paths and shapes (float32), for `adapters.apply(...,
    gradients=...)`. `targets`: an `AdapterSpec` (its paths with a method), a regex or a list of them
    (default: every attention and MLP projection). `loss_fn(params, batch) -> scalar` defaults to
    `next_token_loss(model_config, params, batch)`. Differentiates only the targeted weights; the
    gradient is compiled once per `loss_fn` (static: pass the same function object to reuse it across
    calls, as the default does) and batch shape.
    """
    paths = _target_paths(params, targets)
    loss_fn = loss_fn or NextTokenLoss(model_config)
    weights = {path: leaf for path, leaf in iter_paths(params) if path in paths}
    total, count = None, 0
    for batch in batches:
        if count == n_batches:
            break
        grads = _target_grads(loss_fn, weights, params, batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
        count += 1
    if count == 0:
        raise ValueError("estimate_gradients got no batches; pass an iterable of token batches")
    return nest({path: g / count for path, g in total.items()})


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """`next_token_loss` for one model config, as a hashable callable (so compiled gradients are reused)."""

    model_config: Any

    def __call__(self, params: dict, batch) -> jax.Array:
        return next_token_loss(self.model_config, params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _target_grads(loss_fn, weights: dict[str, jax.Array], params: dict, batch):
    """Gradient of `loss_fn` w.r.t. the weights at the paths in `weights` only (compiled per loss_fn)."""
    return jax.grad(lambda w: loss_fn(_with_weights(params, w), batch))(weights)


def _target_paths(params: dict, targets) -> set[str]:
    if targets is None:
        targets = default_pattern()
    if isinstance(targets, str):
        targets = [targets]
    rules = targets.rules if hasattr(targets, "rules") else tuple((p, True) for p in targets)
    paths = set()
    for path, leaf in iter_paths(params):
        if match_rule(rules, path) is not None:
            if not isinstance(leaf, jax.Array) or leaf.ndim < 2:
                raise ValueError(f"gradient target {path} must be a plain weight matrix, got {type(leaf).__name__}"
                                 f"{getattr(leaf, 'shape', '')}; estimate gradients on the base parameters")
            paths.add(path)
    if not paths:
        raise ValueError(f"targets {[p for p, _ in rules]} match no parameter; "
                         f"available: {[p for p, _ in iter_paths(params)]}")
    return paths


def _with_weights(params: dict, weights: dict[str, jax.Array]) -> dict:
    return map_paths(lambda path, leaf: weights.get(path, leaf), params)


