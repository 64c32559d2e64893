"""Grouped-query attention and the masks it takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped key/value heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: [batch, q_len, kv_len], True where a query may attend to a key. Each key/value head serves
    `heads / kv_heads` consecutive query heads. Scores and softmax run in float32.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """`[batch, seq] -> [batch, seq, seq]`: causal, within a segment, never to padding (segment 0).

    All ones is one unpadded sequence; packed sequences get distinct positive ids.
    """
    seq = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] != 0)


def cached_mask(kv_valid: jax.Array, query_positions: jax.Array) -> jax.Array:
    """Mask for queries at cache slots `query_positions [batch, q_len]` over a cache of `kv_len` slots.

    A query sees cache slots up to and including its own, and only slots marked valid in
    `kv_valid [batch, kv_len]` (left padding is invalid).
    """
    slots = jnp.arange(kv_valid.shape[1])
    causal = slots[None, None, :] <= query_positions[:, :, None]
    return causal & kv_valid[:, None, :]
