"""Attention: the O(seq) mask description against explicit masks, the flash-attention kernels (splash for
TPU, Triton for GPU, both in interpret mode here) against the XLA reference, and the model on either."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax import model as M
from hyjax.model.attention import AttentionMask, xla_attention
from pallas_kernels.attention import flash_attention

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 3, 80, 4, 2, 32  # 80: padded up to whole tiles by both kernels


def _segments() -> np.ndarray:
    """Row 0 one sequence, row 1 two packed sequences and padding, row 2 three packed sequences."""
    segments = np.ones((BATCH, SEQ), np.int32)
    segments[1, 30:70], segments[1, 70:] = 2, 0
    segments[2, 10:50], segments[2, 50:] = 2, 3
    return segments


def test_causal_mask_is_causal_within_segments():
    segments = _segments()
    dense = np.asarray(AttentionMask.causal(jnp.asarray(segments)).dense())
    i, j = np.meshgrid(np.arange(SEQ), np.arange(SEQ), indexing="ij")
    for row in range(BATCH):
        same = segments[row][:, None] == segments[row][None, :]
        np.testing.assert_array_equal(dense[row], (j <= i) & same)
    assert not dense[1, 75, :70].any() and dense[1, 75, 70:76].all()  # padding sees only padding


def test_cached_mask_sees_valid_slots_up_to_the_query():
    """Two prompts left-padded to 5 slots of a 9-slot cache, then 2 queries at slots 5 and 6: a real query
    sees the valid slots up to its own; left padding sees only empty slots and padding."""
    valid = np.zeros((2, 9), bool)
    valid[0, :7], valid[1, 2:7] = True, True  # row 1 has 2 slots of left padding
    slots = np.array([[5, 6], [5, 6]])
    mask = AttentionMask.cached(jnp.asarray(valid), jnp.ones((2, 2), bool), jnp.asarray(slots))
    expected = valid[:, None, :] & (np.arange(9)[None, None, :] <= slots[:, :, None])
    np.testing.assert_array_equal(np.asarray(mask.dense()), expected)
    prefill = AttentionMask.cached(jnp.asarray(valid[:, :5]), jnp.asarray(valid[:, :5]),
                                   jnp.broadcast_to(jnp.arange(5), (2, 5)))
    assert np.asarray(prefill.dense())[1, 1].tolist() == [True, True, False, False, False]


def _inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (BATCH, SEQ, HEADS, HEAD_DIM), dtype)
    k, v = (jax.random.normal(key, (BATCH, SEQ, KV_HEADS, HEAD_DIM), dtype) for key in keys[1:])
    return q, k, v


# Largest difference relative to the largest value. float32: summation order only (measured: 2e-7 of the
# outputs, 5e-7 of the gradients). bfloat16: the kernels and the reference round probabilities to bf16 at
# different points (measured: one bf16 step, 0.5% of the outputs and of the gradients).
TOLERANCE = {jnp.float32: dict(out=1e-6, grad=2e-6), jnp.bfloat16: dict(out=1e-2, grad=1e-2)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_flash_kernels_match_xla_attention(platform, dtype):
    """Values at every position and gradients of q, k and v: grouped key/value heads, packed rows, padding,
    a length that is no whole number of tiles."""
    segments = jnp.asarray(_segments())
    mask = AttentionMask.causal(segments)
    weights = jax.random.normal(jax.random.key(1), (BATCH, SEQ, HEADS, HEAD_DIM))

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    kernel = lambda q, k, v: flash_attention(q, k, v, segments, platform=platform, interpret=True)
    reference = lambda q, k, v: xla_attention(q, k, v, mask)
    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, got), got_grads = jax.jit(grad, static_argnums=0)(kernel, *_inputs(dtype))
    (_, want), want_grads = jax.jit(grad, static_argnums=0)(reference, *_inputs(dtype))
    assert got.dtype == dtype
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    difference = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    assert scale > 1 and difference < TOLERANCE[dtype]["out"] * scale
    for name, a, b in zip("qkv", got_grads, want_grads):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.max(jnp.abs(b))) > 1, name  # gradients that can be wrong
        assert float(jnp.max(jnp.abs(a - b))) < TOLERANCE[dtype]["grad"] * float(jnp.max(jnp.abs(b))), name


def test_model_gives_the_same_logits_and_gradients_with_flash_attention():
    """The tiny model with attention="pallas" (splash in interpret mode) against attention="xla": packed and
    padded rows, logits at real positions and every parameter's gradient."""
    config = M.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                           num_kv_heads=2, attention="xla")
    params = M.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, 64)
    segments = jnp.asarray(_segments())
    positions = jnp.asarray(np.stack([np.concatenate([np.arange(n) for n in np.unique(row, return_counts=True)[1]])
                                      for row in _segments()]))
    real = segments > 0

    def loss(params, attention):
        logits = M.apply(config.replace(attention=attention), params, tokens, positions, segments)
        return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., 0]), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, flash_logits), flash_grads = grad(params, "pallas")
    (_, xla_logits), xla_grads = grad(params, "xla")
    np.testing.assert_allclose(np.asarray(flash_logits)[np.asarray(real)], np.asarray(xla_logits)[np.asarray(real)],
                               atol=2e-5)
    for a, b in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


def test_unknown_attention_implementation_is_refused():
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        M.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, attention="flash")
