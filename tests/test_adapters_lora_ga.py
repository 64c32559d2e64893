"""LoRA-GA: gradient estimation, the ArB2r initialisation, identity at init, and the first step's direction."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax import adapters
from hyjax import model as M
from hyjax.adapters.lora_ga import LoRAGAConfig, LoRAGAWeight, estimate_gradients, next_token_loss, randomized_svd
from hyjax.adapters.targets import iter_paths

CONFIG = M.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2)
TARGETS = ("layers/attn/q_proj", "layers/attn/v_proj", "layers/mlp/down_proj")


@pytest.fixture(scope="module")
def setup():
    params = M.init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, CONFIG.vocab_size)
    grads = estimate_gradients(CONFIG, params, [tokens], n_batches=1)
    return params, tokens, grads


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_gradients_are_the_targets_full_gradients_averaged(setup):
    params, tokens, grads = setup
    other = jax.random.randint(jax.random.key(2), (2, 24), 0, CONFIG.vocab_size)
    averaged = estimate_gradients(CONFIG, params, [tokens, other, tokens], n_batches=2)
    second = estimate_gradients(CONFIG, params, [other], n_batches=1)
    full = jax.grad(lambda p: next_token_loss(CONFIG, p, tokens))(params)  # independent: every parameter
    for path in ("layers/attn/q_proj", "layers/mlp/down_proj"):
        np.testing.assert_allclose(_get(grads, path), _get(full, path), atol=1e-7)
        np.testing.assert_allclose(_get(averaged, path), (_get(grads, path) + _get(second, path)) / 2, atol=1e-7)
        assert float(jnp.abs(_get(full, path)).max()) > 1e-4
    assert float(jnp.abs(_get(second, "layers/attn/q_proj") - _get(grads, "layers/attn/q_proj")).max()) > 1e-5
    assert set(grads["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "embed" not in grads and "attn_norm" not in grads["layers"]


def test_factors_are_arb2r_singular_vectors_with_stable_scale():
    g = jax.random.normal(jax.random.key(3), (48, 40)) @ jnp.diag(0.9 ** jnp.arange(40)) \
        @ jax.random.orthogonal(jax.random.key(4), 40)
    cfg = LoRAGAConfig(rank=4, gamma=16)
    a0, b0 = cfg.factors(g, jax.random.key(5))
    p, _, qt = np.linalg.svd(np.asarray(g))
    c = 40 ** 0.25 / 4.0  # d_out^(1/4) / sqrt(gamma)
    # a0: top-r left singular vectors of our [d_in, d_out] gradient (the authors' right ones), up to sign.
    np.testing.assert_allclose(np.abs(np.asarray(a0).T @ p[:, :4]), c * np.eye(4), atol=1e-4)
    # b0: right singular vectors r..2r (the authors' left ones U[:, r:2r]), no singular values.
    np.testing.assert_allclose(np.abs(np.asarray(b0) @ qt[4:8].T), c * np.eye(4), atol=1e-4)


def test_randomized_svd_matches_exact_on_low_rank():
    m = jax.random.normal(jax.random.key(6), (30, 5)) @ jax.random.normal(jax.random.key(7), (5, 20))
    u, s, vt = randomized_svd(m, 8, 2, jax.random.key(8))
    np.testing.assert_allclose(u @ jnp.diag(s) @ vt, m, atol=1e-4)
    np.testing.assert_allclose(s[:5], np.linalg.svd(np.asarray(m), compute_uv=False)[:5], rtol=1e-5)


def test_identity_at_init_and_offset_recoverable(setup):
    params, tokens, grads = setup
    spec = adapters.AdapterSpec.for_method(LoRAGAConfig(rank=4), targets=list(TARGETS))
    adapted = adapters.apply(spec, params, jax.random.key(9), gradients=grads)
    node = adapted["layers"]["attn"]["q_proj"]
    assert isinstance(node, adapters.LoRAGAWeight) and node.a.shape == (2, 64, 4) and node.b.shape == (2, 4, 64)
    assert node.scale == pytest.approx(16 / 2)
    # The base really is offset (the factors are not negligible) ...
    assert float(jnp.abs(node.base - params["layers"]["attn"]["q_proj"]).max()) > 1e-2
    # ... and W0 comes back exactly enough from base + eta a0 b0, and from merge at init.
    for path in TARGETS:
        w0 = _get(params, path)
        np.testing.assert_allclose(jax.vmap(type(node).original_base_2d)(_get(adapted, path)), w0, atol=1e-6)
        np.testing.assert_allclose(_get(adapters.merge(adapted), path), w0, atol=1e-6)
    # After training, the change on the original W0 is a rank-2r LoRA [a, a0] [b; -b0] (for export).
    one = jax.tree.map(lambda v: v[0], node)
    trained = one.replace(b=one.b + 0.1 * jax.random.normal(jax.random.key(11), one.b.shape))
    a2, b2 = trained.delta_factors_2d()
    assert a2.shape == (64, 8) and b2.shape == (8, 64)
    np.testing.assert_allclose(trained.original_base_2d() + trained.scale * a2 @ b2, trained.merged_2d(), atol=1e-5)
    assert float(jnp.abs(trained.merged_2d() - trained.original_base_2d()).max()) > 0.05
    logits = jax.jit(lambda p, t: M.apply(CONFIG, p, t))
    base_logits, ours = logits(params, tokens), logits(adapted, tokens)
    np.testing.assert_allclose(ours, base_logits, atol=2e-5)
    assert float(jnp.abs(base_logits).max()) > 0.1


@pytest.mark.parametrize("method", [LoRAGAConfig(rank=4), adapters.HybridConfig(lora_ga=LoRAGAConfig(rank=4))],
                         ids=["lora_ga", "hybrid"])
def test_saved_starting_values_rebuild_the_same_tree_without_a_gradient(setup, method):
    """What a checkpoint keeps (`starting_values`) rebuilds the adapted tree exactly, whatever gradient a
    restored run would estimate: another gradient gives other factors and another offset."""
    params, tokens, grads = setup
    spec = adapters.AdapterSpec.for_method(method, targets=list(TARGETS))
    adapted = adapters.apply(spec, params, jax.random.key(9), gradients=grads)
    start = adapters.starting_values(adapted)
    names = set(type(_get(adapted, TARGETS[0])).STARTING)
    assert {path for path, _ in iter_paths(start)} == {f"{path}/{name}" for path in TARGETS for name in names}
    rebuilt = adapters.apply(spec, params, jax.random.key(9), gradients=start)
    jax.tree.map(np.testing.assert_array_equal, rebuilt, adapted)
    other = estimate_gradients(CONFIG, params, [jax.random.randint(jax.random.key(2), (2, 24), 0, 97)], n_batches=1)
    drawn_again = adapters.apply(spec, params, jax.random.key(9), gradients=other)
    assert float(jnp.abs(adapters.starting_values(drawn_again)["layers"]["attn"]["q_proj"][sorted(names)[0]]
                         - start["layers"]["attn"]["q_proj"][sorted(names)[0]]).max()) > 1e-2
    plain = adapters.apply(adapters.AdapterSpec.for_method(adapters.LoRAConfig(rank=4)), params, jax.random.key(9))
    assert adapters.starting_values(plain) == {}


def test_missing_gradient_says_how_to_get_it(setup):
    params, _, _ = setup
    spec = adapters.AdapterSpec.for_method(LoRAGAConfig(rank=4))
    with pytest.raises(ValueError, match="estimate_gradients"):
        adapters.apply(spec, params, jax.random.key(0))


def test_rank_too_large_is_refused(setup):
    params, _, grads = setup
    spec = adapters.AdapterSpec.for_method(LoRAGAConfig(rank=20), targets="layers/attn/k_proj")
    with pytest.raises(ValueError, match="2 \\* rank=40"):
        adapters.apply(spec, params, jax.random.key(0), gradients=grads)


def _first_step_cosines(params, tokens, grads, method, lr=1e-3):
    """Cosine between one plain SGD step's weight change and the best rank-2r approximation of -G."""
    spec = adapters.AdapterSpec.for_method(method, targets=list(TARGETS))
    adapted = adapters.apply(spec, params, jax.random.key(10), gradients=grads)
    trainable, frozen = adapters.split_trainable(adapted)
    step_grads = jax.jit(jax.grad(lambda t, f: next_token_loss(CONFIG, adapters.combine(t, f), tokens)))(
        trainable, frozen)
    cosines = []
    for path in TARGETS:
        node, g_ab = _get(adapted, path), _get(step_grads, path)
        a0, b0 = node.a, node.b
        da, db = -lr * g_ab["a"], -lr * g_ab["b"]
        # eta (a1 b1 - a0 b0), written without the cancellation of two nearly equal products.
        dw = node.scale * (da @ (b0 + db) + a0 @ db)
        g = np.asarray(_get(grads, path))
        for layer in range(CONFIG.num_layers):
            u, s, vt = np.linalg.svd(g[layer], full_matrices=False)
            k = 2 * method.rank
            best = -(u[:, :k] * s[:k]) @ vt[:k]
            d = np.asarray(dw[layer])
            cosines.append(float(np.sum(d * best) / (np.linalg.norm(d) * np.linalg.norm(best))))
    return np.array(cosines)


def test_first_sgd_step_is_the_best_rank_2r_step(setup):
    """LoRA-GA's first SGD step changes each weight along the best rank-2r approximation of -G (the
    gradient is exact: one batch, and the model at init equals the base model), unlike plain LoRA."""
    params, tokens, grads = setup
    ga = _first_step_cosines(params, tokens, grads, LoRAGAConfig(rank=4))
    plain = _first_step_cosines(params, tokens, grads, adapters.LoRAConfig(rank=4))
    assert ga.min() > 0.99, ga
    assert plain.max() < 0.9 and ga.min() - plain.max() > 0.1, (ga, plain)
    assert not math.isnan(ga.sum())


@dataclasses.dataclass(frozen=True)
class PeftPortConfig(LoRAGAConfig):
    """Hugging Face PEFT 0.21's port (`lora_ga_init`): B0 times the singular values S[r:2r], the stable
    scale on B0 only, and LoRA's alpha / r as the scale (see the module docstring of lora_ga.py)."""

    def init(self, base, key, gradient=None):
        d_in, d_out = base.shape
        r = self.rank
        p, s, qt = randomized_svd(gradient, min(4 * r, d_in, d_out), 4, key)
        a0 = p[:, :r]
        b0 = s[r:2 * r, None] * qt[r:2 * r] * d_out ** 0.25 / math.sqrt(self.gamma)
        scale = self.alpha / r
        return LoRAGAWeight(base=base - scale * a0 @ b0, a=a0, b=b0, a0=a0, b0=b0, scale=scale)


def test_peft_port_first_step_is_not_the_rank_2r_step(setup):
    """With B0 carrying the (small) singular values, PEFT's first step weights directions r..2r by
    s_i^3 instead of s_i: it is close to the rank-r approximation only, not the rank-2r one."""
    params, tokens, grads = setup
    ours = _first_step_cosines(params, tokens, grads, LoRAGAConfig(rank=4))
    peft = _first_step_cosines(params, tokens, grads, PeftPortConfig(rank=4))
    assert peft.min() < 0.9 and peft.mean() < ours.mean() - 0.05, (ours, peft)
