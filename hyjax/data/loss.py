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


def batch_log_likelihood(logits_fn, batch: dict) -> jax.Array:
    """Sum of log p(target) over each row's answer tokens: [B].

    `logits_fn(tokens, positions, segment_ids, logit_positions)` gives logits; when the batch's
    `loss_positions [B, K]` (`hyjax.data.batching`) is narrower than the batch, it is asked for logits at
    those K positions only (slots of -1 count for nothing), else at every position. The sums are the same.
    """
    targets, mask = batch["targets"], batch["loss_mask"]
    index = batch.get("loss_positions")
    if index is not None and index.shape[-1] < targets.shape[-1]:
        valid = index >= 0
        index = jnp.where(valid, index, 0)
        targets = jnp.take_along_axis(targets, index, axis=-1)
        mask = jnp.take_along_axis(mask, index, axis=-1) * valid
    else:
        index = None
    logits = logits_fn(batch["tokens"], batch["positions"], batch["segment_ids"], index)
    return masked_log_likelihood(logits, targets, mask)
