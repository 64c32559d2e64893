"""Unitary adapter operator: the reference is orthogonal and inverted by its transpose, and the
Pallas kernels (interpret mode) match it in values and gradients for f32 and bf16."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import unitary as un

SHAPES = [(37, 64), (64, 256)]  # (tokens, d): token padding, several token tiles
SMALL_TILES = un.BlockSizes(block_tokens=16)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _params(d, seed=0):
    rng = np.random.default_rng(seed)
    h = d // 2
    theta = jnp.asarray(rng.normal(size=(3, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 2, h)), jnp.float32)
    return theta, v, rng.permutation(h)


@pytest.mark.parametrize("t,d", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_reference_is_orthogonal_and_inverted_by_its_transpose(t, d, transpose):
    theta, v, perm = _params(d)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(t, d)), jnp.float32)
    forward, backward = (un.unitary_apply, un.unitary_apply_transposed)[:: -1 if transpose else 1]
    y = forward(x, theta, v, perm, impl="xla")
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(backward(y, theta, v, perm, impl="xla"), x, atol=1e-5)


def test_reference_matches_dense_matrix_of_its_factors():
    d, h = 16, 8
    theta, v, perm = _params(d, seed=5)
    ph = np.exp(1j * np.asarray(theta, np.float64))
    u = [np.asarray(v[k, 0], np.float64) + 1j * np.asarray(v[k, 1], np.float64) for k in range(2)]
    u = [w / np.linalg.norm(w) for w in u]
    reflect = [np.eye(h) - 2 * np.outer(w, w.conj()) for w in u]
    fourier = np.fft.fft(np.eye(h), norm="ortho", axis=0)
    pi = np.eye(h)[perm]
    dense = np.diag(ph[2]) @ reflect[1] @ fourier.conj().T @ np.diag(ph[1]) @ pi @ reflect[0] @ fourier @ np.diag(ph[0])
    x = np.random.default_rng(6).normal(size=(3, d))
    want = (x[:, :h] + 1j * x[:, h:]) @ dense.T
    got = un.unitary_reference(jnp.asarray(x, jnp.float32), theta, v, perm)
    np.testing.assert_allclose(got, np.concatenate([want.real, want.imag], axis=1), atol=1e-5)


@pytest.mark.parametrize("t,d", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_kernel_values_and_grads_match_reference(t, d, dtype, transpose):
    theta, v, perm = _params(d, seed=t)
    x = jnp.asarray(np.random.default_rng(t).normal(size=(t, d)), dtype)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(t, d)), jnp.float32)
    op = un.unitary_apply_transposed if transpose else un.unitary_apply

    def kernel(x, th, v):
        return op(x, th, v, perm, impl="pallas", interpret=True, block_sizes=SMALL_TILES)

    def reference(x, th, v):
        return un.unitary_reference(x, th, v, perm, transpose=transpose)

    def loss(fn):
        return lambda x, th, v: jnp.sum(fn(x, th, v).astype(jnp.float32) * weights)

    tol = TOL[dtype]
    got, want = kernel(x, theta, v), reference(x, theta, v)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol * 4, rtol=tol)
    got_g = jax.grad(loss(kernel), argnums=(0, 1, 2))(x, theta, v)
    want_g = jax.grad(loss(reference), argnums=(0, 1, 2))(x.astype(jnp.float32), theta, v)
    for g, w in zip(got_g, want_g):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.float32(g), np.float32(w), atol=tol * scale * 2)


def test_validation_names_the_offending_values():
    theta, v, perm = _params(8)
    with pytest.raises(ValueError, match=re.escape("d=7 must be even")):
        un.unitary_apply(jnp.zeros((2, 7)), theta, v, perm, impl="xla")
    with pytest.raises(ValueError, match=re.escape("theta must be [3, 8] for d=16, got theta_shape=(3, 4)")):
        un.unitary_apply(jnp.zeros((2, 16)), theta, v, perm, impl="pallas", interpret=True)


def test_gpu_kernel_needs_power_of_two_half_width():
    theta, v, perm = _params(576)
    with pytest.raises(ValueError, match=re.escape("h=288 (d/2) must be a power of two")):
        un.unitary_apply(jnp.zeros((4, 576)), theta, v, perm, impl="pallas", platform="gpu")
