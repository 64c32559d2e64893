"""BOFT butterfly kernel: PEFT's permutations and dense rotation, the reference, and the Pallas
kernel in interpret mode (values and gradients, f32 and bf16)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import butterfly as bf

torch = pytest.importorskip("torch")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")

# (tokens, d, b, m): OFT, odd token counts (padding), several feature tiles, a 4-factor butterfly.
SHAPES = [(16, 32, 8, 1), (40, 64, 4, 3), (300, 256, 8, 4), (64, 256, 16, 2)]
SMALL_TILES = bf.BlockSizes(block_tokens=16, block_d=128, bwd_block_tokens=64)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _orthogonal_blocks(m, d, b, seed=0):
    rng = np.random.default_rng(seed)
    return np.linalg.qr(rng.normal(size=(m, d // b, b, b)))[0].astype(np.float32)


def _peft_rotation(blocks: np.ndarray) -> np.ndarray:
    """PEFT's dense `butterfly_oft_mat`, built with PEFT's own permutation functions."""
    m, n_blocks, b, _ = blocks.shape
    d = n_blocks * b
    factors = []
    for i in range(m):
        perm = boft_layer.BOFTLayer.block_butterfly_perm(None, d, n_blocks // 2**i, b // 2, m - 1)
        p = boft_layer.BOFTLayer.perm2mat(None, perm).double()
        block_diag = torch.block_diag(*torch.from_numpy(blocks[i].astype(np.float64)))
        factors.append(p @ block_diag @ p.T)
    rotation = factors[0]
    for factor in factors[1:]:
        rotation = factor @ rotation
    return rotation.numpy()


@pytest.mark.parametrize("d,b,m", [(64, 4, 3), (256, 8, 4), (96, 6, 2)])
def test_permutation_matches_peft(d, b, m):
    for i in range(m):
        want = boft_layer.BOFTLayer.block_butterfly_perm(None, d, d // b // 2**i, b // 2, m - 1).numpy()
        np.testing.assert_array_equal(bf.butterfly_perm(d, b, i), want)


@pytest.mark.parametrize("t,d,b,m", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_peft_dense_rotation(t, d, b, m, transpose):
    blocks = _orthogonal_blocks(m, d, b)
    x = np.random.default_rng(1).normal(size=(t, d)).astype(np.float32)
    rotation = _peft_rotation(blocks)
    want = x @ (rotation.T if transpose else rotation)
    op = bf.butterfly_apply_transposed if transpose else bf.butterfly_apply
    for kwargs in ({"impl": "xla"}, {"impl": "pallas", "interpret": True, "block_sizes": SMALL_TILES}):
        np.testing.assert_allclose(op(jnp.asarray(x), jnp.asarray(blocks), **kwargs), want, atol=2e-5)


def _assert_values_and_grads_match_reference(fn, t, d, b, m, dtype, transpose):
    """`fn(x, blocks)` (x @ R, or x @ R^T when `transpose`) in `dtype` against the f32 reference:
    values, and gradients in x and blocks (bf16 rounding is the only expected difference)."""
    blocks = jnp.asarray(_orthogonal_blocks(m, d, b, seed=t + m))
    x = jnp.asarray(np.random.default_rng(t).normal(size=(t, d)), dtype)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(t, d)), jnp.float32)

    def reference(x, q):
        return bf.butterfly_reference(x, q, transpose=transpose)

    def loss(fn, x, q):
        return jnp.sum(fn(x, q).astype(jnp.float32) * weights)

    tol = TOL[dtype]
    got, want = fn(x, blocks), reference(x.astype(jnp.float32), blocks)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float32(got), want, atol=tol * 4, rtol=tol)
    got_g = jax.grad(lambda x, q: loss(fn, x, q), argnums=(0, 1))(x, blocks)
    want_g = jax.grad(lambda x, q: loss(reference, x, q), argnums=(0, 1))(x.astype(jnp.float32), blocks)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.float32(g), w, atol=tol * float(jnp.max(jnp.abs(w))) * 2)


@pytest.mark.parametrize("t,d,b,m", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_kernel_values_and_grads_match_reference(t, d, b, m, dtype, transpose):
    op = bf.butterfly_apply_transposed if transpose else bf.butterfly_apply

    def kernel(x, q):
        return op(x, q, impl="pallas", interpret=True, block_sizes=SMALL_TILES)

    _assert_values_and_grads_match_reference(kernel, t, d, b, m, dtype, transpose)


@pytest.mark.parametrize("t,d,b,m", SHAPES + [(24, 256, 8, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_windowed_values_and_grads_match_reference_and_xla_dispatches(t, d, b, m, dtype, transpose):
    """XLA's one-matmul form against the factor-by-factor reference; impl="xla" takes it for m <= 4."""

    def windowed(x, q):
        return bf.butterfly_windowed(x, q, transpose=transpose)

    _assert_values_and_grads_match_reference(windowed, t, d, b, m, dtype, transpose)
    blocks = jnp.asarray(_orthogonal_blocks(m, d, b))
    x = jnp.asarray(np.random.default_rng(t).normal(size=(t, d)), dtype)
    op = bf.butterfly_apply_transposed if transpose else bf.butterfly_apply
    chosen = bf.butterfly_windowed if m <= 4 else bf.butterfly_reference
    assert bf.windows_are_cheaper(m, b) == (m <= 4)
    np.testing.assert_array_equal(np.float32(op(x, blocks, impl="xla")), np.float32(chosen(x, blocks, transpose=transpose)))


@pytest.mark.parametrize("t,d,b,m", SHAPES)
def test_orthogonal_and_inverse(t, d, b, m):
    blocks = jnp.asarray(_orthogonal_blocks(m, d, b))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(t, d)), jnp.float32)
    y = bf.butterfly_apply(x, blocks, impl="pallas", interpret=True, block_sizes=SMALL_TILES)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)
    back = bf.butterfly_apply_transposed(y, blocks, impl="pallas", interpret=True, block_sizes=SMALL_TILES)
    np.testing.assert_allclose(back, x, atol=2e-5)


def test_default_block_sizes_and_auto_dispatch():
    blocks = jnp.asarray(_orthogonal_blocks(2, 512, 8))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(70, 512)), jnp.float32)
    want = bf.butterfly_reference(x, blocks)
    np.testing.assert_array_equal(bf.butterfly_apply(x, blocks), bf.butterfly_windowed(x, blocks))  # auto on CPU: XLA
    np.testing.assert_allclose(bf.butterfly_apply(x, blocks, impl="pallas", interpret=True), want, atol=2e-5)


@pytest.mark.parametrize(
    "x_shape,blocks_shape,message",
    [
        ((4, 30), (1, 4, 8, 8), "block_size=8 must divide d=30"),
        ((4, 32), (1, 3, 8, 8), "n_blocks=3 * block_size=8 must equal d=32"),
        ((4, 48), (3, 6, 8, 8), "block_size=8 * 2**(n_factors=3 - 1) must divide d=48"),
        ((4, 30), (2, 10, 3, 3), "block_size=3 must be even"),
        ((4, 32, 1), (1, 4, 8, 8), "x must be [tokens, d]"),
        ((4, 32), (1, 4, 8, 4), "blocks must be [m, n_blocks, b, b]"),
    ],
)
def test_validation_names_the_offending_values(x_shape, blocks_shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bf.butterfly_apply(jnp.zeros(x_shape), jnp.zeros(blocks_shape), impl="xla")


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="impl='triton'"):
        bf.butterfly_apply(jnp.zeros((4, 16)), jnp.zeros((1, 2, 8, 8)), impl="triton")


def test_gpu_refuses_tiles_that_overflow_triton_shared_memory():
    x, blocks = jnp.zeros((64, 1024)), jnp.zeros((4, 32, 32, 32))  # s = 256: four 256 x 256 tiles
    with pytest.raises(ValueError, match="overflow Triton's shared memory; use impl='xla'"):
        bf.butterfly_apply(x, blocks, impl="pallas", platform="gpu")
