"""The zeroth-order half of the ZO + FO hybrid: the SPSA estimate against true directional derivatives,
its expectation against the gradient, the update along the regenerated direction, the split of the
base weights out of the frozen tree, and the compiled memory of the step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax import adapters as A
from hyjax import model as M
from hyjax.training.step import TrainState, make_train_step
from hyjax.optim.zeroth_order import (ZerothOrder, join_base, perturbed, projected_gradients, spsa_update,
                                     zeroth_order_step)

TINY = M.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def _loss(params):
    logits = M.apply(TINY, params, TOKENS[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], axis=-1))


@pytest.fixture(scope="module")
def params():
    return M.init_params(TINY, jax.random.key(1))


def _direction(params, key, i):
    """Direction i exactly as the SPSA code draws it (perturbing zeros by 1)."""
    return perturbed(jax.tree.map(jnp.zeros_like, params), key, i, 1.0)


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_estimate_is_the_directional_derivative_along_its_direction(params):
    key = jax.random.key(7)
    g, plus, minus, _ = jax.jit(lambda p: projected_gradients(_loss, p, key, 1e-3, 8))(params)
    grad = jax.grad(_loss)(params)
    exact = np.asarray(jax.jit(jax.vmap(lambda i: _dot(grad, _direction(params, key, i))))(jnp.arange(8)))
    assert np.median(np.abs(exact)) > 0.1  # directions along which the loss really changes
    np.testing.assert_allclose(np.asarray(g), exact, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose((np.asarray(plus) - np.asarray(minus)) / 2e-3, np.asarray(g), rtol=1e-6)


def test_the_expectation_of_the_estimate_is_the_gradient(params):
    """E[g (z . u)] = grad . u for a unit vector u: along the gradient (|grad|) and across it (0)."""
    n = 4000
    key = jax.random.key(3)
    g, _, _, _ = jax.jit(lambda p: projected_gradients(_loss, p, key, 1e-3, n))(params)
    grad = jax.grad(_loss)(params)
    norm = float(jnp.sqrt(_dot(grad, grad)))
    along = jax.tree.map(lambda x: x / norm, grad)
    across = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape), grad)
    shift = _dot(across, along)
    across = jax.tree.map(lambda x, a: x - shift * a, across, along)
    across = jax.tree.map(lambda x: x / jnp.sqrt(_dot(across, across)), across)
    projections = jax.jit(jax.vmap(lambda i: jnp.stack([_dot(_direction(params, key, i), u) for u in (along, across)])))
    samples = np.asarray(g)[:, None] * np.asarray(projections(jnp.arange(n)))  # [n, 2]
    mean, error = samples.mean(0), samples.std(0) / np.sqrt(n)
    print(f"E[g (z . u)] over {n} directions: along the gradient {mean[0]:.4f} +- {error[0]:.4f} (|grad| {norm:.4f}), "
          f"across it {mean[1]:.4f} +- {error[1]:.4f} (0)")
    assert abs(mean[0] - norm) < 4 * error[0] and error[0] < 0.05 * norm, (mean, error, norm)
    assert abs(mean[1]) < 4 * error[1], (mean, error)


def test_the_update_follows_the_regenerated_directions(params):
    key = jax.random.key(5)
    g = jnp.asarray([2.0, -1.0, jnp.nan])  # a non-finite estimate is skipped
    updated = jax.jit(lambda p: spsa_update(p, key, g, 0.1, weight_decay=0.5))(params)
    expected = jax.tree.map(lambda w, z0, z1: w * (1 - 0.1 * 0.5) - 0.1 * (2.0 * z0 - 1.0 * z1) / 3,
                            params, _direction(params, key, 0), _direction(params, key, 1))
    for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _zeroth_order(targets=(".*",), directions=1):
    return ZerothOrder(targets=targets, mu=1e-3, directions=directions, schedule=optax.constant_schedule(1e-6))


@pytest.mark.parametrize("broken", ["none", "first_order", "spsa"])
def test_a_skipped_step_changes_no_weight(params, broken):
    """When the adapters' gradient (the optimizer skips) or an SPSA estimate is not finite, the step is
    skipped: base weights (weight decay included), adapters and optimizer state stay bitwise as they were."""
    trainable = {"a": jnp.ones((3,))}
    optimizer = optax.apply_if_finite(optax.adam(0.1), 10)
    zeroth_order = ZerothOrder(targets=(".*",), mu=1e-3, directions=2, schedule=optax.constant_schedule(1e-2),
                               weight_decay=0.1)
    base, rest = zeroth_order.split(params)
    state = TrainState.create(trainable, optimizer, 0, base=base)

    def first_order(state, frozen, batch, key):
        grads = {"a": jnp.full((3,), jnp.nan if broken == "first_order" else 1.0)}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        return (state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                              opt_state=opt_state),
                {"skipped": jnp.logical_not(opt_state.last_finite).astype(jnp.int32)})

    def batch_loss(trainable, frozen, opt_state, batch, key):
        loss = _loss(frozen)
        return jnp.nan * loss if broken == "spsa" else loss

    step = jax.jit(zeroth_order_step(first_order, batch_loss, zeroth_order))
    before = jax.device_get(state)
    after, metrics = jax.device_get(step(state, rest, {}, jax.random.key(0)))
    assert int(metrics["skipped"]) == (broken != "none") and int(after.step) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves((after.base, after.trainable)),
                                                         jax.tree.leaves((before.base, before.trainable)))]
    if broken == "none":
        assert all(changed)
    else:
        assert not any(changed)
        for a, b in zip(jax.tree.leaves(after.opt_state.inner_state), jax.tree.leaves(before.opt_state.inner_state)):
            np.testing.assert_array_equal(a, b)


def test_split_takes_the_base_weights_out_and_join_puts_them_back(params):
    adapted = A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=2), "layers/attn/q_proj"), params, jax.random.key(0))
    _, frozen = A.split_trainable(adapted)
    base, rest = _zeroth_order(("layers/attn/.*", "embed")).split(frozen)
    assert sorted(base) == ["embed", "layers"] and sorted(base["layers"]["attn"]) == ["k_proj", "o_proj", "q_proj",
                                                                                     "v_proj"]
    assert rest["layers"]["attn"]["q_proj"].base is None and rest["layers"]["attn"]["k_proj"] is None
    assert rest["layers"]["mlp"]["up_proj"] is frozen["layers"]["mlp"]["up_proj"]  # not a target: stays frozen
    joined = join_base(base, rest)
    assert jax.tree.structure(joined) == jax.tree.structure(frozen)
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(frozen)):
        assert a is b
    with pytest.raises(ValueError, match="match no frozen weight"):
        _zeroth_order(("nothing/.*",)).split(frozen)


def _step_temporaries(num_layers: int, zeroth_order) -> tuple[int, int]:
    """(compiled temporary bytes of one LoRA training step, bytes of the model's weights)."""
    config = M.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=num_layers,
                           num_heads=4, num_kv_heads=2)
    params = M.abstract_params(config)
    adapted = jax.eval_shape(lambda p: A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=4)), p, jax.random.key(0)),
                             params)
    trainable, frozen = A.split_trainable(adapted)
    optimizer = optax.apply_if_finite(optax.adamw(1e-3), 10)
    base = None
    if zeroth_order is not None:
        base, frozen = zeroth_order.split(frozen)
    state = jax.eval_shape(lambda t, b: TrainState.create(t, optimizer, 0, b), trainable, base)
    batch = {key: jax.ShapeDtypeStruct((1, 2, 16), jnp.int32) for key in ("tokens", "targets", "segment_ids",
                                                                         "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((1, 2, 16), jnp.bool_)
    step = make_train_step(config, optimizer, optax.constant_schedule(1e-3), None, zeroth_order)
    memory = jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile().memory_analysis()
    return memory.temp_size_in_bytes, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


@pytest.mark.parametrize("directions", [1, 3])
def test_the_zeroth_order_part_costs_one_copy_of_the_weights(directions):
    """Compiled temporaries of the ZO + FO step minus those of the same LoRA step, as the model grows
    from 4 to 16 layers: one working copy of the weights (plus one layer's random numbers), whatever
    the number of directions; never the two or three copies of storing or re-drawing directions."""
    extra = {}
    for layers in (4, 16):
        zo, weights = _step_temporaries(layers, _zeroth_order(directions=directions))
        lora, _ = _step_temporaries(layers, None)
        extra[layers] = (zo - lora, weights)
    growth = (extra[16][0] - extra[4][0]) / (extra[16][1] - extra[4][1])
    print(f"{directions} direction(s): ZO temporaries beyond LoRA's {extra[4][0] / 2**20:.2f} / {extra[16][0] / 2**20:.2f} "
          f"MiB for weights of {extra[4][1] / 2**20:.2f} / {extra[16][1] / 2**20:.2f} MiB (4 / 16 layers): "
          f"{growth:.3f} copies per added weight byte")
    assert 0.9 < growth < 1.1, extra
    assert extra[16][0] < 1.2 * extra[16][1], extra
