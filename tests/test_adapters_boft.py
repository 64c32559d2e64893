"""OFT/BOFT adapter: identity at init, layer parity with PEFT, merge, orthogonality, Neumann, kernels, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax import adapters as A
from hyjax import model as M
from hyjax.adapters.boft import flatten_blocks
from pallas_kernels.butterfly import butterfly_apply

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")

CONFIG = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 0, 64)
_apply = jax.jit(M.apply, static_argnums=0)


@pytest.fixture(scope="module")
def base():
    return M.init_params(CONFIG, jax.random.key(0))


def _randomize(adapted, seed, std=0.1):
    """Every BOFT node with random r ~ N(0, std) and s ~ N(1, std)."""
    rng = np.random.default_rng(seed)

    def fill(_, leaf):
        if not isinstance(leaf, A.BOFTWeight):
            return leaf
        return leaf.replace(r=jnp.asarray(rng.normal(0, std, leaf.r.shape), jnp.float32),
                            s=jnp.asarray(rng.normal(1, std, leaf.s.shape), jnp.float32))
    return A.targets.map_paths(fill, adapted)


def test_identity_at_init(base):
    adapted = A.apply(A.AdapterSpec.for_method(A.BOFTConfig(block_size=4, n_factors=2)), base, jax.random.key(0))
    node = adapted["layers"]["mlp"]["down_proj"]
    assert node.r.shape == (2, 2, 48 // 4, 4 * 4) and node.s.shape == (2, 32)
    assert not np.any(np.asarray(node.r)) and np.all(np.asarray(node.s) == 1)
    np.testing.assert_allclose(_apply(CONFIG, adapted, TOKENS), _apply(CONFIG, base, TOKENS), atol=1e-6)


@pytest.mark.parametrize("d_in,d_out,b,m", [(32, 24, 8, 1), (64, 40, 4, 2), (48, 16, 4, 3), (96, 32, 6, 2)])
def test_layer_matches_peft(d_in, d_out, b, m, peft_butterfly):
    torch.manual_seed(0)
    module = torch.nn.Sequential()
    module.add_module("proj", torch.nn.Linear(d_in, d_out, bias=False))
    cfg = peft.BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=["proj"])
    layer = peft.get_peft_model(module, cfg).base_model.model.proj
    with torch.no_grad():
        layer.boft_R["default"].normal_(0, 0.2)
        layer.boft_s["default"].normal_(1, 0.1)
    x = torch.randn(7, d_in)
    want = layer(x).detach().numpy()

    ours = A.BOFTWeight(base=jnp.asarray(layer.base_layer.weight.detach().numpy().T),
                        r=flatten_blocks(jnp.asarray(layer.boft_R["default"].detach().numpy())),
                        s=jnp.asarray(layer.boft_s["default"].detach().numpy()[:, 0]), impl="xla")
    assert ours.r.shape == (m, d_in // b, b * b)
    got = np.asarray(ours.apply_to(jnp.asarray(x.numpy())))
    diff = float(np.max(np.abs(got - want)))
    print(f"BOFT layer vs PEFT d_in={d_in} d_out={d_out} b={b} m={m}: max abs diff {diff:.2e}")
    assert diff < 1e-5

    layer.merge()  # PEFT's dense merge: our merged_2d is its weight, transposed
    merged_diff = float(np.max(np.abs(np.asarray(ours.merged_2d()) - layer.base_layer.weight.detach().numpy().T)))
    assert merged_diff < 1e-5, merged_diff


def test_merge_matches_adapted_logits_and_unmerge_recovers_base(base):
    adapted = A.apply(A.AdapterSpec.for_method(A.BOFTConfig(block_size=8, n_factors=2)), base, jax.random.key(0))
    adapted = _randomize(adapted, 3)
    logits = _apply(CONFIG, adapted, TOKENS)
    assert float(jnp.max(jnp.abs(logits - _apply(CONFIG, base, TOKENS)))) > 1e-2  # the adapter does something
    merged = A.merge(adapted)
    np.testing.assert_allclose(_apply(CONFIG, merged, TOKENS), logits, atol=2e-5)
    recovered = A.unmerge(merged, adapted)
    np.testing.assert_allclose(recovered["layers"]["attn"]["q_proj"].base, base["layers"]["attn"]["q_proj"], atol=1e-5)


def _rotation(node):
    """The dense R (rows: x @ R for unit x), built only to test it."""
    d = node.r.shape[-2] * node.block_size
    return np.asarray(butterfly_apply(jnp.eye(d), node.blocks(), impl="xla"), np.float64)


def test_stays_orthogonal_after_adamw():
    d_in, d_out = 64, 16
    k = jax.random.split(jax.random.key(0), 4)
    w0 = jax.random.normal(k[0], (d_in, d_out)) / 8
    node = A.BOFTConfig(block_size=8, n_factors=2).init(w0, k[1])
    x = jax.random.normal(k[2], (32, d_in))
    target = jnp.dot(x, jax.random.normal(k[3], (d_in, d_out)) / 8)
    trainable, frozen = A.split_trainable({"w": node})
    opt = optax.adamw(3e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state):
        loss_fn = lambda t: jnp.mean((A.combine(t, frozen)["w"].apply_to(x) - target) ** 2)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for _ in range(50):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    trained = A.combine(trainable, frozen)["w"]
    assert float(jnp.max(jnp.abs(trained.r))) > 0.1  # really moved away from the identity
    rotated = butterfly_apply(x, trained.blocks(), impl="xla")
    norm_err = float(jnp.max(jnp.abs(jnp.linalg.norm(rotated, axis=-1) / jnp.linalg.norm(x, axis=-1) - 1)))
    rot = _rotation(trained)
    ortho_err = float(np.max(np.abs(rot.T @ rot - np.eye(d_in))))
    print(f"after 50 AdamW steps: max | ||Rx||/||x|| - 1 | = {norm_err:.2e}, max |R^T R - I| = {ortho_err:.2e}")
    assert norm_err < 1e-5 and ortho_err < 1e-5


def test_cayley_matches_peft_and_neumann_converges():
    r = np.random.default_rng(0).normal(0, 0.05, (6, 8, 8)).astype(np.float32)
    exact = np.asarray(A.cayley(jnp.asarray(r)))
    want = boft_layer.BOFTLayer.cayley_batch(None, torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(exact, want, atol=1e-6)
    errors = [float(np.max(np.abs(np.asarray(A.cayley(jnp.asarray(r), k)) - exact))) for k in (1, 2, 4, 8)]
    print("Neumann-series Cayley max abs error for 1, 2, 4, 8 terms:", ", ".join(f"{e:.1e}" for e in errors))
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 2e-6


def test_neumann_node_close_to_exact(base):
    cfg = A.BOFTConfig(block_size=8, n_factors=2)
    exact = _randomize(A.apply(A.AdapterSpec.for_method(cfg), base, jax.random.key(0)), 3, std=0.02)
    approx = A.targets.map_paths(
        lambda _, leaf: leaf.replace(neumann_terms=5) if isinstance(leaf, A.BOFTWeight) else leaf, exact)
    diff = float(jnp.max(jnp.abs(_apply(CONFIG, approx, TOKENS) - _apply(CONFIG, exact, TOKENS))))
    assert diff < 1e-5, diff


def test_pallas_interpret_matches_xla_values_and_grads():
    k = jax.random.split(jax.random.key(5), 4)
    w0 = jax.random.normal(k[0], (64, 24)) / 8
    node = A.BOFTWeight(base=w0, r=0.2 * jax.random.normal(k[1], (2, 8, 8 * 8)),
                        s=1 + 0.1 * jax.random.normal(k[2], (24,)), impl="xla")
    x = jax.random.normal(k[3], (2, 9, 64))
    kernel = node.replace(impl="pallas", interpret=True)

    def loss(n, x):
        return jnp.sum(jnp.sin(n.apply_to(x)))

    np.testing.assert_allclose(kernel.apply_to(x), node.apply_to(x), atol=1e-5)
    g_xla = jax.grad(loss, argnums=(0, 1))(node, x)
    g_pallas = jax.grad(loss, argnums=(0, 1))(kernel, x)
    for name in ("r", "s"):
        np.testing.assert_allclose(getattr(g_pallas[0], name), getattr(g_xla[0], name), atol=1e-4)
    np.testing.assert_allclose(g_pallas[1], g_xla[1], atol=1e-5)
    assert float(jnp.max(jnp.abs(g_xla[0].r))) > 1e-2


def test_block_dropout_replaces_blocks_of_one_factor():
    node = A.BOFTWeight(base=jnp.zeros((64, 8)), r=0.3 * jax.random.normal(jax.random.key(0), (3, 8, 8 * 8)),
                        s=jnp.ones(8), dropout=0.5)
    assert node.with_rng(jax.random.key(1)).dropout_key is not None
    assert node.with_rng(None).dropout_key is None
    exact = np.asarray(node.blocks())
    dropped = np.asarray(node.with_rng(jax.random.key(1)).blocks())
    changed = np.any(dropped != exact, axis=(-1, -2))  # [m, n_blocks]
    assert changed.sum() == 4 and changed.any(axis=1).sum() == 1  # int(0.5 * 8) blocks, one factor
    np.testing.assert_array_equal(dropped[changed], np.broadcast_to(np.eye(8), (4, 8, 8)))


@pytest.mark.parametrize("kwargs,shape,message", [
    ({"block_size": 5}, (32, 16), "block_size=5 must divide the weight's d_in=32"),
    ({"block_size": 8, "n_factors": 3}, (48, 16), "8 * 2**2 = 32 to divide d_in=48"),
])
def test_bad_block_sizes_name_the_values(kwargs, shape, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        A.BOFTConfig(**kwargs).init(jnp.zeros(shape), jax.random.key(0))


def test_bad_config_values_name_the_values(base):
    with pytest.raises(ValueError, match="block_size=3 must be even when n_factors=2"):
        A.BOFTConfig(block_size=3, n_factors=2)
    with pytest.raises(ValueError, match="dropout=1.5"):
        A.BOFTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="block_size=7 must divide"):  # through the whole-tree API
        A.apply(A.AdapterSpec.for_method(A.BOFTConfig(block_size=7)), base, jax.random.key(0))
