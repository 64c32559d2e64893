"""GRPO inside `python -m hyjax.train` (`train.objective: grpo`): its step (sample the prompts'
completions, reward them, `num_iterations` updates of `accumulated_update` on GRPO's loss), as
`hyjax.training.loop.fit` runs it; the prompts come from `hyjax.rl.prompts`, the objective's
arithmetic from `hyjax.rl`.

Every process samples every completion of a step (keys from (step, prompt, sample), the same values
anywhere) and trains on its share of the rows, so a run of any number of processes, and a resumed run,
equal one uninterrupted process. The reference policy is the model at step 0: the frozen weights with
the trainable parameters' values at step 0 (`ReferencePolicy`, a copy kept on the devices beside the
trained ones, split as they are: for adapter methods a small copy, for full fine-tuning and
Hybrid-LoRA's fully trained modules a copy of what they train; the planner counts it). With
`grpo.beta: 0` it is not kept.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hyjax import adapters
from hyjax.adapters.hybrid import set_lambdas
from hyjax.optim import current_lambdas
from hyjax.optim.zeroth_order import join_base, zeroth_order_step
from hyjax.rl.rewards import resolve_reward
from hyjax.rl.rollout import completion_keys, rollout_batch, sample_rollout
from hyjax.rl.step import GRPOObjective, grpo_sums, token_log_probs
from hyjax.sampling import SamplingConfig
from hyjax.sharding import activation_sharding
from hyjax.training import distributed
from hyjax.training.step import TrainState, accumulated_update, forward_loss


def grpo_batch_loss(model_config, lambdas: bool, objective: GRPOObjective):
    """`loss(trainable, frozen, opt_state, batch, key)`: the GRPO loss of a rollout batch by forward passes
    alone, for the ZO + FO hybrid's SPSA estimates (`hyjax.optim.zeroth_order.zeroth_order_step`)."""
    return forward_loss(grpo_sums(model_config, objective), lambdas)


def grpo_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule, lambdas: bool,
              objective: GRPOObjective):
    """`step(state, frozen, batch, key) -> (state, metrics)`: one optimizer update on a rollout batch
    (`accumulated_update` of `grpo_sums`; `state.step`, counting sampled batches, is left to the caller:
    a batch may get several updates).

    Metrics: loss, kl (with `ref_log_probs` in the batch), clip_fraction, ratio (mean importance ratio:
    1 on a batch's first update), grad_norm, learning_rate, completion_tokens, skipped."""
    return accumulated_update(grpo_sums(model_config, objective), optimizer, schedule, lambdas, counts_step=False)


class ReferencePolicy(NamedTuple):
    """The policy at step 0 beside the frozen weights: the trainable values then, for zo_fo the base
    weights it trains by SPSA then, and for the hybrid its lambdas then (None where a method has none)."""

    trainable: Any
    base: Any
    lambdas: Any

    @classmethod
    def at_start(cls, setup, state: TrainState) -> "ReferencePolicy":
        """The step-0 values the run's setup holds (`state` was built from them; its own buffers are
        donated to each step) and a copy of the fresh `state`'s lambdas (the hybrid)."""
        lambdas = jax.tree.map(jnp.copy, current_lambdas(state.opt_state)) if setup.plan.method.lambdas else None
        return cls(setup.trainable, setup.base, lambdas)

    def params(self, frozen: dict) -> dict:
        """The reference model's parameter tree (dropout off)."""
        params = adapters.combine(self.trainable, join_base(self.base, frozen))
        return params if self.lambdas is None else set_lambdas(params, self.lambdas)


class GRPOStep:
    """`step(state, frozen, prompts) -> (state, metrics)` for `fit`: samples `grpo.group_size` completions
    of each prompt from the current policy, rewards them, and takes `grpo.num_iterations` updates on
    them (the state's step counts sampled batches, not updates)."""

    def __init__(self, setup, reference: ReferencePolicy | None):
        config, plan = setup.config, setup.plan
        self.setup, self.grpo = setup, config.grpo
        self.objective = GRPOObjective(temperature=self.grpo.temperature, beta=self.grpo.beta,
                                       clip_low=self.grpo.clip_low, clip_high=self.grpo.clip_high,
                                       aggregation=self.grpo.aggregation)
        self.sampling = SamplingConfig(max_new_tokens=self.grpo.max_new_tokens, temperature=self.grpo.temperature,
                                       top_p=self.grpo.top_p)
        self.rewards = [(resolve_reward(name), weight) for name, weight in self.grpo.rewards]
        self.sample_key = jax.random.fold_in(jax.random.key(config.train.seed), 0x5A3)
        layout, lambdas = plan.layout, plan.method.lambdas
        update = grpo_step(plan.model_config, plan.optimizer, plan.schedule, lambdas, self.objective)
        if plan.zeroth_order is not None:  # zo_fo: SPSA estimates of the same GRPO loss move the base weights
            update = zeroth_order_step(update, grpo_batch_loss(plan.model_config, lambdas, self.objective),
                                       plan.zeroth_order)

        def sharded_update(state, frozen, batch, key):
            with activation_sharding(layout):
                return update(state, frozen, batch, key)

        state_sharding, frozen_sharding, batch_sharding = plan.shardings.arguments
        self.update = jax.jit(sharded_update, in_shardings=(state_sharding, frozen_sharding, batch_sharding,
                                                            layout.replicated),
                              out_shardings=(state_sharding, layout.replicated), donate_argnums=0)
        self.reference = None
        if reference is not None and self.grpo.beta > 0:
            self.reference = reference

            def reference_log_probs(reference, frozen, batch):
                params = reference.params(frozen)
                with activation_sharding(layout):
                    return jax.vmap(lambda micro: token_log_probs(plan.model_config, params, micro,
                                                                  self.objective.temperature))(batch)

            self.reference_log_probs = jax.jit(reference_log_probs, out_shardings=batch_sharding)

    def __call__(self, state: TrainState, frozen: dict, prompts) -> tuple[TrainState, dict[str, Any]]:
        indices, prompt_ids, rows = prompts
        setup, train = self.setup, self.setup.config.train
        step = int(state.step)
        tick = time.perf_counter()
        keys = completion_keys(self.sample_key, step, indices, self.grpo.group_size)
        rollout = sample_rollout(setup.plan.model_config, setup.plan.params(state, frozen), prompt_ids, rows, keys,
                                 tokenizer=setup.tokenizer, sampling=self.sampling, rewards=self.rewards,
                                 group_size=self.grpo.group_size)
        sampled = time.perf_counter()
        whole = rollout_batch(rollout, setup.config.data.max_length, setup.tokenizer.pad_id,
                              bucket=setup.config.data.bucket, max_new_tokens=self.grpo.max_new_tokens)
        index, count = setup.rows
        local = {key: value[index::count] for key, value in whole.items()}
        batch = distributed.global_batch(local, setup.plan.shardings.batch, train.grad_accum_steps,
                                         train.global_batch_size)
        if self.reference is not None:
            batch["ref_log_probs"] = self.reference_log_probs(self.reference, frozen, batch)
        step_key = jax.random.fold_in(state.rng, state.step)
        for iteration in range(self.grpo.num_iterations):
            state, metrics = self.update(state, frozen, batch, jax.random.fold_in(step_key, iteration))
            if iteration == 0:
                first = metrics
        state = state.replace(step=state.step + 1)
        jax.block_until_ready(metrics)  # the updates run asynchronously: time them finished
        trained = time.perf_counter()
        tokens = float(whole["loss_mask"].sum())
        return state, {**metrics, "ratio_first_update": first["ratio"],
                       **{name: np.float32(value) for name, value in rollout.metrics().items()},
                       "sampling_tokens_per_second": np.float32(tokens / (sampled - tick)),
                       "training_tokens_per_second": np.float32(tokens * self.grpo.num_iterations
                                                                / (trained - sampled))}
