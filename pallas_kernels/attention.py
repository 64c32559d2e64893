"""Flash attention for causal self-attention over packed rows, through the kernels JAX ships.

The attention (one row of the batch): query i sees key j iff `j <= i` and both carry the same segment
id, with scores `q . k / sqrt(head_dim)` softmaxed over the keys a query sees. Packed sequences carry
distinct ids; padding carries 0 and so sees only padding (its outputs are never used). Every query sees
at least itself, so no row of the softmax is empty.

The kernels tile the queries and keys and keep a running softmax on chip (flash attention): memory is
O(seq), never a `[seq, seq]` score or mask array in HBM, and the backward pass recomputes the scores
tile by tile. On TPU, splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): grouped
key/value heads natively, segment ids, the causal mask given as structure (fully masked tiles are
skipped). On GPU, the Triton flash-attention kernel (`jax.experimental.pallas.ops.gpu.attention`): key
and value heads are repeated up to the query heads first (O(seq) memory). On a CPU host, both run in
interpret mode (slow; for tests). The pure-JAX reference is `hyjax.model.attention.xla_attention`.

Rows are padded at their end to a whole number of tiles with segment id 0: a real query never sees a
key after it, so padding at the end changes no real output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_platform, target_backend

# Query/key tile lengths: splash's are whole 128-lane vregs; Triton's powers of two (its own defaults
# take 32 in the backward kernels).
_TPU_TILES = (512, 256, 128)
_GPU_TILE = 64
_GPU_BACKWARD_TILE = 32


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    platform: str | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal attention within segments: `q [batch, seq, heads, head_dim]`, `k, v [batch, seq, kv_heads,
    head_dim]` (`heads` a multiple of `kv_heads`, each key/value head serving consecutive query heads),
    `segment_ids [batch, seq]` (int, 0 for padding). Returns `[batch, seq, heads, head_dim]` in q's dtype.

    platform: "tpu" (splash) or "gpu" (Triton); default the platform being traced for. interpret: run in
    interpret mode; default only when tracing for a CPU host.
    """
    platform = resolve_platform(platform)
    if interpret is None:
        interpret = target_backend() == "cpu"
    seq = q.shape[1]
    padded = _padded_length(seq, platform)
    if padded != seq:
        q, k, v = (jnp.pad(a, ((0, 0), (0, padded - seq), (0, 0), (0, 0))) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq)))
    segment_ids = segment_ids.astype(jnp.int32)
    dtype = q.dtype
    if interpret:  # interpret mode has no bf16 x bf16 -> f32 dot: run the tiles in float32
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5
    if platform == "tpu":
        out = _splash(q, k, v, segment_ids, scale, interpret)
    else:
        out = _triton(q, k, v, segment_ids, scale, interpret)
    return out[:, :seq].astype(dtype)


def _padded_length(seq: int, platform: str) -> int:
    tile = 128 if platform == "tpu" else _GPU_TILE
    return -(-seq // tile) * tile


def _splash(q, k, v, segment_ids, scale, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    heads, seq = q.shape[2], q.shape[1]
    kernel = _splash_kernel(heads, seq, interpret)
    # splash takes one row at a time, heads leading: [heads, seq, head_dim]; it does not scale q
    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q * jnp.asarray(scale, q.dtype), k, v))
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
        qt, kt, vt, segment_ids)
    return jnp.swapaxes(out, 1, 2)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq: int, interpret: bool):
    """The splash kernel of a causal `seq x seq` mask for `heads` query heads (its tile tables are built
    once per shape, in NumPy)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    tile = next(t for t in _TPU_TILES if seq % t == 0)
    blocks = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                               block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
    mask = masks.MultiHeadMask([masks.CausalMask((seq, seq))] * heads)
    with jax.ensure_compile_time_eval():  # concrete tile tables, not the tracers of the first caller's trace
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                      interpret=interpret)


def _triton(q, k, v, segment_ids, scale, interpret):
    from jax.experimental.pallas.ops.gpu import attention as triton

    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(a, group, axis=2) for a in (k, v))
    blocks = triton.BlockSizes(block_q=_GPU_TILE, block_k=_GPU_TILE, block_q_dkv=_GPU_BACKWARD_TILE,
                               block_kv_dkv=_GPU_BACKWARD_TILE, block_q_dq=_GPU_BACKWARD_TILE,
                               block_kv_dq=_GPU_BACKWARD_TILE)
    return triton.mha(q, k, v, segment_ids, sm_scale=scale, causal=True, block_sizes=blocks,
                      interpret=interpret)
