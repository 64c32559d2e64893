"""Grouped-query attention, and who may attend to whom as O(seq) ids rather than a `[seq, seq]` mask.

`AttentionMask` holds, per row, a segment id for every query and key and each query's slot on the key
axis: query i sees key j iff `j <= slot(i)` and both carry the same segment id. Training rows use it
for causal attention within packed sequences (padding is segment 0 and sees only padding); generation
uses it over the KV cache (a cache slot's segment is 1 when it holds a token, 0 for empty slots and left
padding). The boolean `[batch, q_len, kv_len]` mask is only ever formed inside `xla_attention`, where
XLA fuses it into the scores.

`attention` picks the implementation: the flash-attention kernels of `pallas_kernels.attention` (splash
on TPU, Triton on GPU; O(seq) memory) for causal self-attention when `impl` selects Pallas, else
`xla_attention`, which materialises the scores (the reference, and the path of cached decoding, whose
queries are few).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.attention import flash_attention
from pallas_kernels.dispatch import use_pallas
from hyjax.sharding.activations import on_local_heads


@struct.dataclass
class AttentionMask:
    """Query i of a row sees key j iff `j <= q_slots[i]` and `q_segments[i] == kv_segments[j]`.

    q_segments, q_slots: [batch, q_len]; kv_segments: [batch, kv_len]. `self_causal` (static) says the
    queries are the keys themselves (`q_slots` = 0..seq-1, the same segments): the case the flash kernels
    take.
    """

    q_segments: jax.Array
    kv_segments: jax.Array
    q_slots: jax.Array
    self_causal: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def causal(cls, segment_ids: jax.Array) -> "AttentionMask":
        """Causal self-attention within the segments of `segment_ids [batch, seq]` (positive ids for
        packed sequences, 0 for padding; all ones: one unpadded sequence per row)."""
        batch, seq = segment_ids.shape
        slots = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        return cls(segment_ids, segment_ids, slots, self_causal=True)

    @classmethod
    def cached(cls, kv_valid: jax.Array, token_valid: jax.Array, q_slots: jax.Array) -> "AttentionMask":
        """Queries at cache slots `q_slots [batch, q_len]` over a cache whose slots hold a token where
        `kv_valid [batch, slots]`; `token_valid [batch, q_len]` is False for left padding (which then
        sees only padding)."""
        as_ids = lambda valid: valid.astype(jnp.int32)
        return cls(as_ids(token_valid), as_ids(kv_valid), q_slots)

    def dense(self) -> jax.Array:
        """The boolean `[batch, q_len, kv_len]` mask, True where a query sees a key."""
        keys = jnp.arange(self.kv_segments.shape[1])
        causal = keys[None, None, :] <= self.q_slots[:, :, None]
        return causal & (self.q_segments[:, :, None] == self.kv_segments[:, None, :])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, impl: str = "auto") -> jax.Array:
    """Softmax attention with grouped key/value heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]. Each key/value head
    serves `heads / kv_heads` consecutive query heads. impl: "auto" (the flash kernels on TPU and GPU),
    "pallas" or "xla" (see `pallas_kernels.dispatch`); cached decoding always runs `xla_attention`.
    """
    if mask.self_causal and use_pallas(impl):
        return on_local_heads(flash_attention, q, k, v, mask.q_segments)
    return xla_attention(q, k, v, mask)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """`attention` as plain XLA ops: scores `[batch, kv_heads, group, q_len, kv_len]` and softmax in
    float32."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask.dense()[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)
