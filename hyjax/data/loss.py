"""Masked cross-entropy over answer tokens, and per-row log-likelihood for scoring answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at each position, in float32. logits [B, T, V], targets [B, T] -> [B, T]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the positions where `loss_mask` is 1 (0 when the mask is empty).

    Args:
      logits: [B, T, V] model output (any float dtype; computed in float32).
      targets: [B, T] int next-token ids.
      loss_mask: [B, T] float weights, 1 on answer tokens.
    """
    mask = loss_mask.astype(jnp.float32)
    nll = -_token_log_probs(logits, targets)  # [B, T]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_log_likelihood(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Sum of log p(target) over the masked positions of each row: [B]. Scores an answer given its prompt."""
    return jnp.sum(_token_log_probs(logits, targets) * loss_mask.astype(jnp.float32), axis=-1)
