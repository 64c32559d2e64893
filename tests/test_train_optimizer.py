"""The run's optimizer: schedules, per-group learning rates, non-finite skipping, hybrid and unitary pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax import adapters as A
from hyjax import model as M
from hyjax.config import load_config
from hyjax.optim import current_lambdas, hybrid_weights
from hyjax.methods import method_of
from hyjax.optim.schedule import learning_rate_schedule
from hyjax.training.optimizer import build_optimizer, group_labels

CONFIG = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def _config(*overrides):
    return load_config(None, ["model.path=null", "export.peft_adapter=false", *overrides])


def test_warmup_then_cosine_to_the_final_fraction():
    train = _config("train.learning_rate=1e-3", "train.warmup_steps=10", "train.final_lr_fraction=0.1").train
    schedule = learning_rate_schedule(train, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way down
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)


def test_linear_and_constant_schedules():
    linear = learning_rate_schedule(_config("train.schedule=linear", "train.learning_rate=2.0").train, 4)
    np.testing.assert_allclose([float(linear(s)) for s in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0], rtol=1e-6)
    constant = learning_rate_schedule(_config("train.schedule=constant").train, 4)
    assert {float(constant(s)) for s in range(6)} == {1e-4}


def _lora_trainable():
    params = M.init_params(CONFIG, jax.random.key(0))
    adapted = A.apply(A.AdapterSpec.for_method(A.LoRAConfig(rank=2)), params, jax.random.key(1))
    return A.split_trainable(adapted)[0]


def test_first_matching_multiplier_pattern_labels_each_leaf():
    labels = group_labels(_lora_trainable(), [("q_proj", 10.0), ("attn/.*_proj", 0.0)])
    assert labels["layers"]["attn"]["q_proj"]["a"] == "group0"
    assert labels["layers"]["attn"]["k_proj"]["b"] == "group1"
    assert labels["layers"]["mlp"]["up_proj"]["a"] == "default"


def test_lr_multipliers_scale_and_freeze_groups():
    trainable = _lora_trainable()
    grads = jax.tree.map(jnp.ones_like, trainable)
    config = _config("method.name=lora", "train.optimizer=sgd", "train.b1=0", "train.schedule=constant",
                     "train.learning_rate=0.1", "train.grad_clip_norm=null",
                     "train.lr_multipliers=[[q_proj, 10.0], [k_proj, 0.0]]")
    optimizer, _ = build_optimizer(config, total_steps=10)
    updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
    attn = updates["layers"]["attn"]
    np.testing.assert_allclose(attn["q_proj"]["a"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(attn["k_proj"]["a"], 0.0)
    np.testing.assert_allclose(attn["v_proj"]["a"], -0.1, rtol=1e-6)


@pytest.mark.parametrize("per_group", [False, True])
def test_gradient_clipping_global_or_per_learning_rate_group(per_group):
    """SGD at rate 1, so each update is minus the clipped gradient: q_proj's group has gradient norm 20,
    the rest 0.5 or 500. One global norm scales both by their joint norm; per group, each is clipped by its own."""
    trainable = _lora_trainable()
    config = _config("method.name=lora", "train.optimizer=sgd", "train.b1=0", "train.schedule=constant",
                     "train.learning_rate=1.0", "train.grad_clip_norm=1.0", f"train.grad_clip_per_group={per_group}",
                     "train.lr_multipliers=[[q_proj, 1.0]]")
    optimizer, _ = build_optimizer(config, total_steps=10)
    labels = group_labels(trainable, config.train.lr_multipliers)

    def norm(tree, label):
        return float(optax.global_norm(jax.tree.leaves(jax.tree.map(
            lambda x, l: x if l == label else jnp.zeros_like(x), tree, labels))))

    ones = jax.tree.map(jnp.ones_like, trainable)
    for rest in (0.5, 500.0):
        target = {"group0": 20.0, "default": rest}
        grads = jax.tree.map(lambda x, l: x * target[l] / norm(ones, l), ones, labels)
        updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
        total = float(np.hypot(20.0, rest))
        expected = {l: min(n, 1.0) if per_group else n / total for l, n in target.items()}
        for label, value in expected.items():
            np.testing.assert_allclose(norm(updates, label), value, rtol=1e-5)


def test_non_finite_gradient_skips_the_update_and_keeps_the_state():
    trainable = _lora_trainable()
    optimizer, _ = build_optimizer(_config("method.name=lora"), total_steps=10)
    state = optimizer.init(trainable)
    good = jax.tree.map(jnp.ones_like, trainable)
    _, state = optimizer.update(good, state, trainable)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
    updates, after = optimizer.update(bad, state, trainable)
    assert not bool(after.last_finite) and int(after.total_notfinite) == 1
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    for kept, old in zip(jax.tree.leaves(after.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(kept, old)


def test_hybrid_runs_carry_lambdas_in_the_optimizer_state():
    params = M.init_params(CONFIG, jax.random.key(0))
    # rank 3: the LoRA-GA branch's 3 x (32 + 32) gradient entries outnumber the rotation's 8 x 4 x 4, so with
    # all-ones gradients the two branch norms differ and lambda leaves 0.5
    config = _config("model.path=x.gguf", "method.name=hybrid", "method.boft.block_size=4",
                     "method.lora_ga.rank=3", "method.hybrid.lambdas.rule=raw", "method.hybrid.lambdas.warmup_steps=0")
    spec = method_of(config).adapter_spec(config)
    gradients = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    trainable = A.split_trainable(A.apply(spec, params, jax.random.key(1), gradients=gradients))[0]
    optimizer, _ = build_optimizer(config, total_steps=10)
    state = optimizer.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    _, state = optimizer.update(grads, state, trainable)
    lambdas = current_lambdas(state)
    lam = lambdas["layers"]["attn"]["q_proj"]
    assert lam.shape == (CONFIG.num_layers,) and not np.allclose(lam, 0.5)


@pytest.mark.parametrize("per_group", [False, True])
def test_hybrid_lambda_rule_reads_the_branches_unclipped_gradient_norms(per_group):
    """Per-group clipping happens inside the groups, after the lambda rule: the rule sees the gradients
    as computed (both branch norms far above the clipping bound here), under one norm as per group. Had it
    read them clipped per group, each branch would be scaled by its own factor and lambda would differ."""
    params = M.init_params(CONFIG, jax.random.key(0))
    config = _config("model.path=x.gguf", "method.name=hybrid", "method.hybrid.mix=update", "method.boft.block_size=4",
                     "method.lora_ga.rank=3", "method.hybrid.lambdas.rule=raw", "method.hybrid.lambdas.warmup_steps=0",
                     "train.grad_clip_norm=1.0", f"train.grad_clip_per_group={per_group}",
                     'train.lr_multipliers=[[".*/boft_(r|s)$",4]]')
    spec = method_of(config).adapter_spec(config)
    gradients = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    trainable = A.split_trainable(A.apply(spec, params, jax.random.key(1), gradients=gradients))[0]
    labels = group_labels(trainable, config.train.lr_multipliers)
    scale = {"group0": 10.0, "default": 1000.0}  # the BOFT branch's group, the LoRA-GA branch's
    grads = jax.tree.map(lambda x, l: scale[l] * jax.random.normal(jax.random.key(3), x.shape), trainable, labels)
    optimizer, _ = build_optimizer(config, total_steps=10)
    _, state = optimizer.update(grads, optimizer.init(trainable), trainable)

    def lambdas_seen(g):
        rule = hybrid_weights(rule="raw", warmup_steps=0, mix="update", inner=optax.identity())
        return current_lambdas(rule.update(g, rule.init(trainable), trainable)[1])["layers"]["attn"]["q_proj"]

    clip = optax.clip_by_global_norm(1.0)
    clipped_per_group = jax.tree.map(
        lambda a, b, l: a if l == "group0" else b,
        clip.update(jax.tree.map(lambda g, l: g if l == "group0" else 0 * g, grads, labels), clip.init(grads))[0],
        clip.update(jax.tree.map(lambda g, l: 0 * g if l == "group0" else g, grads, labels), clip.init(grads))[0],
        labels)
    lam = current_lambdas(state)["layers"]["attn"]["q_proj"]
    np.testing.assert_allclose(lam, lambdas_seen(grads), rtol=1e-5)
    assert np.max(np.abs(lambdas_seen(grads) - lambdas_seen(clipped_per_group))) > 0.01


def test_unitary_runs_keep_reflection_vectors_unit_norm():
    params = M.init_params(CONFIG, jax.random.key(0))
    config = _config("method.name=unitary", "train.learning_rate=0.5")
    trainable = A.split_trainable(A.apply(method_of(config).adapter_spec(config), params, jax.random.key(1)))[0]
    optimizer, _ = build_optimizer(config, total_steps=10)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), trainable)
    updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
    after = optax.apply_updates(trainable, updates)
    vectors = [n for n in jax.tree.leaves(after, is_leaf=lambda n: isinstance(n, A.UnitVectors))
               if isinstance(n, A.UnitVectors)]
    assert vectors
    for node in vectors:
        np.testing.assert_allclose(node.norms(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_each_optimizer_reduces_a_quadratic(optimizer):
    config = _config("method.name=lora", f"train.optimizer={optimizer}", "train.learning_rate=0.05",
                     "train.schedule=constant", "train.weight_decay=0.01")
    optimizer, _ = build_optimizer(config, total_steps=50)
    params = {"w": jnp.full((4, 4), 2.0)}
    state = optimizer.init(params)
    for _ in range(30):
        grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(jnp.sum(params["w"] ** 2)) < 0.5 * 64


def test_bfloat16_full_fine_tuning_step_keeps_parameter_dtypes():
    """Gradients accumulate in float32 and reach the optimizer in each parameter's dtype, so AdamW's
    state stays bfloat16 and `apply_if_finite`'s branches agree (they did not before)."""
    from hyjax.training.step import TrainState, make_train_step

    config = M.LlamaConfig(**{**CONFIG.__dict__, "param_dtype": "bfloat16", "dtype": "bfloat16"})
    params = M.init_params(config, jax.random.key(0))
    adapted = A.apply(A.AdapterSpec.for_method(A.FullConfig()), params, jax.random.key(1))
    trainable, frozen = A.split_trainable(adapted)
    run = _config("method.name=full", "train.learning_rate=1e-2", "train.micro_batch_size=2",
                  "train.global_batch_size=4")
    optimizer, schedule = build_optimizer(run, 10)
    state = TrainState.create(trainable, optimizer, 0)
    tokens = jax.random.randint(jax.random.key(2), (2, 2, 8), 0, 64)
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones((2, 2, 8)), "positions": jnp.broadcast_to(
        jnp.arange(8), (2, 2, 8)), "segment_ids": jnp.ones((2, 2, 8), jnp.int32)}
    new, metrics = jax.jit(make_train_step(config, optimizer, schedule))(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
    assert {leaf.dtype for leaf in jax.tree.leaves(new.trainable)} == {jnp.dtype(jnp.bfloat16)}
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.trainable, state.trainable)
    assert all(jax.tree.leaves(changed))
