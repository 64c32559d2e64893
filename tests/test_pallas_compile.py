"""Every Pallas kernel compiles for a TPU topology on this CPU host (libtpu, no TPU), and lowers for
CUDA (Triton) without a GPU: ours, and the flash attention the model picks on each."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyjax import model
from hyjax.sharding import Layout, Rules, activation_sharding
from pallas_kernels import butterfly as bf
from pallas_kernels import unitary as un
from pallas_kernels.dispatch import compile_for

D, B, M, TOKENS = 512, 8, 3, 512
PERM = np.random.default_rng(0).permutation(D // 2)


def _all_kernels(platform):
    """Forward and backward of both ops, both orientations, in one function of (x, blocks, theta, v)."""

    def loss(x, blocks, theta, v):
        y = bf.butterfly_apply(x, blocks, impl="pallas", platform=platform)
        y = bf.butterfly_apply_transposed(y, blocks, impl="pallas", platform=platform)
        y = un.unitary_apply(y, theta, v, PERM, impl="pallas", platform=platform)
        y = un.unitary_apply_transposed(y, theta, v, PERM, impl="pallas", platform=platform)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def _shapes(dtype, mesh=None):
    def spec(shape, dt, part):
        sharding = NamedSharding(mesh, part) if mesh is not None else None
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    return (
        spec((TOKENS * (4 if mesh else 1), D), dtype, P("data")),
        spec((M, D // B, B, B), jnp.float32, P()),
        spec((3, D // 2), jnp.float32, P()),
        spec((2, 2, D // 2), jnp.float32, P()),
    )


@pytest.fixture(scope="module")
def tpu_mesh():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    return topologies.make_mesh(topology, (4,), ("data",))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float32, marks=pytest.mark.slow)])
def test_kernels_compile_for_tpu_topology(tpu_mesh, dtype):
    step = jax.shard_map(
        _all_kernels("tpu"),
        mesh=tpu_mesh,
        in_specs=(P("data"), P(), P(), P()),
        out_specs=(P(), (P("data"), P(), P(), P())),
        check_vma=False,
    )
    compiled = jax.jit(step).lower(*_shapes(dtype, tpu_mesh)).compile()
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") >= 8  # 2 ops x 2 orientations x (forward + backward) kernels


def test_kernels_lower_for_cuda():
    lowered = jax.jit(_all_kernels("gpu")).trace(*_shapes(jnp.bfloat16)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") >= 8


def _model_loss(seq: int):
    """A small model's loss with flash attention (attention="auto"), and abstract (params, tokens, segments)."""
    config = model.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                           num_kv_heads=2, dtype="bfloat16")

    def loss(params, tokens, segments):
        logits = model.apply(config, params, tokens, segment_ids=segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    arrays = (model.abstract_params(config), jax.ShapeDtypeStruct((8, seq), jnp.int32),
              jax.ShapeDtypeStruct((8, seq), jnp.int32))
    return jax.value_and_grad(loss), arrays


def test_model_attention_compiles_to_splash_for_tpu(tpu_mesh):
    """Traced for TPU, the model's attention is the splash kernel on each device's rows (forward, dq and
    dkv kernels) and no `[seq, seq]` array is left in the program."""
    seq = 384
    step, arrays = _model_loss(seq)
    layout = Layout(tpu_mesh, Rules())
    with compile_for("tpu"), activation_sharding(layout):
        compiled = jax.jit(step).lower(*arrays).compile()
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") >= 3
    assert f"{seq},{seq}]" not in hlo


def test_model_attention_lowers_to_triton_for_cuda():
    seq = 384
    step, arrays = _model_loss(seq)
    with compile_for("gpu"):
        text = jax.jit(step).trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3
    assert f"{seq}x{seq}x" not in text
