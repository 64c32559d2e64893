"""GRPO inside `python -m hyjax.train` (`train.objective: grpo`): its step (the rollout stage: sample the
prompts' completions and reward them; then `num_iterations` of the run plan's update on GRPO's
objective, `RunPlan.train_step`), as `hyjax.training.loop.fit` runs it; the prompts come from
`hyjax.rl.prompts`, the objective's arithmetic from `hyjax.rl`.

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

from hyjax.rl.rewards import resolve_reward
from hyjax.rl.rollout import completion_keys, rollout_batch, sample_rollout
from hyjax.rl.step import token_log_probs
from hyjax.sampling import SamplingConfig
from hyjax.sharding import activation_sharding
from hyjax.training import distributed
from hyjax.training.step import TrainState, policy_params


class ReferencePolicy(NamedTuple):
    """The policy at step 0 beside the frozen weights: the trainable values then, the method's own weights
    then (zo_fo's base weights) and its forward state then (the hybrid's per-layer mix; None where a method has
    none)."""

    trainable: Any
    base: Any
    forward_state: Any

    @classmethod
    def at_start(cls, setup, state: TrainState) -> "ReferencePolicy":
        """The step-0 values the run's setup holds (`state` was built from them; its own buffers are
        donated to each step) and a copy of the fresh `state`'s forward state."""
        forward_state = jax.tree.map(jnp.copy, setup.plan.method.forward_state(state.opt_state))
        return cls(setup.trainable, setup.base, forward_state)

    def params(self, plan, frozen: dict) -> dict:
        """The reference model's parameter tree under `plan` (the run's `RunPlan`), dropout off."""
        return policy_params(self.trainable, self.base, self.forward_state, frozen, plan.method, plan.own_weights)


class GRPOStep:
    """`step(state, frozen, prompts) -> (state, metrics)` for `fit`: samples `grpo.group_size` completions
    of each prompt from the current policy, rewards them, and takes `grpo.num_iterations` updates on
    them (the state's step counts sampled batches, not updates)."""

    def __init__(self, setup, reference: ReferencePolicy | None):
        config, plan = setup.config, setup.plan
        self.setup, self.grpo = setup, config.grpo
        self.objective = plan.objective
        self.sampling = SamplingConfig(max_new_tokens=self.grpo.max_new_tokens, temperature=self.grpo.temperature,
                                       top_p=self.grpo.top_p)
        self.rewards = [(resolve_reward(name), weight) for name, weight in self.grpo.rewards]
        self.sample_key = jax.random.fold_in(jax.random.key(config.train.seed), 0x5A3)
        layout, batch_sharding = plan.layout, plan.shardings.batch
        self.update = plan.train_step()  # the plan's update of GRPO's objective, (state, frozen, batch, key)
        self.reference = None
        if reference is not None and self.grpo.beta > 0:
            self.reference = reference

            def reference_log_probs(reference, frozen, batch):
                params = reference.params(plan, frozen)
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
