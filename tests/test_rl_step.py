"""GRPO's rollout and update on the tiny model with LoRA adapters: the sampler's log-probabilities are the
learner's, a batch's first update has ratio 1 and the policy gradient, micro-batches add up to the whole
batch, and the second update of the same batch moves the ratio and clips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.data.arithmetic import arithmetic_problems, write_arithmetic_jsonl
from hyjax.rl import grpo_loss
from hyjax.rl.rollout import completion_keys, rollout_batch, sample_rollout
from hyjax.rl.step import GRPOObjective, token_log_probs
from hyjax.sampling import SamplingConfig
from hyjax.training.run_plan import run_layout
from hyjax.training.setup import prepare_run
from hyjax.training.step import forward_params, objective_update

GROUP, PROMPTS, LENGTH = 4, 2, 96


def length_reward(completion: str, row) -> float:
    """A reward that differs between the tiny random model's completions."""
    return len(completion) / 10


@pytest.fixture(scope="module")
def lora_rollout(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    data = write_arithmetic_jsonl(folder / "arith.jsonl", 32, seed=0, difficulty=1)
    config = load_config(None, [
        "model.preset=null", f"model.path={tiny_checkpoint}", f"data.path={data}", "data.task=math",
        "data.chat=false", "data.max_length=96", "method.name=lora", "train.steps=2",
        "train.global_batch_size=8", "train.optimizer=sgd", "train.b1=0", "train.learning_rate=1.0",
        "train.schedule=constant", "train.grad_clip_norm=null", "export.peft_adapter=false",
        f"logging.output_dir={folder / 'run'}"])
    setup = prepare_run(config, layout=run_layout(config.mesh), log=lambda text: None)
    state = setup.initial_state()
    params = forward_params(state.trainable, setup.frozen, state.opt_state, None, None)
    rows = arithmetic_problems(PROMPTS, seed=0, difficulty=1)
    prompts = [setup.tokenizer.encode(f"Question: {row['question']}\nAnswer:", add_bos=True) for row in rows]
    keys = completion_keys(jax.random.key(0), 0, [5, 9], GROUP)
    rollout = sample_rollout(setup.plan.model_config, params, prompts, rows, keys, tokenizer=setup.tokenizer,
                             sampling=SamplingConfig(max_new_tokens=12, temperature=1.0),
                             rewards=[(length_reward, 1.0)], group_size=GROUP)
    batch = rollout_batch(rollout, LENGTH, setup.tokenizer.pad_id)
    return setup, state, params, rollout, batch


def test_rollout_keys_and_rewards(lora_rollout):
    _, _, _, rollout, batch = lora_rollout
    assert len(rollout.completions) == PROMPTS * GROUP and rollout.rewards.shape == (PROMPTS, GROUP)
    assert rollout.metrics()["groups_with_signal"] == 1.0  # lengths differ within each group
    np.testing.assert_allclose(rollout.advantages.reshape(PROMPTS, GROUP).mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(batch["loss_mask"].sum(axis=1), [len(c) for c in rollout.completions])
    keys = completion_keys(jax.random.key(0), 0, [5, 9], GROUP)
    np.testing.assert_array_equal(jax.random.key_data(keys[GROUP:]),
                                  jax.random.key_data(completion_keys(jax.random.key(0), 0, [9], GROUP)))


def test_the_samplers_log_probs_are_the_learners(lora_rollout):
    setup, _, params, _, batch = lora_rollout
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    learned = token_log_probs(setup.plan.model_config, params, arrays, 1.0)
    np.testing.assert_allclose(learned, batch["old_log_probs"], atol=1e-5)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_two_updates_of_a_rollout_batch(lora_rollout, aggregation):
    setup, state, params, rollout, batch = lora_rollout
    model_config = setup.plan.model_config
    batch = dict(batch, ref_log_probs=batch["old_log_probs"])
    objective = GRPOObjective(temperature=1.0, beta=0.1, clip_low=0.2, clip_high=0.2, aggregation=aggregation)
    step = jax.jit(objective_update(objective, model_config, setup.plan.optimizer, setup.plan.schedule))
    stacked = jax.tree.map(lambda x: jnp.asarray(x).reshape(2, x.shape[0] // 2, *x.shape[1:]), batch)

    def whole_batch_loss(trainable):
        p = forward_params(trainable, setup.frozen, state.opt_state, None, None)
        arrays = {k: jnp.asarray(v) for k, v in batch.items()}
        log_probs = token_log_probs(model_config, p, arrays, 1.0)
        return grpo_loss(log_probs, arrays["old_log_probs"], jnp.asarray(rollout.advantages), arrays["loss_mask"],
                         ref_log_probs=arrays["ref_log_probs"], beta=0.1, aggregation=aggregation)[0]

    first, metrics = step(state, setup.frozen, stacked, jax.random.key(1))
    assert abs(float(metrics["ratio"]) - 1) < 1e-5 and float(metrics["clip_fraction"]) == 0
    assert float(metrics["kl"]) < 1e-6
    if aggregation == "token_mean":  # ratio 1: minus the token-weighted mean advantage
        lengths = batch["loss_mask"].sum(axis=1)
        np.testing.assert_allclose(float(metrics["loss"]), -np.sum(lengths * rollout.advantages) / lengths.sum(),
                                   rtol=1e-4, atol=1e-6)
    # plain SGD at learning rate 1: the update is minus the gradient of the whole batch's loss
    want = jax.grad(whole_batch_loss)(state.trainable)
    moved = jax.tree.map(lambda a, b: a - b, state.trainable, first.trainable)
    for got, expected in zip(jax.tree.leaves(moved), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-7)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want)) > 1e-4

    second, metrics = step(first, setup.frozen, stacked, jax.random.key(1))
    assert abs(float(metrics["ratio"]) - 1) > 1e-4 and float(metrics["kl"]) > 0
