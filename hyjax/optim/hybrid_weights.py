"""`hybrid_weights`: the Optax transform that sets each hybrid layer's mixing weight lambda.

Hybrid BOFT + LoRA-GA nodes (`hyjax.adapters.hybrid.HybridWeight`) carry a frozen per-layer lambda,
the BOFT branch's share. It is never trained: this transform computes it from the gradients it sees and
keeps it in the optimizer state (checkpointed with it). In the trainable tree (`split_trainable`) a hybrid
node is a dict with the keys `boft_r, boft_s, lora_a, lora_b`, found at the node's path; stacked layers
give one lambda per leading index. The BOFT branch is `boft_r` with mix="weight" (whose scale `boft_s`
acts on the whole projection and counts for neither branch) and `boft_r, boft_s` with mix="update"; the
LoRA-GA branch is `lora_a, lora_b` (`HybridWeight.BRANCHES`).

Per hybrid weight and layer, at update t (0-based) with the lambda `lam` the gradients were computed with:

    n_boft = ||BOFT branch gradients||_2,   n_lora = ||(g_lora_a, g_lora_b)||_2
    share correction (default for mix="weight", whose forward scales the rotation's part of the input by
    lam and the LoRA-GA branch by 1 - lam, and so their gradients):  n_boft <- n_boft / lam,
    n_lora <- n_lora / (1 - lam)
    rule "normalized": each branch against its own scale, the mean of its norms over the first
        `warmup_steps` updates (over those seen so far while t < warmup_steps):
        n_boft <- n_boft / mean_warmup(n_boft),   n_lora <- n_lora / mean_warmup(n_lora)
    rule "raw": the norms as they are
    target = sigmoid(logit(prior(t)) + sign * (log n_boft - log n_lora) / tau)
        sign = +1 "proportional" (the larger signal, the larger share), -1 "inverse"
        prior(t) = 0.5 without a handover, else linear from `handover[0]` at update 0 to `handover[1]`
        at `total_steps` (the hand-over of the source paper's story: LoRA-GA's fast start first, BOFT's
        stability later, each layer moved off that line by its branches' normalised signals)
    ema_{t+1} = beta * ema_t + (1 - beta) * target,  ema_0 = prior(0)
    lam_{t+1} = prior(t + 1) if t + 1 < warmup_steps else clip(ema_{t+1}, lo, hi)

Why "normalized": the raw norms' ratio is set by how each branch is parameterised (LoRA-GA's factors span
the gradient's top directions and carry eta * c; BOFT's gradient lives in skew b x b blocks): about 0.2 in
every projection of SmolLM2, so the raw rule is a fixed learning-rate split, and alpha, gamma or the block
size move lambda without changing what the model can learn. Against its own warm-up scale each branch's
signal is about 1 at the end of warm-up, so lambda starts at the prior (0.5) whatever eta, gamma or b are,
and moves where one branch's gradient shrinks or grows relative to the other's.

With mix="update" the forward does not use lambda, so the gradients carry no lambda to correct for (share
correction is off by default); the inner optimizer's updates of the BOFT branch are multiplied by its share
and the LoRA-GA branch's by its own: `shares="unit"` gives `2 lam` and `2 (1 - lam)`, so at lambda 0.5 each
branch trains at its own tuned rate; `shares="sum"` gives `lam` and `1 - lam` (each at half its rate at
0.5). That scaling must come after the inner optimizer (Adam normalises a scaled gradient back), hence
`inner` is required for mix="update". With mix="weight" gradients pass through unchanged (to `inner` when
given) and `shares` does not apply: lambda weights the branches in the forward.

    opt = optax.chain(hybrid_weights(), optax.adamw(1e-3))         # mix="weight"
    opt = hybrid_weights(mix="update", inner=optax.adamw(1e-3))
    params = set_lambdas(combine(trainable, frozen), current_lambdas(opt_state))  # before each forward
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hyjax.adapters.hybrid import MIXES, HybridWeight
from hyjax.adapters.targets import iter_paths, nest

DIRECTIONS = ("proportional", "inverse")
RULES = ("normalized", "raw")
SHARES = ("unit", "sum")
_TINY = 1e-30
# The optimizer state's form, recorded in run fingerprints: runs saved before the normalized rule's
# `reference` field are refused by name rather than failing inside the checkpoint reader.
STATE_FORM = "hybrid_weights state: step, ema, lambdas, reference (warm-up norm sums), inner"


class HybridWeightsState(NamedTuple):
    """step: updates applied (int32); ema, lambdas: nested dicts like the parameter tree, with a
    `[*layer axes]` float32 array at each hybrid weight's path; reference: likewise `[*layer axes, 2]`,
    the sums of the BOFT and LoRA-GA branches' norms over the warm-up updates (the "normalized" rule's
    scales); inner: the inner optimizer's state (empty tuple when none)."""

    step: jax.Array
    ema: dict
    lambdas: dict
    reference: dict
    inner: Any = ()


def hybrid_weights(rule: str = "normalized", direction: str = "proportional", temperature: float = 1.0,
                   ema: float = 0.9, clip: tuple[float, float] = (0.05, 0.95), warmup_steps: int = 10,
                   mix: str = "weight", share_correction: bool | None = None, shares: str = "unit",
                   handover: tuple[float, float] | None = None, total_steps: int | None = None,
                   inner: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """The transform that computes each hybrid layer's lambda (formulas in the module docstring).

    rule: "normalized" (each branch's gradient norm against its own warm-up mean) or "raw".
    direction: "proportional" (the branch with the larger signal gets the larger share) or "inverse".
    temperature: tau > 0. ema: beta in [0, 1). clip: (lo, hi) within [0, 1].
    warmup_steps: lambda stays at the prior for the first forward passes (and, with rule "normalized",
        these updates set each branch's scale: at least 1).
    mix: as the hybrid nodes' mix. share_correction: divide each branch's norm by its share (default:
        mix == "weight"). shares: with mix="update", "unit" scales the branches' updates by 2 lam and
        2 (1 - lam), "sum" by lam and 1 - lam.
    handover: (lambda at update 0, lambda at `total_steps`): the prior moves linearly between them;
        None: 0.5 throughout. total_steps: the updates of the run (needed with a handover).
    inner: the optimizer run after lambda is computed; required for mix="update", whose lambda scales
        the inner optimizer's updates.
    """
    for name, value, allowed in (("rule", rule, RULES), ("direction", direction, DIRECTIONS),
                                 ("mix", mix, MIXES), ("shares", shares, SHARES)):
        if value not in allowed:
            raise ValueError(f"hybrid_weights {name}={value!r} must be one of {allowed}")
    if temperature <= 0:
        raise ValueError(f"hybrid_weights temperature={temperature} must be positive")
    if not 0 <= ema < 1:
        raise ValueError(f"hybrid_weights ema={ema} must be in [0, 1)")
    lo, hi = clip
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"hybrid_weights clip={clip} must satisfy 0 <= lo <= hi <= 1")
    if warmup_steps < (1 if rule == "normalized" else 0):
        raise ValueError(f"hybrid_weights warmup_steps={warmup_steps}: the normalized rule measures each branch's "
                         "scale over the warm-up updates, so it needs at least 1 (rule='raw' takes 0)")
    if handover is not None:
        if not all(0 < p < 1 for p in handover) or len(handover) != 2:
            raise ValueError(f"hybrid_weights handover={handover} must be two lambdas strictly between 0 and 1")
        if not total_steps or total_steps < 1:
            raise ValueError(f"hybrid_weights handover={handover} moves over the run: give total_steps >= 1 "
                             f"(got {total_steps})")
    if mix == "update" and inner is None:
        raise ValueError("hybrid_weights(mix='update') scales the branches' optimizer updates, which only works "
                         "after the optimizer: pass inner=optax.adamw(...) (or inner=optax.identity() to scale "
                         "the raw gradients)")
    correct = (mix == "weight") if share_correction is None else share_correction
    branches = HybridWeight.BRANCHES[mix]
    sign = 1.0 if direction == "proportional" else -1.0
    unit = 2.0 if shares == "unit" else 1.0

    def prior(t):
        if handover is None:
            return jnp.full((), 0.5, jnp.float32)
        start, end = handover
        return jnp.float32(start) + jnp.float32(end - start) * jnp.minimum(t / total_steps, 1.0)

    def init_fn(params):
        groups = _hybrid_groups(params)
        if not groups:
            raise ValueError("hybrid_weights found no hybrid adapter (a dict with keys "
                             f"{HybridWeight.TRAINABLE}) in the parameters it was initialised with")
        start = {path: jnp.full(_layer_shape(g), prior(0), jnp.float32) for path, g in groups.items()}
        zeros = {path: jnp.zeros(_layer_shape(g) + (2,), jnp.float32) for path, g in groups.items()}
        return HybridWeightsState(step=jnp.zeros((), jnp.int32), ema=nest(start), lambdas=nest(start),
                                  reference=nest(zeros), inner=() if inner is None else inner.init(params))

    def update_fn(updates, state, params=None):
        groups = _hybrid_groups(updates)
        ema_old, lambdas_old = dict(iter_paths(state.ema)), dict(iter_paths(state.lambdas))
        reference_old = dict(iter_paths(state.reference))
        ema_new, lambdas, reference = {}, {}, {}
        t = state.step
        warm = t + 1 < warmup_steps
        prior_logit = 0.0 if handover is None else jax.scipy.special.logit(prior(t.astype(jnp.float32)))
        for path, group in groups.items():
            lam = lambdas_old[path]
            norms = jnp.stack([_branch_norm(group, branches[b]) for b in ("boft", "lora")], axis=-1)
            if correct:
                norms = norms / jnp.maximum(jnp.stack([lam, 1 - lam], axis=-1), _TINY)
            reference[path] = reference_old[path] + jnp.where(t < warmup_steps, norms, 0.0)
            if rule == "normalized":
                seen = jnp.minimum(t + 1, warmup_steps).astype(jnp.float32)
                norms = norms / jnp.maximum(reference[path] / seen, _TINY)
            log_ratio = jnp.log(norms[..., 0] + _TINY) - jnp.log(norms[..., 1] + _TINY)
            target = jax.nn.sigmoid(prior_logit + sign * log_ratio / temperature)
            ema_new[path] = ema * ema_old[path] + (1 - ema) * target
            held = jnp.broadcast_to(prior((t + 1).astype(jnp.float32)), lam.shape)
            lambdas[path] = jnp.where(warm, held, jnp.clip(ema_new[path], lo, hi)).astype(jnp.float32)
        inner_state = state.inner
        if inner is not None:
            updates, inner_state = inner.update(updates, inner_state, params)
        if mix == "update":
            updates = _scale_branches(updates, lambdas, branches, unit)
        return updates, HybridWeightsState(step=t + 1, ema=nest(ema_new), lambdas=nest(lambdas),
                                           reference=nest(reference), inner=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def current_lambdas(opt_state) -> dict:
    """The lambdas in use (nested like the parameters, `[*layer axes]` at each hybrid weight), from a
    `hybrid_weights` state anywhere inside `opt_state` (e.g. an `optax.chain` state), for `set_lambdas`
    and logging."""
    found = _find_state(opt_state)
    if found is None:
        raise ValueError("the optimizer state holds no hybrid_weights state; build the optimizer with "
                         "hyjax.optim.hybrid_weights(...)")
    return found.lambdas


def _find_state(state):
    if isinstance(state, HybridWeightsState):
        return state
    children = state.values() if isinstance(state, dict) else state if isinstance(state, (tuple, list)) else ()
    for child in children:
        found = _find_state(child)
        if found is not None:
            return found
    return None


def _is_group(x) -> bool:
    return isinstance(x, HybridWeight) or (isinstance(x, dict) and set(x) == set(HybridWeight.TRAINABLE))


def _field(group, name):
    return getattr(group, name) if isinstance(group, HybridWeight) else group[name]


def _hybrid_groups(tree, prefix: str = "") -> dict[str, Any]:
    """`{path: group}` for every hybrid node's trainable dict (or node) in a nested dict."""
    if _is_group(tree):
        return {prefix: tree}
    if not isinstance(tree, dict):
        return {}
    out = {}
    for key, value in tree.items():
        out.update(_hybrid_groups(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _layer_shape(group) -> tuple[int, ...]:
    name = "lora_b"
    return _field(group, name).shape[:-HybridWeight.CORE_NDIM[name]]


def _branch_norm(group, names) -> jax.Array:
    total = 0.0
    for name in names:
        x = _field(group, name).astype(jnp.float32)
        core = HybridWeight.CORE_NDIM[name]
        total = total + jnp.sum(x * x, axis=tuple(range(x.ndim - core, x.ndim)))
    return jnp.sqrt(total)


def _scale_branches(updates, lambdas, branches, unit: float, prefix: str = ""):
    """BOFT-branch updates times `unit * lam`, LoRA-branch updates times `unit * (1 - lam)`, per layer."""
    if _is_group(updates):
        lam = lambdas[prefix]
        scaled = {}
        for branch, share in (("boft", unit * lam), ("lora", unit * (1 - lam))):
            for name in branches[branch]:
                u = _field(updates, name)
                scaled[name] = (u * share.reshape(share.shape + (1,) * HybridWeight.CORE_NDIM[name])).astype(u.dtype)
        return updates.replace(**scaled) if isinstance(updates, HybridWeight) else scaled
    if not isinstance(updates, dict):
        return updates
    return {k: _scale_branches(v, lambdas, branches, unit, f"{prefix}/{k}" if prefix else str(k))
            for k, v in updates.items()}
