"""GRPO's objective: advantages normalised within each group of completions, the clipped
importance-ratio loss over completion tokens, and the k3 estimate of the KL divergence to a reference
policy.

For one prompt with G sampled completions o_1..o_G and rewards r_1..r_G, every token of o_i gets

    A_i = (r_i - mean(r)) / (std(r) + eps)          (population std over the group; 0 when all tie)

With per-token log-probabilities l (current policy), l_old (the policy that sampled the batch, fixed over
its `num_iterations` optimizer updates) and l_ref (the reference policy), at each completion token t:

    rho_t       = exp(l_t - l_old_t)
    surrogate_t = min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)
    kl_t        = exp(l_ref_t - l_t) - (l_ref_t - l_t) - 1        (k3: unbiased for KL(pi || pi_ref), >= 0)
    loss_t      = -surrogate_t + beta kl_t

On the first update of a batch l = l_old, so rho = 1 and the clip is idle: the gradient is the policy
gradient -A grad l. Token losses are aggregated over the completion tokens (`mask`) either as the mean
over completions of each completion's token mean ("sequence_mean", the GRPO paper's) or as the mean over
every completion token of the batch ("token_mean", which weighs long completions by their length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("sequence_mean", "token_mean")


def group_advantages(rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
    """`rewards [prompts, group]` -> advantages of the same shape, normalised within each group."""
    rewards = rewards.astype(jnp.float32)
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    std = jnp.std(rewards, axis=-1, keepdims=True)
    return (rewards - mean) / (std + eps)


def k3_kl(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """Per-token k3 estimate exp(r - l) - (r - l) - 1 of KL(current || reference) at sampled tokens."""
    delta = ref_log_probs - log_probs
    return jnp.exp(delta) - delta - 1.0


def aggregate_sums(values: jax.Array, mask: jax.Array, how: str) -> tuple[jax.Array, jax.Array]:
    """`(numerator, denominator)` of the mean of per-token `values [completions, tokens]` over the tokens
    `mask` marks (see the module docstring). Both add up over micro-batches: the mean of a whole batch
    is the sum of its micro-batches' numerators over the sum of their denominators. A completion of no
    tokens (padding) counts for nothing."""
    mask = mask.astype(values.dtype)
    if how == "sequence_mean":
        tokens = jnp.sum(mask, axis=-1)
        per_sequence = jnp.sum(values * mask, axis=-1) / jnp.maximum(tokens, 1.0)
        return jnp.sum(per_sequence), jnp.sum((tokens > 0).astype(values.dtype))
    if how == "token_mean":
        return jnp.sum(values * mask), jnp.sum(mask)
    raise ValueError(f"loss aggregation {how!r} must be one of {AGGREGATIONS}")


def aggregate(values: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """Mean of per-token `values [completions, tokens]` over the tokens `mask` marks (see module doc)."""
    numerator, denominator = aggregate_sums(values, mask, how)
    return numerator / jnp.maximum(denominator, 1.0)


def grpo_token_terms(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, *,
                     ref_log_probs: jax.Array | None = None, beta: float = 0.0, clip_low: float = 0.2,
                     clip_high: float = 0.2) -> dict[str, jax.Array]:
    """Per-token `loss`, `clipped` (1 where the clip bound binds), `ratio` and, with `ref_log_probs`, `kl`,
    each `[completions, tokens]` (arguments as `grpo_loss`'s; `advantages` may also be given per token)."""
    old_log_probs = jax.lax.stop_gradient(old_log_probs)
    ratio = jnp.exp(log_probs - old_log_probs)
    advantage = (advantages if advantages.ndim == log_probs.ndim else advantages[:, None]).astype(log_probs.dtype)
    unclipped = ratio * advantage
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantage
    terms = {"loss": -jnp.minimum(unclipped, clipped), "clipped": (clipped < unclipped).astype(log_probs.dtype),
             "ratio": ratio}
    if ref_log_probs is not None:
        terms["kl"] = k3_kl(log_probs, jax.lax.stop_gradient(ref_log_probs))
        terms["loss"] = terms["loss"] + beta * terms["kl"]
    return terms


def grpo_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              ref_log_probs: jax.Array | None = None, beta: float = 0.0, clip_low: float = 0.2,
              clip_high: float = 0.2, aggregation: str = "sequence_mean") -> tuple[jax.Array, dict]:
    """The GRPO loss of a batch of completions and its metrics.

    Args:
      log_probs: `[completions, tokens]` log-probabilities of the sampled tokens under the current policy
        (differentiated).
      old_log_probs: the same under the policy that sampled them (constants).
      advantages: `[completions]`, `group_advantages` flattened (or `[completions, tokens]`, per token).
      mask: `[completions, tokens]`, 1 at completion tokens.
      ref_log_probs: the reference policy's (None, or beta 0: no KL term).
      beta, clip_low, clip_high, aggregation: see the module docstring.

    Returns:
      `(loss, metrics)`; metrics (aggregated the same way): `kl`, `clip_fraction` (tokens whose ratio the
      clip bounds, on the side that binds), `ratio`.
    """
    terms = grpo_token_terms(log_probs, old_log_probs, advantages, ref_log_probs=ref_log_probs, beta=beta,
                             clip_low=clip_low, clip_high=clip_high)
    means = {name: aggregate(value, mask, aggregation) for name, value in terms.items()}
    loss = means.pop("loss")
    means["clip_fraction"] = means.pop("clipped")
    return loss, means
