"""Unitary adapter (uRNN) and its full-capacity variant: identity at init, exact orthogonality before and
after training with the unit-norm projection / Cayley steps, merge and unmerge, XLA vs Pallas, counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax import adapters as A
from hyjax import model as M
from hyjax.adapters.unitary import UnitaryWeight, UnitVectors, fixed_permutation
from hyjax.adapters.unitary_full import Orthogonal, UnitaryFullWeight
from hyjax.optim.stiefel import cayley_retraction, cayley_step, with_orthogonal
from hyjax.optim.unit_norm import project_unit_norm, unit_norm_projection

TINY = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=4)  # weights of 3 shapes: [32, 32], [32, 48], [48, 32]


@pytest.fixture(scope="module")
def tiny():
    """(params, tokens, adapted): the tiny model with every projection adapted, built once."""
    params = M.init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY.vocab_size)
    adapted = A.apply(A.AdapterSpec.for_method(A.UnitaryConfig()), params, jax.random.key(2))
    return params, tokens, adapted


def _logits(params, tokens):
    return jax.jit(M.apply, static_argnums=0)(TINY, params, tokens)


def _node(d_in=64, d_out=24, seed=0, **config) -> UnitaryWeight:
    base = jax.random.normal(jax.random.key(seed), (d_in, d_out), jnp.float32) / np.sqrt(d_in)
    return A.UnitaryConfig(**config).init(base, jax.random.key(seed + 1))


def _x(t, d, seed=7):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(t, d)), jnp.float32)


# ------------------------------------------------------------------------------------------ init


def test_identity_at_init_on_tiny_model_and_merge_gives_back_the_base(tiny):
    params, tokens, adapted = tiny
    assert isinstance(adapted["layers"]["attn"]["q_proj"], UnitaryWeight)
    # The folded base differs from W0 (U(theta0) != I), yet the model is unchanged.
    folded = adapted["layers"]["mlp"]["down_proj"].base
    assert float(jnp.abs(folded - params["layers"]["mlp"]["down_proj"]).max()) > 0.1
    np.testing.assert_allclose(_logits(adapted, tokens), _logits(params, tokens), atol=1e-5)
    for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(A.merge(adapted))):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_initial_operator_is_random_so_gradients_are_not_degenerate():
    node = _node()
    x = _x(16, 64)
    assert float(jnp.abs(node.rotate(x) - x).max()) > 0.5  # U(theta0) is far from the identity
    np.testing.assert_allclose(node.reflections.norms(), 1.0, atol=1e-6)

    def loss(theta, refl):
        return jnp.sum(node.replace(theta=theta, reflections=refl).apply_to(x) ** 2 * jnp.arange(24))

    g_theta, g_refl = jax.jit(jax.grad(loss, argnums=(0, 1)))(node.theta, node.reflections)
    assert float(jnp.abs(g_theta).min(axis=1).max()) > 0  # every phase row has gradient
    assert float(jnp.linalg.norm(g_theta)) > 1e-3 and float(jnp.linalg.norm(g_refl.vectors)) > 1e-3


@pytest.mark.slow
def test_identity_at_init_on_smollm2(smollm2_gguf):
    from hyjax.weights import load_gguf

    config, params = load_gguf(smollm2_gguf)
    tokens = jnp.asarray([[1, 504, 3458, 314, 253, 1345, 30, 216, 4023, 2, 3]], jnp.int32)
    adapted = A.apply(A.AdapterSpec.for_method(A.UnitaryConfig()), params, jax.random.key(0))
    counts = A.count_trainable(adapted)
    d_ins = 6 * 576 + 1536  # q, k, v, o, gate, up; down
    assert counts["unitary"] == 30 * 7 * d_ins // 2
    base = M.apply(config, params, tokens)
    got = M.apply(config, adapted, tokens)
    np.testing.assert_allclose(got, base, atol=2e-3, rtol=1e-4)
    assert float(jnp.abs(got - base).max()) < 2e-3


# ------------------------------------------------------------------------------------------ shapes


def test_parameter_count_is_three_and_a_half_d_in_per_weight(tiny):
    adapted = tiny[2]
    node = adapted["layers"]["mlp"]["down_proj"]
    assert node.theta.shape == (2, 3, 24) and node.reflections.vectors.shape == (2, 2, 2, 24)
    # theta: 3 * d/2, reflections: 2 vectors * 2 (re, im) * d/2; q, k, v, o, gate, up have d_in 32, down 48.
    d_ins = 6 * 32 + 48
    assert A.count_trainable(adapted) == {"unitary": TINY.num_layers * 7 * d_ins // 2,
                                          "total": TINY.num_layers * 7 * d_ins // 2}
    assert A.count_trainable(adapted)["total"] == 1680


def test_odd_input_dimension_is_refused_with_a_clear_message():
    base = jnp.ones((33, 8))
    with pytest.raises(ValueError, match=r"d_in must be even; got d_in=33 \(weight shape \(33, 8\)\)"):
        A.UnitaryConfig().init(base, jax.random.key(0))
    # The dense full-capacity variant has no such restriction.
    assert A.UnitaryConfig(full_capacity=True).init(base, jax.random.key(0)).rotation.matrix.shape == (33, 33)


def test_bad_impl_is_refused():
    with pytest.raises(ValueError, match="impl='cuda'"):
        A.UnitaryConfig(impl="cuda")


def test_permutation_is_fixed_by_seed_and_shared_by_layers():
    np.testing.assert_array_equal(fixed_permutation(16, 3), fixed_permutation(16, 3))
    assert not np.array_equal(fixed_permutation(16, 3), fixed_permutation(16, 4))
    assert sorted(fixed_permutation(16, 3).tolist()) == list(range(16))
    assert _node().perm.tolist() == fixed_permutation(32, 0).tolist()


# ------------------------------------------------------------------------------ orthogonality, training


def _teacher_regression(d_in=64, d_out=24, tokens=128):
    """A student unitary adapter and data from a teacher with other phases and reflections."""
    student = _node(d_in, d_out, seed=0)
    k_theta, k_v = jax.random.split(jax.random.key(99))
    teacher = student.replace(
        theta=student.theta + 0.5 * jax.random.normal(k_theta, student.theta.shape),
        reflections=UnitVectors(student.reflections.vectors + 0.1 * jax.random.normal(k_v, (2, 2, d_in // 2))))
    x = _x(tokens, d_in, seed=3)
    y = teacher.apply_to(x)
    return student, x, y


def test_orthogonal_with_unit_norm_steps_and_fits_a_toy_regression():
    student, x, y = _teacher_regression()
    trainable, frozen = A.split_trainable({"w": student})
    optimizer = optax.chain(optax.adamw(3e-2, weight_decay=0.01), unit_norm_projection())
    state = optimizer.init(trainable)

    def loss_fn(tr):
        return jnp.mean((A.combine(tr, frozen)["w"].apply_to(x) - y) ** 2)

    @jax.jit
    def step(tr, st):
        loss, grads = jax.value_and_grad(loss_fn)(tr)
        updates, st = optimizer.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss

    probe = _x(32, 64, seed=11)
    losses = []
    for _ in range(50):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
        np.testing.assert_allclose(trainable["w"]["reflections"].norms(), 1.0, atol=1e-6)
    node = A.combine(trainable, frozen)["w"]
    final = float(loss_fn(trainable))
    assert final < 0.3 * losses[0], (losses[0], final)
    assert isinstance(trainable["w"]["reflections"], UnitVectors)
    rotated = node.rotate(probe)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=1), jnp.linalg.norm(probe, axis=1), rtol=1e-5)
    np.testing.assert_allclose(node.rotate(rotated, transpose=True), probe, atol=1e-5)
    # Export: the merged weight gives the adapted output, and unmerging recovers the base.
    np.testing.assert_allclose(probe @ node.merged_2d(), node.apply_to(probe), atol=1e-5)
    np.testing.assert_allclose(node.unmerge_2d(node.merged_2d()), node.base, atol=1e-5)


def test_projection_works_on_adapted_and_trainable_trees():
    node = _node()
    stretched = node.replace(reflections=UnitVectors(node.reflections.vectors * jnp.asarray([[[3.0]], [[0.2]]])))
    adapted = {"a": {"w": stretched}, "b": jnp.full((3,), 5.0)}
    np.testing.assert_allclose(stretched.reflections.norms(), [3.0, 0.2], rtol=1e-5)
    projected = project_unit_norm(adapted)
    np.testing.assert_allclose(projected["a"]["w"].reflections.norms(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(projected["b"], adapted["b"])
    np.testing.assert_array_equal(projected["a"]["w"].theta, node.theta)
    trainable, _ = A.split_trainable(adapted)
    np.testing.assert_allclose(project_unit_norm(trainable)["a"]["w"]["reflections"].norms(), 1.0, atol=1e-6)
    # The map is orthogonal whatever the norm (the operator normalises); projection changes nothing in it.
    x = _x(8, 64)
    np.testing.assert_allclose(stretched.apply_to(x), projected["a"]["w"].apply_to(x), atol=1e-5)


def test_unit_norm_projection_needs_params():
    optimizer = unit_norm_projection()
    with pytest.raises(ValueError, match="needs the current params"):
        optimizer.update({}, optimizer.init({}))


def test_training_through_the_scanned_model_keeps_merge_exact(tiny):
    params, tokens, _ = tiny
    spec = A.AdapterSpec.for_method(A.UnitaryConfig(), targets=r"layers/(attn/o|mlp/down)_proj")
    adapted = A.apply(spec, params, jax.random.key(2))
    trainable, frozen = A.split_trainable(adapted)
    optimizer = optax.chain(optax.adam(5e-2), unit_norm_projection())
    state = optimizer.init(trainable)

    def loss_fn(tr):
        logits = M.apply(TINY, A.combine(tr, frozen), tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    @jax.jit
    def step(tr, st):
        loss, grads = jax.value_and_grad(loss_fn)(tr)
        updates, st = optimizer.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss

    first = None
    for _ in range(5):
        trainable, state, loss = step(trainable, state)
        first = float(loss) if first is None else first
    assert float(loss_fn(trainable)) < first
    is_unit = lambda n: isinstance(n, UnitVectors)  # noqa: E731
    norms = [n.norms() for n in jax.tree.leaves(trainable, is_leaf=is_unit) if is_unit(n)]
    assert len(norms) == 2
    np.testing.assert_allclose(jnp.stack(norms), 1.0, atol=1e-6)
    trained = A.combine(trainable, frozen)
    merged = A.merge(trained)
    np.testing.assert_allclose(_logits(merged, tokens), _logits(trained, tokens), atol=1e-4)
    restored = A.unmerge(merged, trained)
    np.testing.assert_allclose(restored["layers"]["attn"]["o_proj"].base, trained["layers"]["attn"]["o_proj"].base,
                               atol=1e-5)


# ---------------------------------------------------------------------------------- XLA vs Pallas


def test_pallas_interpret_matches_xla_in_values_and_gradients():
    xla = _node(d_in=32, d_out=8, seed=4, impl="xla")
    pallas = xla.replace(impl="pallas")
    x = _x(21, 32, seed=5).reshape(3, 7, 32)  # padded to one token tile
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(8,)), jnp.float32)

    def loss(node, x):
        return jnp.sum(jnp.tanh(node.apply_to(x)) * weights)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    np.testing.assert_allclose(jax.jit(pallas.apply_to)(x), jax.jit(xla.apply_to)(x), atol=2e-5)
    (l_xla, (g_xla, gx_xla)), (l_pl, (g_pl, gx_pl)) = (value_and_grad(n, x) for n in (xla, pallas))
    np.testing.assert_allclose(l_pl, l_xla, rtol=1e-5)
    np.testing.assert_allclose(g_pl.theta, g_xla.theta, atol=1e-4)
    np.testing.assert_allclose(g_pl.reflections.vectors, g_xla.reflections.vectors, atol=1e-4)
    np.testing.assert_allclose(gx_pl, gx_xla, atol=1e-5)
    assert float(jnp.abs(g_xla.theta).max()) > 1e-2


# ---------------------------------------------------------------------------------- full capacity


def test_full_capacity_is_identity_at_init_and_limited_to_small_d(tiny):
    params, tokens, _ = tiny
    adapted = A.apply(A.AdapterSpec.for_method(A.UnitaryConfig(full_capacity=True)), params, jax.random.key(2))
    node = adapted["layers"]["attn"]["q_proj"]
    assert isinstance(node, UnitaryFullWeight) and node.rotation.matrix.shape == (2, 32, 32)
    np.testing.assert_array_equal(node.base, params["layers"]["attn"]["q_proj"])
    np.testing.assert_allclose(_logits(adapted, tokens), _logits(params, tokens), atol=1e-6)
    assert A.count_trainable(adapted)["unitary_full"] == TINY.num_layers * (6 * 32 ** 2 + 48 ** 2)
    with pytest.raises(ValueError, match=r"max_full_capacity_dim=16; got d_in=32"):
        A.UnitaryConfig(full_capacity=True, max_full_capacity_dim=16).init(jnp.ones((32, 4)), jax.random.key(0))


def test_cayley_step_is_orthogonal_and_descends():
    w = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (3, 16, 16)))[0]
    g = jax.random.normal(jax.random.key(1), (3, 16, 16))
    new = jax.jit(cayley_step)(w, g, 0.1)
    np.testing.assert_allclose(jnp.swapaxes(new, -1, -2) @ new, jnp.broadcast_to(jnp.eye(16), (3, 16, 16)),
                               atol=1e-5)
    # First order: the step moves against the gradient.
    assert float(jnp.sum((new - w) * g)) < 0


def test_full_capacity_stays_orthogonal_and_lowers_a_toy_loss():
    d_in, d_out = 32, 12
    base = jax.random.normal(jax.random.key(0), (d_in, d_out)) / np.sqrt(d_in)
    target_rot = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (d_in, d_in)))[0]
    x = _x(96, d_in, seed=2)
    y = (x @ target_rot) @ base
    tree = {"rot": A.UnitaryConfig(full_capacity=True).init(base, jax.random.key(3)),
            "bias": jnp.zeros((d_out,))}
    trainable, frozen = A.split_trainable(tree)
    trainable["bias"] = frozen.pop("bias")  # a plain parameter next to the Orthogonal one
    optimizer = with_orthogonal(optax.adam(1e-2), learning_rate=0.5)
    state = optimizer.init(trainable)

    def loss_fn(tr):
        node = A.combine({"rot": tr["rot"]}, frozen)["rot"]
        return jnp.mean((node.apply_to(x) + tr["bias"] - y) ** 2)

    @jax.jit
    def step(tr, st):
        loss, grads = jax.value_and_grad(loss_fn)(tr)
        updates, st = optimizer.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss

    first = float(loss_fn(trainable))
    for _ in range(50):
        trainable, state, _ = step(trainable, state)
        w = trainable["rot"]["rotation"].matrix
        np.testing.assert_allclose(w.T @ w, jnp.eye(d_in), atol=1e-5)
    assert float(loss_fn(trainable)) < 0.5 * first
    assert float(jnp.abs(trainable["bias"]).max()) > 0  # the Euclidean branch trained too
    node = A.combine({"rot": trainable["rot"]}, frozen)["rot"]
    np.testing.assert_allclose(x @ node.merged_2d(), node.apply_to(x), atol=1e-5)
    np.testing.assert_allclose(node.unmerge_2d(node.merged_2d()), base, atol=1e-5)


def test_cayley_retraction_refuses_other_parameters():
    optimizer = cayley_retraction(0.1)
    params = {"w": Orthogonal(jnp.eye(4)), "b": jnp.zeros(3)}
    with pytest.raises(TypeError, match="only Orthogonal parameters, got"):
        optimizer.update(params, optimizer.init(params), params)
