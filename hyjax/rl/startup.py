"""The start-up gradient of a GRPO run: the methods that begin from the objective's full gradient
(Hybrid-LoRA's module scores, LoRA-GA's and the hybrid's initial factors) take it from GRPO's objective,
as Hybrid-LoRA's paper scores its modules for post-training with verifiable rewards.

The pretrained model (the policy at step 0) samples `grpo.group_size` completions of each of
`n_groups` training prompts, which the run's rewards score. Each group whose rewards differ is one
gradient batch; its loss is GRPO's at the first update of a batch (importance ratio 1, no KL term: the
policy is still the reference), whose gradient is the policy gradient

    -1/|group| sum_i A_i * mean_t grad log pi(o_i,t | q, o_i,<t)      (sequence-mean aggregation)

with A_i the group-normalised advantages. Groups whose rewards all agree have A = 0 and teach nothing;
they are left out. Keys derive from the run's seed apart from the training samples' own, so every
process draws the same completions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from hyjax.rl.objective import grpo_loss
from hyjax.rl.prompts import PromptBatches
from hyjax.rl.rewards import resolve_reward
from hyjax.rl.rollout import completion_keys, rollout_batch, sample_rollout
from hyjax.rl.step import token_log_probs
from hyjax.sampling import SamplingConfig

STARTUP_SAMPLES = 0x5A4  # folded into the seed's key: the start-up completions' keys


@dataclasses.dataclass(frozen=True)
class PolicyGradientLoss:
    """GRPO's loss of one rollout batch at ratio 1 and without the KL term, as a hashable callable
    (`adapters.estimate_gradients` compiles its gradient once)."""

    model_config: Any
    temperature: float
    aggregation: str

    def __call__(self, params: dict, batch: dict) -> jax.Array:
        log_probs = token_log_probs(self.model_config, params, batch, self.temperature)
        loss, _ = grpo_loss(log_probs, batch["old_log_probs"], batch["advantages"], batch["loss_mask"],
                            aggregation=self.aggregation)
        return loss


def policy_gradient_batches(config, model_config, params: dict, tokenizer, n_groups: int) -> list[dict]:
    """The rollout batches, one group of `grpo.group_size` completions each, that the start-up gradient
    averages over: those of `n_groups` training prompts (an order of their own, drawn from
    `data.shuffle_seed + 1`) whose rewards differ. Raises `ValueError` when none do."""
    grpo, data = config.grpo, config.data
    indices, prompt_ids, chosen = next(PromptBatches.of_run(config, tokenizer, count=n_groups,
                                                            seed=data.shuffle_seed + 1))
    keys = completion_keys(jax.random.fold_in(jax.random.key(config.train.seed), STARTUP_SAMPLES), 0, indices,
                           grpo.group_size)
    rollout = sample_rollout(model_config, params, prompt_ids, chosen, keys, tokenizer=tokenizer,
                             sampling=SamplingConfig(max_new_tokens=grpo.max_new_tokens,
                                                     temperature=grpo.temperature, top_p=grpo.top_p),
                             rewards=[(resolve_reward(name), weight) for name, weight in grpo.rewards],
                             group_size=grpo.group_size)
    taught = np.flatnonzero(rollout.rewards.std(axis=1) > 0)
    if taught.size == 0:
        raise ValueError(
            f"{config.method.name} starts from the gradient of GRPO's objective, but the rewards of all {n_groups} "
            f"groups of {grpo.group_size} completions the pretrained model sampled at start-up agree (mean reward "
            f"{rollout.rewards.mean():.3g}), so that gradient is zero: raise grpo.max_new_tokens or the groups "
            f"(method.{config.method.name}.n_batches), make the task easier, or choose a method that does not "
            "start from gradients")
    batch = rollout_batch(rollout, data.max_length, tokenizer.pad_id, bucket=data.bucket,
                          max_new_tokens=grpo.max_new_tokens)
    size = grpo.group_size
    return [{key: value[group * size:(group + 1) * size] for key, value in batch.items()} for group in taught]


def policy_gradient_sources(config, model_config, params: dict, tokenizer, n_groups: int) -> tuple[
        Iterator[dict], PolicyGradientLoss, int]:
    """`(batches, loss_fn, n_batches)` for `adapters.estimate_gradients` in a GRPO run."""
    batches = policy_gradient_batches(config, model_config, params, tokenizer, n_groups)
    loss = PolicyGradientLoss(model_config, config.grpo.temperature, config.grpo.aggregation)
    return iter(batches), loss, len(batches)
