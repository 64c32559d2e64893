"""One GRPO rollout: G completions sampled for each prompt of a step, their rewards and advantages, laid
out as a training batch.

Completion j of prompt i at step s is drawn from `fold_in(fold_in(fold_in(key, s), i), j)` (i: the
prompt's index in the data, not its place in the batch), so a resumed run and a run of any number of
processes sample what one uninterrupted process does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyjax.data.batching import loss_slots, pad_batch, round_up
from hyjax.data.examples import Example
from hyjax.rl.objective import group_advantages
from hyjax.rl.rewards import Reward
from hyjax.sampling import SamplingConfig, generate_with_log_probs


def completion_keys(key: jax.Array, step: int, prompt_indices: Sequence[int], group_size: int) -> jax.Array:
    """`[len(prompt_indices) * group_size]` keys, completion j of prompt i at `(step, i, j)`."""
    step_key = jax.random.fold_in(key, step)
    prompt_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.asarray(prompt_indices))
    samples = jnp.arange(group_size)
    return jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, samples))(prompt_keys).reshape(-1)


@dataclasses.dataclass
class Rollout:
    """The completions of one step, prompt by prompt (each prompt's G completions together)."""

    prompts: list[list[int]]  # one per completion (each prompt G times)
    completions: list[list[int]]  # sampled tokens, the stop token included when one was sampled
    log_probs: list[list[float]]  # of each completion token under the sampling distribution
    texts: list[str]  # the completions decoded (without the stop token)
    rewards: np.ndarray  # [prompts, G]
    advantages: np.ndarray  # [prompts * G]

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def metrics(self) -> dict[str, float]:
        """Reward mean and spread, the share of groups whose rewards differ (the only ones that teach),
        and the mean completion length in tokens."""
        return {"reward": float(self.rewards.mean()), "reward_std": float(self.rewards.std()),
                "groups_with_signal": float(np.mean(self.rewards.std(axis=1) > 0)),
                "completion_tokens": float(np.mean([len(c) for c in self.completions]))}


def sample_rollout(model_config, params, prompts: Sequence[Sequence[int]], rows: Sequence[Mapping[str, Any]],
                   keys: jax.Array, *, tokenizer, sampling: SamplingConfig, rewards: Sequence[tuple[Reward, float]],
                   group_size: int) -> Rollout:
    """Samples `group_size` completions of each prompt (`keys` from `completion_keys`), scores each with
    the weighted sum of `rewards` against its data row, and normalises the advantages within each group."""
    repeated = [list(prompt) for prompt in prompts for _ in range(group_size)]
    stop_ids = sorted(tokenizer.stop_ids)
    completions, log_probs = generate_with_log_probs(model_config, params, prompts, stop_ids, keys, sampling,
                                                     pad_id=tokenizer.pad_id, keep_stop=True, copies=group_size)
    texts = [tokenizer.decode([t for t in completion if t not in stop_ids]) for completion in completions]
    scores = np.asarray([[sum(weight * float(reward(texts[i * group_size + j], row)) for reward, weight in rewards)
                          for j in range(group_size)] for i, row in enumerate(rows)], np.float32)
    advantages = np.asarray(group_advantages(jnp.asarray(scores))).reshape(-1)
    return Rollout(repeated, completions, log_probs, texts, scores, advantages)


def rollout_batch(rollout: Rollout, max_length: int, pad_id: int, *, bucket: int = 1,
                  max_new_tokens: int | None = None) -> dict[str, np.ndarray]:
    """The rollout as `[completions, T]` arrays, T the longest prompt + completion rounded up to `bucket`
    (at most `max_length`): `pad_batch`'s (the loss mask on completion tokens; logits at as many
    positions as `max_new_tokens` needs, so batches of one T compile once) plus `old_log_probs` and
    `advantages` (each completion's, repeated) at the same positions. A completion with no tokens (none
    sampled before the limit) is an all-padding row."""
    examples = [Example(tuple(p), tuple(c)) if c else None for p, c in zip(rollout.prompts, rollout.completions)]
    longest = max((len(e) for e in examples if e is not None), default=1)
    if longest > max_length:
        raise ValueError(f"a prompt and its completion take {longest} positions, over {max_length}: raise "
                         "data.max_length or lower the prompt's length or max_new_tokens")
    length = round_up(longest, bucket, max_length)
    slots = None if max_new_tokens is None else loss_slots(max_new_tokens, length)
    batch = pad_batch(examples, length, pad_id, slots)
    old = np.zeros_like(batch["loss_mask"])
    for row, (prompt, log_probs) in enumerate(zip(rollout.prompts, rollout.log_probs)):
        old[row, len(prompt) - 1:len(prompt) - 1 + len(log_probs)] = log_probs
    batch["old_log_probs"] = old
    batch["advantages"] = batch["loss_mask"] * rollout.advantages.astype(np.float32)[:, None]
    return batch
