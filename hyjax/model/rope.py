"""Rotary position embeddings (RoPE), in the rotate-half layout of Hugging Face LLaMA checkpoints."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hyjax.model.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """`inv_freq[i] = theta^(-2i/head_dim)`, with LLaMA-3.1's scaling when the config asks for it.

    LLaMA-3.1 scaling keeps high frequencies (wavelength below `original / high_freq_factor`), divides low
    frequencies (wavelength above `original / low_freq_factor`) by `factor`, and interpolates smoothly
    in between: `(1 - s) inv_freq / factor + s inv_freq` with `s = (original / wavelength - low) / (high - low)`.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates `x [batch, seq, heads, head_dim]` by angles `positions [batch, seq] * inv_freq`.

    Rotate-half layout: dimension i pairs with i + head_dim/2. Computed in float32.
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, head_dim/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
