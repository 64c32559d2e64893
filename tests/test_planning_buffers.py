"""`hyjax.planning.buffers`: the largest arrays of a compiled step, with TPU tile padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hyjax.planning.buffers import largest_buffers
from hyjax.planning.hlo import padded_bytes


@pytest.mark.parametrize("dtype, shape, layout, expected", [
    # BOFT blocks [..., 16, 16] in float32: the minor 16 pads to 128 lanes, 8x the elements.
    ("f32", (126, 2, 3328, 16, 16), "3,4,2,1,0:T(8,128)", 126 * 2 * 3328 * 16 * 128 * 4),
    # The same blocks stored flat, 256 entries in the minor axis: no padding.
    ("f32", (126, 2, 3328, 256), "3,2,1,0:T(8,128)", 126 * 2 * 3328 * 256 * 4),
    # bfloat16 packs two rows per 32-bit sublane: 16-row tiles; 3 rows pad to 16, 100 lanes to 128.
    ("bf16", (3, 100), "1,0:T(8,128)(2,1)", 16 * 128 * 2),
    # Minor-to-major {0,2,1}: dimension 0 is minor (2048 lanes), dimension 2 the second-minor (32 rows).
    ("bf16", (2048, 512, 32), "0,2,1:T(8,128)(2,1)", 2048 * 512 * 32 * 2),
    # No tiling (CPU): the elements alone.
    ("f32", (5, 3), "1,0", 60),
])
def test_padded_bytes_round_the_tiled_dimensions_up(dtype, shape, layout, expected):
    assert padded_bytes(dtype, shape, layout) == expected


def test_largest_buffers_of_a_compiled_program_name_the_operation_and_the_argument_alike():
    def step(w, x):
        hidden = jnp.tanh(x @ w)  # [512, 256] float32: the largest array computed
        return jnp.sum(hidden), jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)

    w, x = jnp.ones((128, 256)), jnp.ones((512, 128))
    text = jax.jit(step).lower(w, x).compile().as_text()
    buffers = largest_buffers(text, count=6, arguments={(128, 256): "w"})
    assert [b.bytes for b in buffers] == sorted((b.bytes for b in buffers), reverse=True)
    assert all(b.shape == (512, 256) and b.bytes == b.unpadded_bytes == 512 * 256 * 4 for b in buffers[:5])
    assert {"jit(step)/dot_general", "jit(step)/tanh"} <= {b.source for b in buffers[:5]}
    gradient = buffers[5]  # w's gradient: the shape of the argument w
    assert gradient.shape == (128, 256) and gradient.like == "w" and "transpose(jvp())" in gradient.source
