"""BOFT's butterfly rotation applied to activations: a Pallas kernel beside its pure-JAX reference.

The operator (Hugging Face PEFT, `tuners/boft/layer.py`). For `d` input features, block size `b`
and `m` factors, factor `i` (0-based) is `M_i = P_i @ block_diag(B_i[0], ..., B_i[d/b - 1]) @ P_i^T`
with `P_i[j, perm_i[j]] = 1` for PEFT's `block_butterfly_perm` (see `butterfly_perm`). PEFT builds
`R = M_{m-1} @ ... @ M_1 @ M_0` and feeds the linear layer `x @ R` for row-vector tokens `x`, so
the weight sees `W (R^T x)` in column-vector terms. `butterfly_apply(x, blocks)` returns exactly
`x @ R` and `butterfly_apply_transposed(x, blocks)` returns `x @ R^T` (the inverse, as R is
orthogonal). One factor on activations is a gather, a batched b x b matmul and a scatter:
`x @ M_i = ((x[:, inv(perm_i)]).reshape(t, d/b, b) @ B_i)[:, perm_i]`.

What the kernel exploits. In the features' own order, factor i pairs the two r = b/2 sized groups
that lie b * 2**(i-1) apart inside aligned chunks of b * 2**i features (factor 0: contiguous b
blocks). So every factor, and R, is block diagonal with s x s "super-blocks", s = b * 2**(m-1):
the butterfly never leaves an aligned window of s features. The kernel tiles the features in
lane-dense tiles of `block_d` (a multiple of s) and places each factor's b x b block entries at
their permuted positions in a `block_d` x `block_d` tile matrix: the permutations become index
arithmetic on the parameters (`superblocks`, a gather of m * d * s entries), and the activations
are never permuted. Each program applies the m tile matrices one after another to a tile of
tokens held on chip: one read and one write of the activations for all m factors, on the MXU /
tensor cores, at `block_d / b` times the bare blocks' FLOPs (matmul units 128 wide would pad a b x b
block to their width anyway; the kernel stays memory-bound for block_d <= ~256 in bf16).

XLA's path (CPU, and wherever impl="xla") uses the same windows without tiles: the m super-block
factors multiplied into one s x s matrix per window, one batched matmul over the windows of the
activations (`butterfly_windowed`), while that costs at most twice the m factors' FLOPs.

The backward pass is a second kernel: per (feature tile, chunk of tokens) it recomputes the m
intermediate activations, sweeps back through the factors for the activation gradient, and
accumulates each tile matrix's gradient over the chunk; XLA sums the chunks and the parameter
gather's transpose maps tile gradients back to the b x b blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Kernel tiling.

    block_tokens: tokens per forward program and per step of the backward loop.
    block_d: feature tile width (a power of two, a multiple of the super-block size and, on TPU, of
        128 lanes, where d allows; else all of d); the tile matrices are block_d x block_d.
    bwd_block_tokens: tokens per backward program; its tile-matrix gradient is one partial sum.
    """

    block_tokens: int
    block_d: int
    bwd_block_tokens: int

    @classmethod
    def for_platform(cls, platform: str) -> BlockSizes:
        """Defaults: TPU tiles fill the 128x128 (v5e) / 256x256 (v6e) MXU; GPU tiles fit Triton's
        shared memory (the m tile matrices of a program stay resident) and were the fastest of
        block_tokens in {32, 64, 128} x block_d in {64, 128} on an H100 (bench/results)."""
        if platform == "gpu":
            return cls(block_tokens=128, block_d=64, bwd_block_tokens=512)
        return cls(block_tokens=256, block_d=256, bwd_block_tokens=2048)


def butterfly_perm(d: int, block_size: int, factor: int) -> np.ndarray:
    """PEFT's `block_butterfly_perm(d, d // block_size // 2**factor, block_size // 2)` as a reshape.

    Chunks of block_size * 2**factor features hold 2**(factor+1) groups of block_size / 2; the
    permutation lists the even groups, then the odd ones. Factor 0 is the identity.
    """
    if factor == 0:
        return np.arange(d)
    r = block_size // 2
    return np.arange(d).reshape(-1, 2**factor, 2, r).transpose(0, 2, 1, 3).reshape(d)


def validate(x_shape: tuple[int, ...], blocks_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Checks `x: [tokens, d]` against `blocks: [m, d / b, b, b]`; returns (m, b, d)."""
    if len(x_shape) != 2:
        raise ValueError(f"x must be [tokens, d], got {x_shape=}")
    if len(blocks_shape) != 4 or blocks_shape[2] != blocks_shape[3]:
        raise ValueError(f"blocks must be [m, n_blocks, b, b], got {blocks_shape=}")
    d = x_shape[1]
    n_factors, n_blocks, block_size, _ = blocks_shape
    if d % block_size:
        raise ValueError(f"{block_size=} must divide {d=}")
    if n_blocks * block_size != d:
        raise ValueError(f"{n_blocks=} * {block_size=} must equal {d=}")
    if n_factors > 1:
        if block_size % 2:
            raise ValueError(f"{block_size=} must be even when {n_factors=} > 1")
        if d % (block_size * 2 ** (n_factors - 1)):
            raise ValueError(f"{block_size=} * 2**({n_factors=} - 1) must divide {d=}")
    return n_factors, block_size, d


# ---------------------------------------------------------------- pure-JAX reference (PEFT's way)


def butterfly_reference(x: jax.Array, blocks: jax.Array, *, transpose: bool = False) -> jax.Array:
    """`x @ R` (or `x @ R^T`) factor by factor: permute (a reshape), batched block matmul, unpermute.

    x: [tokens, d]; blocks: [m, d / b, b, b] orthogonal (already Cayley-transformed).
    """
    m, b, d = validate(x.shape, blocks.shape)
    t, r = x.shape[0], b // 2
    order = range(m) if transpose else reversed(range(m))
    for i in order:
        blk = blocks[i].astype(x.dtype)
        if transpose:
            blk = jnp.swapaxes(blk, -1, -2)
        if i:  # x[:, argsort(perm_i)]: [tokens, chunks, 2, 2**i, r] -> [tokens, chunks, 2**i, 2, r]
            x = x.reshape(t, -1, 2, 2**i, r).swapaxes(2, 3)
        grouped = x.reshape(t, d // b, b)  # [tokens, n_blocks, b]
        x = jnp.einsum("tnb,nbc->tnc", grouped, blk)
        if i:  # [:, perm_i], the inverse reshape
            x = x.reshape(t, -1, 2**i, 2, r).swapaxes(2, 3)
        x = x.reshape(t, d)
    return x


# ------------------------------------------------------------ super-blocks: the factors in place


def superblock_size(n_factors: int, block_size: int) -> int:
    """Width s = b * 2**(m-1) of the aligned feature windows that all m factors stay within."""
    return block_size * 2 ** (n_factors - 1)


@functools.lru_cache(maxsize=64)
def _superblock_index(d: int, block_size: int, n_factors: int) -> np.ndarray:
    """Flat index into `[blocks.ravel(), 0]` for every super-block entry: [m, d / s, s, s] int32.

    Entry (i, w, a, c) is factor i's `block_diag(B_i)[perm_i[a], perm_i[c]]` for the features a, c
    of window w (x @ M_i = x[:, inv(perm_i)] @ block_diag(B_i) [:, perm_i]): a block entry when
    both land in the same block, else the trailing zero.
    """
    s = superblock_size(n_factors, block_size)
    n_blocks = d // block_size
    zero = n_factors * n_blocks * block_size**2
    index = []
    for i in range(n_factors):
        perm = butterfly_perm(d, block_size, i).reshape(d // s, s)  # [windows, s]
        pa, pc = perm[:, :, None], perm[:, None, :]
        blk = pa // block_size
        same = blk == (pc // block_size)  # [windows, s, s]
        if not np.all(same.sum(-1) == block_size):
            raise AssertionError(f"factor {i} leaves its {s=} windows for {d=}, {block_size=}")
        flat = ((i * n_blocks + blk) * block_size + pa % block_size) * block_size + pc % block_size
        index.append(np.where(same, flat, zero))
    return np.stack(index).astype(np.int32)


def superblocks(blocks: jax.Array, d: int, *, transpose: bool = False) -> jax.Array:
    """The m factors as block-diagonal [m, d / s, s, s] in the features' own order, application order.

    `x @ R` applies factor m-1 first; `x @ R^T` applies factor 0 first with each block transposed.
    A single gather with constant indices: the permutations are index arithmetic on parameters.
    """
    m, _, b, _ = blocks.shape
    flat = jnp.concatenate([blocks.reshape(-1), jnp.zeros((1,), blocks.dtype)])
    sup = flat[_superblock_index(d, b, m)]
    if transpose:
        return jnp.swapaxes(sup, -1, -2)
    return sup[::-1]


def window_rotations(blocks: jax.Array, d: int, *, transpose: bool = False) -> jax.Array:
    """R (or R^T) as its d / s diagonal s x s windows, [d / s, s, s]: the product of the m super-block
    factors in application order, `x @ R = concat_w(x_w @ window_w)` for the s-feature windows x_w."""
    sup = superblocks(blocks, d, transpose=transpose)
    windows = sup[0]
    for factor in sup[1:]:
        windows = windows @ factor
    return windows


def windows_are_cheaper(n_factors: int, block_size: int) -> bool:
    """Whether one matmul over s = b * 2**(m-1) wide windows costs at most twice the FLOPs of m
    b-wide factors (s <= 2 * m * b: m <= 4). Its saving is memory traffic: one pass over the
    activations instead of m, and none of the factors' permutation copies (each a strided transpose
    of b/2-feature runs), in the backward pass as well."""
    return superblock_size(n_factors, block_size) <= 2 * n_factors * block_size


def butterfly_windowed(x: jax.Array, blocks: jax.Array, *, transpose: bool = False) -> jax.Array:
    """`x @ R` (or `x @ R^T`) as one batched matmul of the s-feature windows of x with `window_rotations`
    (built in float32 from the parameters, then cast to x's dtype once). XLA's path where
    `windows_are_cheaper`; equal to `butterfly_reference` up to rounding."""
    _, _, d = validate(x.shape, blocks.shape)
    windows = window_rotations(blocks.astype(jnp.float32), d, transpose=transpose).astype(x.dtype)
    t, s = x.shape[0], windows.shape[-1]
    return jnp.einsum("tws,wsc->twc", x.reshape(t, d // s, s), windows).reshape(t, d)


def tile_matrices(sup: jax.Array, block_d: int) -> jax.Array:
    """[m, d / s, s, s] super-blocks -> [d / block_d, m, block_d, block_d] block-diagonal tiles."""
    m, windows, s, _ = sup.shape
    per_tile = block_d // s
    sup = sup.reshape(m, windows // per_tile, per_tile, s, s)
    eye = jnp.eye(per_tile, dtype=sup.dtype)
    tiles = jnp.einsum("mjnab,nk->jmnakb", sup, eye)  # [tiles, m, per_tile, s, per_tile, s]
    return tiles.reshape(windows // per_tile, m, block_d, block_d)


# ------------------------------------------------------------------------------- Pallas kernels


@dataclasses.dataclass(frozen=True)
class _Plan:
    block_tokens: int
    block_d: int
    bwd_block_tokens: int
    platform: str
    interpret: bool


def _dot(a, b, contract, upcast):
    """f32-accumulating matmul; `upcast` widens bf16 operands first (exact: XLA:CPU, which runs
    interpret mode, has no bf16 x bf16 -> f32 dot)."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _fwd_kernel(x_ref, a_ref, o_ref, *, upcast):
    h = x_ref[...]  # [block_tokens, block_d]
    for k in range(a_ref.shape[0]):
        a = a_ref[k].astype(x_ref.dtype)  # [block_d, block_d]
        h = _dot(h.astype(x_ref.dtype), a, ((1,), (0,)), upcast)  # [block_tokens, block_d] f32
    o_ref[...] = h.astype(o_ref.dtype)


def _bwd_kernel(x_ref, g_ref, a_ref, dx_ref, da_ref, *, block_tokens, upcast):
    dot = functools.partial(_dot, upcast=upcast)
    m = a_ref.shape[0]
    dtype = x_ref.dtype
    for k in range(m):  # per factor: Triton needs power-of-two arrays, and m need not be one
        da_ref[k] = jnp.zeros(da_ref.shape[1:], da_ref.dtype)  # [block_d, block_d]

    def step(i, carry):
        rows = pl.ds(pl.multiple_of(i * block_tokens, block_tokens), block_tokens)
        hs = [x_ref[rows, :]]  # inputs of each factor, [block_tokens, block_d]
        for k in range(m - 1):
            hs.append(dot(hs[-1], a_ref[k].astype(dtype), ((1,), (0,))).astype(dtype))
        g = g_ref[rows, :].astype(jnp.float32)  # [block_tokens, block_d]
        for k in reversed(range(m)):
            gk = g.astype(dtype)
            da_ref[k] = da_ref[k] + dot(hs[k], gk, ((0,), (0,)))  # [block_d, block_d]
            g = dot(gk, a_ref[k].astype(dtype), ((1,), (1,)))  # g @ A_k^T
        dx_ref[rows, :] = g.astype(dx_ref.dtype)
        return carry

    lax.fori_loop(0, x_ref.shape[0] // block_tokens, step, 0)


def _forward(x, tiles, plan: _Plan):
    t, d = x.shape
    n_tiles, m, bd, _ = tiles.shape
    tm = plan.block_tokens
    return pl.pallas_call(
        functools.partial(_fwd_kernel, upcast=plan.interpret),
        grid=(n_tiles, t // tm),
        in_specs=[
            pl.BlockSpec((tm, bd), lambda j, i: (i, j)),
            pl.BlockSpec((None, m, bd, bd), lambda j, i: (j, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((tm, bd), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=dispatch.compiler_params(plan.platform, ("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(
            flops=2 * t * d * bd * m,
            transcendentals=0,
            bytes_accessed=2 * x.size * x.dtype.itemsize + tiles.size * tiles.dtype.itemsize,
        ),
        interpret=plan.interpret,
        name="butterfly_fwd",
    )(x, tiles)


def _backward(x, g, tiles, plan: _Plan):
    t, d = x.shape
    n_tiles, m, bd, _ = tiles.shape
    tc = plan.bwd_block_tokens
    dx, da = pl.pallas_call(
        functools.partial(_bwd_kernel, block_tokens=plan.block_tokens, upcast=plan.interpret),
        grid=(n_tiles, t // tc),
        in_specs=[
            pl.BlockSpec((tc, bd), lambda j, c: (c, j)),
            pl.BlockSpec((tc, bd), lambda j, c: (c, j)),
            pl.BlockSpec((None, m, bd, bd), lambda j, c: (j, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((tc, bd), lambda j, c: (c, j)),
            pl.BlockSpec((None, None, m, bd, bd), lambda j, c: (c, j, 0, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((t // tc, n_tiles, m, bd, bd), jnp.float32),
        ],
        compiler_params=dispatch.compiler_params(plan.platform, ("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(
            flops=2 * t * d * bd * (3 * m - 1),
            transcendentals=0,
            bytes_accessed=3 * x.size * x.dtype.itemsize + (t // tc + 1) * tiles.size * 4,
        ),
        interpret=plan.interpret,
        name="butterfly_bwd",
    )(x, g, tiles)
    return dx, da.sum(0).astype(tiles.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tiled_apply(x, tiles, plan: _Plan):
    return _forward(x, tiles, plan)


def _tiled_apply_fwd(x, tiles, plan):
    return _forward(x, tiles, plan), (x, tiles)


def _tiled_apply_bwd(plan, residuals, g):
    x, tiles = residuals
    return _backward(x, g, tiles, plan)


_tiled_apply.defvjp(_tiled_apply_fwd, _tiled_apply_bwd)


def _plan(tokens, d, s, block_sizes, platform, interpret) -> _Plan:
    platform = dispatch.resolve_platform(platform)
    bs = block_sizes or BlockSizes.for_platform(platform)
    block_d = dispatch.largest_lane_tile(d, s, max(bs.block_d, s), platform)
    if block_d % s:
        raise ValueError(f"super-block size {s=} must divide {block_d=} (the feature tile, {d=})")
    tm = dispatch.token_tile(tokens, bs.block_tokens)
    steps = max(1, min(bs.bwd_block_tokens // tm, -(-tokens // tm)))
    return _Plan(tm, block_d, tm * steps, platform, interpret)


def _triton_problem(plan: _Plan, n_factors: int) -> str | None:
    """Why Triton cannot run this plan, if it cannot. A program keeps its m f32 tile matrices in
    shared memory: on an H100, 64 KiB of them compiled (m=1 at 128, m=4 at 64), 128 KiB did not."""
    if plan.platform != "gpu" or plan.interpret:
        return None
    if not dispatch.is_power_of_two(plan.block_d):
        return f"block_d={plan.block_d} (all of d) is not a power of two, as Triton blocks must be"
    tile_bytes = n_factors * plan.block_d**2 * 4
    if tile_bytes > 64 * 1024:
        return f"{n_factors=} tile matrices of block_d={plan.block_d} ({tile_bytes=}) overflow Triton's shared memory"
    return None


def _apply(x, blocks, transpose, impl, interpret, block_sizes, platform):
    m, b, d = validate(x.shape, blocks.shape)
    t = x.shape[0]
    plan = None
    if dispatch.use_pallas(impl):
        plan = _plan(t, d, superblock_size(m, b), block_sizes, platform, interpret)
        problem = _triton_problem(plan, m)
        if problem and impl == "pallas":
            raise ValueError(f"{problem}; use impl='xla' for {d=}, {b=}, {m=}")
        if problem:
            plan = None
    if plan is None:
        xla = butterfly_windowed if windows_are_cheaper(m, b) else butterfly_reference
        return xla(x, blocks, transpose=transpose)
    sup = superblocks(blocks, d, transpose=transpose)
    padded = -(-t // plan.bwd_block_tokens) * plan.bwd_block_tokens
    xp = jnp.pad(x, ((0, padded - t), (0, 0))) if padded != t else x
    return _tiled_apply(xp, tile_matrices(sup, plan.block_d), plan)[:t]


def butterfly_apply(
    x: jax.Array,
    blocks: jax.Array,
    *,
    impl: dispatch.Impl = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    platform: str | None = None,
) -> jax.Array:
    """`x @ R` with PEFT's BOFT rotation R built from `blocks` (see the module docstring).

    x: [tokens, d] (f32 or bf16). blocks: [m, d / b, b, b] orthogonal b x b blocks, PEFT's
    `boft_R` after the Cayley transform. impl: "pallas" runs the kernel (interpret=True runs it on
    CPU), "xla" pure JAX (`butterfly_windowed` for m <= 4, else `butterfly_reference`), "auto"
    Pallas on TPU/GPU (on GPU only where the tiles fit Triton: block_d a power of two,
    m * block_d**2 * 4 bytes <= 64 KiB) and XLA on CPU. platform: the Pallas backend
    to tune and lower for ("tpu" or "gpu"; default: the default backend, CPU meaning TPU).
    Differentiable in x and blocks.
    """
    return _apply(x, blocks, False, impl, interpret, block_sizes, platform)


def butterfly_apply_transposed(
    x: jax.Array,
    blocks: jax.Array,
    *,
    impl: dispatch.Impl = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    platform: str | None = None,
) -> jax.Array:
    """`x @ R^T`, the inverse of `butterfly_apply` (R is orthogonal); same arguments."""
    return _apply(x, blocks, True, impl, interpret, block_sizes, platform)
