"""The adapter framework: target tables, apply/merge/unmerge, split/combine, counts, and LoRA itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax import adapters as A
from hyjax import model as M

CONFIG = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def base():
    return M.init_params(CONFIG, jax.random.key(0))


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def _loss(params, tokens=TOKENS):
    logits = M.apply(CONFIG, params, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def _train(adapted, steps=5, lr=1e-2, rng=None):
    trainable, frozen = A.split_trainable(adapted)
    opt = optax.adam(lr)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state, key):
        params = A.with_rng(A.combine(trainable, frozen), key)
        loss, grads = jax.value_and_grad(lambda t: _loss(A.with_rng(A.combine(t, frozen), key)))(trainable)
        del params
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for i in range(steps):
        trainable, state, loss = step(trainable, state, jax.random.key(i) if rng else None)
        losses.append(float(loss))
    return A.combine(trainable, frozen), losses


def test_default_lora_targets_every_projection_only(base):
    adapted = A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=4)), base, jax.random.key(0))
    kinds = {path: type(leaf).__name__ for path, leaf in A.targets.iter_paths(adapted)}
    projections = [p for p in kinds if p.endswith("_proj")]
    assert len(projections) == 7 and all(kinds[p] == "LoRAWeight" for p in projections)
    assert kinds["embed"] == kinds["final_norm"] == kinds["layers/attn_norm"] == "ArrayImpl"
    # r * (d_in + d_out) per layer and projection: q,o (32+32), k,v (32+16), gate,up (32+48), down (48+32)
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 48) * 3)
    assert A.count_trainable(adapted) == {"lora": 3 * per_layer, "total": 3 * per_layer}


def test_first_matching_rule_wins_and_none_freezes(base):
    lora, full = A.LoRAConfig(rank=2), A.FullConfig()
    spec = A.AdapterSpec(((r"layers/attn/q_proj", None), (r"layers/attn/.*", lora), (r"layers/mlp/.*_proj", full)))
    adapted = A.apply(spec, base, jax.random.key(0))
    attn, mlp = adapted["layers"]["attn"], adapted["layers"]["mlp"]
    assert isinstance(attn["q_proj"], jax.Array)
    assert all(isinstance(attn[k], A.LoRAWeight) for k in ("k_proj", "v_proj", "o_proj"))
    assert all(isinstance(mlp[k], A.FullWeight) for k in ("gate_proj", "up_proj", "down_proj"))


def test_spec_matching_nothing_lists_the_paths(base):
    with pytest.raises(ValueError, match=r"match no parameter; available paths: .*layers/attn/q_proj"):
        A.apply(A.AdapterSpec.for_method(A.LoRAConfig(), targets=r"layers/attn/query"), base, jax.random.key(0))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        A.AdapterSpec.for_method(A.LoRAConfig(), targets="layers/(attn")
    with pytest.raises(ValueError, match=r"adapts matrices; got a weight of shape \(3, 32\) with 1 stacked"):
        A.apply(A.AdapterSpec.for_method(A.LoRAConfig(), targets="layers/attn_norm"), base, jax.random.key(0))
    adapted = A.apply(A.AdapterSpec.for_method(A.LoRAConfig()), base, jax.random.key(0))
    with pytest.raises(ValueError, match="already adapted"):
        A.apply(A.AdapterSpec.for_method(A.LoRAConfig()), adapted, jax.random.key(0))


@pytest.mark.parametrize("method", [A.LoRAConfig(rank=4), A.LoRAConfig(rank=4, rslora=True, dropout=0.2),
                                    A.FullConfig()], ids=["lora", "rslora_dropout", "full"])
def test_identity_at_init_training_and_merge(base, method):
    adapted = A.apply(A.AdapterSpec.for_method(method), base, jax.random.key(2))
    np.testing.assert_allclose(M.apply(CONFIG, adapted, TOKENS), M.apply(CONFIG, base, TOKENS), atol=1e-6)
    trained, losses = _train(adapted, rng=True)
    assert losses[-1] < losses[0]
    logits = M.apply(CONFIG, A.with_rng(trained, None), TOKENS)
    merged = A.merge(trained)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    np.testing.assert_allclose(M.apply(CONFIG, merged, TOKENS), logits, atol=1e-5)
    assert not np.allclose(M.apply(CONFIG, merged, TOKENS), M.apply(CONFIG, base, TOKENS), atol=1e-3)
    recovered = A.unmerge(merged, trained)
    for got, want in zip(jax.tree.leaves(recovered), jax.tree.leaves(trained)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_frozen_weights_get_no_gradient_or_state(base):
    adapted = A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=2), targets=r"layers/attn/q_proj"), base,
                      jax.random.key(0))
    trainable, frozen = A.split_trainable(adapted)
    assert jax.tree.map(jnp.shape, trainable) == {"layers": {"attn": {"q_proj": {"a": (3, 32, 2), "b": (3, 2, 32)}}}}
    assert frozen["layers"]["attn"]["q_proj"].a is None
    state = optax.adamw(1e-3).init(trainable)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * sum(x.size for x in jax.tree.leaves(trainable)) + 1


def test_lora_matches_its_formula_and_scales():
    w = jax.random.normal(jax.random.key(0), (16, 8))
    node = A.LoRAConfig(rank=4, alpha=8).init(w, jax.random.key(1))
    node = node.replace(b=jax.random.normal(jax.random.key(2), (4, 8)))
    x = jax.random.normal(jax.random.key(3), (5, 16))
    np.testing.assert_allclose(node.apply_to(x), x @ w + 2.0 * (x @ node.a) @ node.b, rtol=1e-5, atol=1e-5)
    assert A.LoRAConfig(rank=4, alpha=8, rslora=True).scale == 4.0
    bound = 1 / np.sqrt(16)
    assert float(jnp.abs(node.a).max()) <= bound and float(jnp.abs(node.a).max()) > 0.5 * bound
    with pytest.raises(ValueError, match="rank=0"):
        A.LoRAConfig(rank=0)


def test_lora_dropout_is_random_in_training_and_off_in_eval():
    w = jnp.eye(8)
    node = A.LoRAConfig(rank=8, dropout=0.5).init(w, jax.random.key(1)).replace(b=jnp.eye(8))
    x = jnp.ones((4, 8))
    off = node.with_rng(None).apply_to(x)
    np.testing.assert_allclose(off, x + 2.0 * x @ node.a @ node.b, atol=1e-6)
    one, two = node.with_rng(jax.random.key(0)).apply_to(x), node.with_rng(jax.random.key(1)).apply_to(x)
    assert not np.allclose(one, two)
