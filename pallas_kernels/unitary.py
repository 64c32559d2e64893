"""The unitary adapter's structured operator: Pallas kernels around XLA's FFT, beside the reference.

The operator (Arjovsky et al. 2016, uRNN). The d real features of a token pair into h = d/2
complex numbers, `z = x[:h] + i x[h:]`, and

    U = D3 R2 F^-1 D2 Pi R1 F D1,

with `D_k = diag(exp(i theta_k))` unit-modulus phases, `R_k = I - 2 u_k u_k^H` Householder
reflections (`u_k = v_k / ||v_k||`, complex), `Pi` the fixed permutation `(Pi z)_j = z[perm[j]]`
and `F` the unitary DFT (`norm="ortho"`). Every factor is unitary, so U, read as a real map on d
features, is exactly orthogonal; `unitary_apply(x, ...)` returns `U x` per token (rows of x) and
`unitary_apply_transposed` returns `U^T x` = `U^H x`, its inverse.

Kernel boundaries. The FFTs stay in XLA: Pallas has no FFT, Mosaic and Triton have no complex
dtype, and an O(h log h) FFT is not something a hand-written Pallas kernel beats on either
backend. What lies between them is fused: each Householder reflection (a per-token reduction
`u^H z` then a rank-one update, which XLA does as two passes) together with the phase after it
runs in one Pallas kernel over real and imaginary planes. The permutation and D2 (a gather and a
multiply) fuse into XLA's complex packing before the inverse FFT, and D1 into the packing before
the forward FFT. On TPU the kernel lets XLA fuse the real/imaginary extraction after an FFT into
its operands (`allow_input_fusion`); on GPU that extraction is one more XLA pass, and on an H100
the Pallas path measured 1.45x slower than XLA's own fusions (bench/results/kernels_h100_bf16.md),
so `impl="auto"` picks the kernel on TPU only.

Passes over the activations, forward: pack+D1 | FFT | reflect+phase | Pi+D2+pack | IFFT |
reflect+phase+unpair. The backward pass of the reflection kernel is a kernel too: the adjoint
(phase back, reflect again) for the activations, and per-tile partial sums for the gradients of
u and theta, which XLA adds up.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import dispatch


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Kernel tiling. block_tokens: tokens per program (each program holds whole tokens, as the
    reflection reduces over all h complex features); capped so a tile stays within on-chip memory."""

    block_tokens: int

    @classmethod
    def for_platform(cls, platform: str) -> BlockSizes:
        """Defaults: 128 tokens on TPU (VMEM), 4 on GPU (a Triton program keeps its tile in registers)."""
        return cls(block_tokens=4 if platform == "gpu" else 128)


def validate(x_shape, theta_shape, v_shape, perm_shape) -> int:
    """Checks x: [tokens, d], theta: [3, d/2], v: [2, 2, d/2] (reflection, re/im), perm: [d/2]; returns h."""
    if len(x_shape) != 2:
        raise ValueError(f"x must be [tokens, d], got {x_shape=}")
    d = x_shape[1]
    if d % 2:
        raise ValueError(f"{d=} must be even to pair features into complex numbers")
    h = d // 2
    if tuple(theta_shape) != (3, h):
        raise ValueError(f"theta must be [3, {h}] for {d=}, got {theta_shape=}")
    if tuple(v_shape) != (2, 2, h):
        raise ValueError(f"v must be [2, 2, {h}] for {d=}, got {v_shape=}")
    if tuple(perm_shape) != (h,):
        raise ValueError(f"perm must be [{h}] for {d=}, got {perm_shape=}")
    return h


def _unit(v):
    """Complex unit vector from [2, h] real and imaginary parts."""
    u = v[0] + 1j * v[1]
    return u / jnp.linalg.norm(u)


def _pair(x):
    h = x.shape[1] // 2
    x = x.astype(jnp.float32)
    return x[:, :h] + 1j * x[:, h:]


def _unpair(z, dtype):
    return jnp.concatenate([z.real, z.imag], axis=1).astype(dtype)


def _fft(z, inverse=False):
    return (jnp.fft.ifft if inverse else jnp.fft.fft)(z, axis=-1, norm="ortho")


# ---------------------------------------------------------------------------- pure-JAX reference


def _reflect(z, u):
    return z - 2 * u * jnp.sum(jnp.conj(u) * z, axis=-1, keepdims=True)


def unitary_reference(x, theta, v, perm, *, transpose: bool = False) -> jax.Array:
    """`U x` (or `U^T x`) per token in complex arithmetic. x: [tokens, d]; see the module docstring."""
    validate(x.shape, theta.shape, v.shape, np.shape(perm))
    u1, u2 = _unit(v[0]), _unit(v[1])
    ph = jnp.exp(1j * theta)  # [3, h]
    z = _pair(x)
    if transpose:
        z = _fft(_reflect(z * jnp.conj(ph[2]), u2))
        z = _fft(_reflect((z * jnp.conj(ph[1]))[:, jnp.argsort(perm)], u1), inverse=True) * jnp.conj(ph[0])
    else:
        z = _fft(z * ph[0])
        z = _fft(_reflect(z, u1)[:, perm] * ph[1], inverse=True)
        z = _reflect(z, u2) * ph[2]
    return _unpair(z, x.dtype)


# ------------------------------------------------------------- Pallas: reflection, then a phase


@dataclasses.dataclass(frozen=True)
class _Plan:
    block_tokens: int
    platform: str
    interpret: bool


def _reflect_planes(zr, zi, ur, ui):
    """Householder reflection on real/imaginary planes; also returns c = u^H z ([tokens, 1] each)."""
    cr = jnp.sum(ur * zr + ui * zi, axis=1, keepdims=True)  # [tokens, 1]
    ci = jnp.sum(ur * zi - ui * zr, axis=1, keepdims=True)
    return zr - 2 * (ur * cr - ui * ci), zi - 2 * (ur * ci + ui * cr), cr, ci


def _fwd_kernel(zr_ref, zi_ref, u_ref, th_ref, or_ref, oi_ref):
    ur, ui = u_ref[0:1, :], u_ref[1:2, :]  # [1, h]
    wr, wi, _, _ = _reflect_planes(zr_ref[...], zi_ref[...], ur, ui)  # [block_tokens, h]
    c, s = jnp.cos(th_ref[...]), jnp.sin(th_ref[...])  # [1, h]
    or_ref[...] = c * wr - s * wi
    oi_ref[...] = s * wr + c * wi


def _bwd_kernel(zr_ref, zi_ref, gr_ref, gi_ref, u_ref, th_ref, dzr_ref, dzi_ref, du_ref, dth_ref):
    zr, zi, gr, gi = zr_ref[...], zi_ref[...], gr_ref[...], gi_ref[...]  # [block_tokens, h]
    ur, ui = u_ref[0:1, :], u_ref[1:2, :]  # [1, h]
    c, s = jnp.cos(th_ref[...]), jnp.sin(th_ref[...])  # [1, h]
    wr, wi, cr, ci = _reflect_planes(zr, zi, ur, ui)
    # theta: d out_j / d theta_j = i out_j, so dL/dtheta = Im(G conj(out)).
    dth_ref[...] = jnp.sum(gi * (c * wr - s * wi) - gr * (s * wr + c * wi), axis=0, keepdims=True)
    # Back through the phase: G_w = exp(-i theta) G; through the (Hermitian) reflection: R G_w.
    gwr, gwi = c * gr + s * gi, c * gi - s * gr
    dzr, dzi, dr, di = _reflect_planes(gwr, gwi, ur, ui)
    dzr_ref[...] = dzr
    dzi_ref[...] = dzi
    # u: dL/du = -2 (conj(u^H z) G_w + conj(u^H G_w) z), summed over tokens.
    du_ref[0:1, :] = -2 * jnp.sum(cr * gwr + ci * gwi + dr * zr + di * zi, axis=0, keepdims=True)
    du_ref[1:2, :] = -2 * jnp.sum(cr * gwi - ci * gwr + dr * zi - di * zr, axis=0, keepdims=True)


def _row_spec(tm, h):
    return pl.BlockSpec((tm, h), lambda i: (i, 0))


def _whole_spec(rows, h):
    return pl.BlockSpec((rows, h), lambda i: (0, 0))


def _forward(zr, zi, u, th, plan: _Plan):
    t, h = zr.shape
    tm = plan.block_tokens
    plane = jax.ShapeDtypeStruct((t, h), jnp.float32)
    return pl.pallas_call(
        _fwd_kernel,
        grid=(t // tm,),
        in_specs=[_row_spec(tm, h), _row_spec(tm, h), _whole_spec(2, h), _whole_spec(1, h)],
        out_specs=[_row_spec(tm, h), _row_spec(tm, h)],
        out_shape=[plane, plane],
        compiler_params=dispatch.compiler_params(plan.platform, ("parallel",), [True, True, False, False]),
        cost_estimate=pl.CostEstimate(flops=20 * t * h, transcendentals=2 * h * (t // tm), bytes_accessed=16 * t * h),
        interpret=plan.interpret,
        name="householder_phase_fwd",
    )(zr, zi, u, th)


def _backward(zr, zi, gr, gi, u, th, plan: _Plan):
    t, h = zr.shape
    tm = plan.block_tokens
    plane = jax.ShapeDtypeStruct((t, h), jnp.float32)
    dzr, dzi, du, dth = pl.pallas_call(
        _bwd_kernel,
        grid=(t // tm,),
        in_specs=[_row_spec(tm, h)] * 4 + [_whole_spec(2, h), _whole_spec(1, h)],
        out_specs=[
            _row_spec(tm, h),
            _row_spec(tm, h),
            pl.BlockSpec((None, 2, h), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, 1, h), lambda i: (i, 0, 0)),
        ],
        out_shape=[
            plane,
            plane,
            jax.ShapeDtypeStruct((t // tm, 2, h), jnp.float32),
            jax.ShapeDtypeStruct((t // tm, 1, h), jnp.float32),
        ],
        compiler_params=dispatch.compiler_params(plan.platform, ("parallel",), [True] * 4 + [False] * 2),
        cost_estimate=pl.CostEstimate(flops=60 * t * h, transcendentals=2 * h * (t // tm), bytes_accessed=24 * t * h),
        interpret=plan.interpret,
        name="householder_phase_bwd",
    )(zr, zi, gr, gi, u, th)
    return dzr, dzi, du.sum(0), dth.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _householder_phase(zr, zi, u, th, plan: _Plan):
    """Planes of `exp(i th) (z - 2 u (u^H z))`: zr, zi [tokens, h]; u [2, h] unit; th [1, h]."""
    return _forward(zr, zi, u, th, plan)


def _householder_phase_fwd(zr, zi, u, th, plan):
    return _forward(zr, zi, u, th, plan), (zr, zi, u, th)


def _householder_phase_bwd(plan, residuals, cotangents):
    return _backward(*residuals[:2], *cotangents, *residuals[2:], plan)


_householder_phase.defvjp(_householder_phase_fwd, _householder_phase_bwd)


def _reflect_kernel(z, u, theta, plan: _Plan):
    """exp(i theta) R_u z for complex z [tokens, h], through the Pallas kernel."""
    planes = jnp.stack([u.real, u.imag])  # [2, h]
    out_r, out_i = _householder_phase(z.real, z.imag, planes, theta[None, :], plan)
    return out_r + 1j * out_i


def _plan(tokens, h, block_sizes, platform, interpret) -> _Plan:
    platform = dispatch.resolve_platform(platform)
    bs = block_sizes or BlockSizes.for_platform(platform)
    cap = 16
    while cap * 2 * h <= (1 << 18):  # a [tokens, h] f32 plane of at most 1 MiB
        cap *= 2
    # No matmul here, so no 16-token minimum; TPU tiles keep 8 sublanes.
    smallest = 8 if platform == "tpu" else 1
    return _Plan(dispatch.token_tile(tokens, min(bs.block_tokens, cap), smallest), platform, interpret)


def _apply(x, theta, v, perm, transpose, impl, interpret, block_sizes, platform):
    h = validate(x.shape, theta.shape, v.shape, np.shape(perm))
    if not dispatch.use_pallas(impl, auto_platforms=("tpu",)):
        return unitary_reference(x, theta, v, perm, transpose=transpose)
    t = x.shape[0]
    plan = _plan(t, h, block_sizes, platform, interpret)
    if plan.platform == "gpu" and not interpret and not dispatch.is_power_of_two(h):
        raise ValueError(f"{h=} (d/2) must be a power of two for the Triton kernel; use impl='xla'")
    padded = -(-t // plan.block_tokens) * plan.block_tokens
    xp = jnp.pad(x, ((0, padded - t), (0, 0))) if padded != t else x
    u1, u2 = _unit(v[0]), _unit(v[1])
    ph = jnp.exp(1j * theta)  # [3, h]
    zero = jnp.zeros_like(theta[0])
    z = _pair(xp)
    if transpose:  # R2 D3^H = D3^H R_{D3 u2}
        z = _fft(_reflect_kernel(z, ph[2] * u2, -theta[2], plan))
        z = _fft(_reflect_kernel((z * jnp.conj(ph[1]))[:, jnp.argsort(perm)], u1, zero, plan), inverse=True)
        z = z * jnp.conj(ph[0])
    else:
        z = _fft(z * ph[0])
        z = _fft(_reflect_kernel(z, u1, zero, plan)[:, perm] * ph[1], inverse=True)
        z = _reflect_kernel(z, u2, theta[2], plan)
    return _unpair(z, x.dtype)[:t]


def unitary_apply(
    x: jax.Array,
    theta: jax.Array,
    v: jax.Array,
    perm: jax.Array,
    *,
    impl: dispatch.Impl = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    platform: str | None = None,
) -> jax.Array:
    """`U x` for each token (row) of x: an exactly orthogonal map of the d features.

    x: [tokens, d] (f32 or bf16; computed in complex64). theta: [3, d/2] phases of D1, D2, D3.
    v: [2, 2, d/2] the reflections' vectors (R1, R2) as (real, imaginary) parts, normalised here.
    perm: [d/2] integer permutation Pi. impl / interpret / platform: as in `butterfly_apply`,
    except that "auto" picks Pallas on TPU only: on an H100 the kernel (Triton, plus the
    real/imaginary split XLA cannot fuse into it) measured 1.45x slower than XLA's fusions.
    Differentiable in x, theta and v.
    """
    return _apply(x, theta, v, perm, False, impl, interpret, block_sizes, platform)


def unitary_apply_transposed(
    x: jax.Array,
    theta: jax.Array,
    v: jax.Array,
    perm: jax.Array,
    *,
    impl: dispatch.Impl = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    platform: str | None = None,
) -> jax.Array:
    """`U^T x` = `U^H x`, the inverse of `unitary_apply`; same arguments."""
    return _apply(x, theta, v, perm, True, impl, interpret, block_sizes, platform)
