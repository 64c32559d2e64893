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
    proportional: target = n_boft^(1/tau) / (n_boft^(1/tau) + n_lora^(1/tau))
    inverse:      target = n_lora^(1/tau) / (n_boft^(1/tau) + n_lora^(1/tau))
    ema_{t+1} = beta * ema_t + (1 - beta) * target,  ema_0 = 0.5
    lam_{t+1} = 0.5 if t + 1 < warmup_steps else clip(ema_{t+1}, lo, hi)

(the target is computed as a sigmoid of the log-ratio, 0.5 when both norms are 0). With mix="update" the
forward does not use lambda, so the gradients carry no lambda to correct for (share correction is off by
default); instead the inner optimizer's updates of the BOFT branch are multiplied by `lam_{t+1}` and the
LoRA-GA branch's by `1 - lam_{t+1}`. That scaling must come after the inner optimizer (Adam normalises a
scaled gradient back), hence `inner` is required for mix="update". With mix="weight" gradients pass
through unchanged (to `inner` when given).

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
_TINY = 1e-30


class HybridWeightsState(NamedTuple):
    """step: updates applied (int32); ema, lambdas: nested dicts like the parameter tree, with a
    `[*layer axes]` float32 array at each hybrid weight's path; inner: the inner optimizer's state (empty
    tuple when none)."""

    step: jax.Array
    ema: dict
    lambdas: dict
    inner: Any = ()


def hybrid_weights(direction: str = "proportional", temperature: float = 1.0, ema: float = 0.9,
                   clip: tuple[float, float] = (0.05, 0.95), warmup_steps: int = 10, mix: str = "weight",
                   share_correction: bool | None = None,
                   inner: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """The transform that computes each hybrid layer's lambda (formulas in the module docstring).

    direction: "proportional" (the branch with the larger share-corrected gradient gets the larger
        share) or "inverse". temperature: tau > 0. ema: beta in [0, 1). clip: (lo, hi) within [0, 1].
    warmup_steps: lambda stays 0.5 for the first forward passes. mix: as the hybrid nodes' mix.
    share_correction: divide each branch's norm by its share (default: mix == "weight").
    inner: the optimizer run after lambda is computed; required for mix="update", whose lambda scales
        the inner optimizer's updates.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"hybrid_weights direction={direction!r} must be one of {DIRECTIONS}")
    if mix not in MIXES:
        raise ValueError(f"hybrid_weights mix={mix!r} must be one of {MIXES}")
    if temperature <= 0:
        raise ValueError(f"hybrid_weights temperature={temperature} must be positive")
    if not 0 <= ema < 1:
        raise ValueError(f"hybrid_weights ema={ema} must be in [0, 1)")
    lo, hi = clip
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"hybrid_weights clip={clip} must satisfy 0 <= lo <= hi <= 1")
    if warmup_steps < 0:
        raise ValueError(f"hybrid_weights warmup_steps={warmup_steps} must be non-negative")
    if mix == "update" and inner is None:
        raise ValueError("hybrid_weights(mix='update') scales the branches' optimizer updates, which only works "
                         "after the optimizer: pass inner=optax.adamw(...) (or inner=optax.identity() to scale "
                         "the raw gradients)")
    correct = (mix == "weight") if share_correction is None else share_correction
    branches = HybridWeight.BRANCHES[mix]
    sign = 1.0 if direction == "proportional" else -1.0

    def init_fn(params):
        groups = _hybrid_groups(params)
        if not groups:
            raise ValueError("hybrid_weights found no hybrid adapter (a dict with keys "
                             f"{HybridWeight.TRAINABLE}) in the parameters it was initialised with")
        half = {path: jnp.full(_layer_shape(g), 0.5, jnp.float32) for path, g in groups.items()}
        return HybridWeightsState(step=jnp.zeros((), jnp.int32), ema=nest(half), lambdas=nest(half),
                                  inner=() if inner is None else inner.init(params))

    def update_fn(updates, state, params=None):
        groups = _hybrid_groups(updates)
        ema_old, lambdas_old = dict(iter_paths(state.ema)), dict(iter_paths(state.lambdas))
        ema_new, lambdas = {}, {}
        warm = state.step + 1 < warmup_steps
        for path, group in groups.items():
            lam = lambdas_old[path]
            n_boft, n_lora = (_branch_norm(group, branches[b]) for b in ("boft", "lora"))
            if correct:
                n_boft, n_lora = n_boft / jnp.maximum(lam, _TINY), n_lora / jnp.maximum(1 - lam, _TINY)
            target = jax.nn.sigmoid(sign * (jnp.log(n_boft + _TINY) - jnp.log(n_lora + _TINY)) / temperature)
            ema_new[path] = ema * ema_old[path] + (1 - ema) * target
            lambdas[path] = jnp.where(warm, 0.5, jnp.clip(ema_new[path], lo, hi)).astype(jnp.float32)
        inner_state = state.inner
        if inner is not None:
            updates, inner_state = inner.update(updates, inner_state, params)
        if mix == "update":
            updates = _scale_branches(updates, lambdas, branches)
        return updates, HybridWeightsState(step=state.step + 1, ema=nest(ema_new), lambdas=nest(lambdas),
                                           inner=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def current_lambdas(opt_state) -> dict:
    """The lambdas in use (nested like the parameters, `[*layer axes]` at each hybrid weight), from a `hybrid_weights` state anywhere inside
    `opt_state` (e.g. an `optax.chain` state), for `set_lambdas` and logging."""
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


def _scale_branches(updates, lambdas, branches, prefix: str = ""):
    """BOFT-branch updates times lam, LoRA-branch updates times 1 - lam, per layer."""
    if _is_group(updates):
        lam = lambdas[prefix]
        scaled = {}
        for branch, share in (("boft", lam), ("lora", 1 - lam)):
            for name in branches[branch]:
                u = _field(updates, name)
                scaled[name] = (u * share.reshape(share.shape + (1,) * HybridWeight.CORE_NDIM[name])).astype(u.dtype)
        return updates.replace(**scaled) if isinstance(updates, HybridWeight) else scaled
    if not isinstance(updates, dict):
        return updates
    return {k: _scale_branches(v, lambdas, branches, f"{prefix}/{k}" if prefix else str(k))
            for k, v in updates.items()}
