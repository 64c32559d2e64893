"""A LLaMA-style decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU, scanned layers.

Every projection goes through `linear(x, w)`, so an adapter placed in a weight's slot acts on the
activations without the model knowing (see `hyjax.model.linear`). Parameters (as a plain dict, see
`hyjax.model.params`):

    embed                 [vocab, embed]
    layers/attn_norm      [layers, embed]
    layers/attn/q_proj    [layers, embed, heads * head_dim]      (k_proj, v_proj: kv_heads * head_dim)
    layers/attn/o_proj    [layers, heads * head_dim, embed]
    layers/mlp_norm       [layers, embed]
    layers/mlp/gate_proj  [layers, embed, mlp]                   (up_proj the same)
    layers/mlp/down_proj  [layers, mlp, embed]
    final_norm            [embed]
    lm_head               [embed, vocab]                         (untied models only)

Each parameter carries logical axis names (`out_sharding` metadata, e.g. ('layers', 'embed', 'heads')),
and a few activations are marked with theirs (`constrain`); the model never names a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hyjax.model.attention import AttentionMask, attention
from hyjax.model.config import LlamaConfig
from hyjax.model.linear import dense, linear
from hyjax.model.rope import apply_rope, inverse_frequencies
from hyjax.sharding.activations import constrain

_INIT_STD = 0.02


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean(x^2) + eps) * scale`, computed in float32 and returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _param(rngs: nnx.Rngs | None, shape, dtype, axes, ones: bool = False) -> nnx.Param:
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, hd, dt = config.hidden_size, config.head_dim, config.jnp_param_dtype
        self.config = config
        self.q_proj = _param(rngs, (d, config.num_heads * hd), dt, ("embed", "heads"))
        self.k_proj = _param(rngs, (d, config.num_kv_heads * hd), dt, ("embed", "kv_heads"))
        self.v_proj = _param(rngs, (d, config.num_kv_heads * hd), dt, ("embed", "kv_heads"))
        self.o_proj = _param(rngs, (config.num_heads * hd, d), dt, ("heads", "embed"))

    def __call__(self, x, positions, mask, inv_freq, kv=None, cache_index=None):
        """x: [batch, seq, embed]. With `kv = (k_cache, v_cache)` ([batch, slots, kv_heads, head_dim]) the
        new keys and values are written at `cache_index` and attention runs over the whole cache."""
        c = self.config
        batch, seq, _ = x.shape
        q = linear(x, self.q_proj.get_value(), "embed").reshape(batch, seq, c.num_heads, c.head_dim)
        k = linear(x, self.k_proj.get_value(), "embed").reshape(batch, seq, c.num_kv_heads, c.head_dim)
        v = linear(x, self.v_proj.get_value(), "embed").reshape(batch, seq, c.num_kv_heads, c.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if kv is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=c.attention)
        return linear(out.reshape(batch, seq, -1), self.o_proj.get_value(), "heads"), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, f, dt = config.hidden_size, config.intermediate_size, config.jnp_param_dtype
        self.gate_proj = _param(rngs, (d, f), dt, ("embed", "mlp"))
        self.up_proj = _param(rngs, (d, f), dt, ("embed", "mlp"))
        self.down_proj = _param(rngs, (f, d), dt, ("mlp", "embed"))

    def __call__(self, x):
        gate = jax.nn.silu(linear(x, self.gate_proj.get_value(), "embed"))
        return linear(gate * linear(x, self.up_proj.get_value(), "embed"), self.down_proj.get_value(), "mlp")


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, dt = config.hidden_size, config.jnp_param_dtype
        self.eps = config.rms_norm_eps
        self.attn_norm = _param(None, (d,), dt, ("embed",), ones=True)
        self.attn = Attention(config, rngs)
        self.mlp_norm = _param(None, (d,), dt, ("embed",), ones=True)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, mask, inv_freq, kv=None, cache_index=None):
        h, kv = self.attn(rms_norm(x, dense(self.attn_norm.get_value()), self.eps), positions, mask, inv_freq,
                          kv, cache_index)
        x = x + h
        x = x + self.mlp(rms_norm(x, dense(self.mlp_norm.get_value()), self.eps))
        return x, kv


@struct.dataclass
class KVCache:
    """Keys and values of every layer for generation.

    k, v: [layers, batch, slots, kv_heads, head_dim]; valid: [batch, slots], False for empty slots and
    left padding; index: the next slot to write (the same for the whole batch).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, slots: int) -> "KVCache":
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, config.jnp_dtype), v=jnp.zeros(shape, config.jnp_dtype),
                   valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


_REMAT_POLICIES = {
    "none": jax.checkpoint_policies.everything_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
    """LLaMA-family causal language model. Layers are stacked on a leading `layers` axis and scanned."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.config = config
        dt = config.jnp_param_dtype
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), dt, ("vocab", "embed"))

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(config, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = _param(None, (config.hidden_size,), dt, ("embed",), ones=True)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), dt, ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, logit_positions: jax.Array | None = None) -> jax.Array:
        """Logits `[batch, seq, vocab]` (float32) for `tokens [batch, seq]`.

        `segment_ids [batch, seq]` marks packed sequences (positive ids) and padding (0); by default the
        whole row is one sequence. `positions` default to 0..seq-1. `logit_positions [batch, k]` (indices
        into seq) gives logits `[batch, k, vocab]` at those positions only: the final norm and the head
        run on the gathered hidden states, never on every position.
        """
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, seq), jnp.int32)
        x = constrain(self._embed(tokens), ("batch", "seq", "embed"))
        x, _ = self._run_layers(x, positions, AttentionMask.causal(segment_ids), kv=None, cache_index=None)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, logit_positions[..., None].astype(jnp.int32), axis=1)
        return self._logits(x)

    def decode(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: KVCache, last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Runs `tokens [batch, seq]` against the cache, writing them at slots `cache.index...`.

        `positions` are rotary positions, `token_valid` is False for left padding. Returns logits
        `[batch, seq, vocab]` (`[batch, 1, vocab]` at the last position with `last_only`: a prompt's
        prefill needs no more) and the updated cache.
        """
        seq = tokens.shape[1]
        valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
        slots = cache.index + jnp.arange(seq)
        mask = AttentionMask.cached(valid, token_valid, jnp.broadcast_to(slots, tokens.shape))
        x, (k, v) = self._run_layers(self._embed(tokens), positions, mask, (cache.k, cache.v), cache.index)
        if last_only:
            x = x[:, -1:]
        return self._logits(x), KVCache(k=k, v=v, valid=valid, index=cache.index + seq)

    def _embed(self, tokens):
        return jnp.take(dense(self.embed.get_value()), tokens, axis=0).astype(self.config.jnp_dtype)

    def _logits(self, x):
        x = rms_norm(x, dense(self.final_norm.get_value()), self.config.rms_norm_eps)
        if self.config.tie_embeddings:
            head = dense(self.embed.get_value()).T
        else:
            head = self.lm_head.get_value()
        return constrain(linear(x, head).astype(jnp.float32), ("batch", "seq", "vocab"))

    def _run_layers(self, x, positions, mask, kv, cache_index):
        inv_freq = jnp.asarray(inverse_frequencies(self.config))
        policy = _REMAT_POLICIES[self.config.remat]

        if kv is None:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.config.scan_unroll)
            @nnx.remat(policy=policy, prevent_cse=False)
            def body(h, layer):
                h, _ = layer(h, positions, mask, inv_freq)
                return constrain(h, ("batch", "seq", "embed"))

            return body(x, self.layers), None

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=self.config.scan_unroll)
        def cached_body(h, layer, layer_kv):
            h, layer_kv = layer(h, positions, mask, inv_freq, layer_kv, cache_index)
            return h, layer_kv

        return cached_body(x, self.layers, kv)
