"""GRPO's loss of a rollout batch through the run's adapted model: the clipped-ratio loss
(`hyjax.rl.objective`) as micro-batch sums, which `hyjax.training.step.accumulated_update` turns into
one optimizer update (`hyjax.training.step.objective_update` of `GRPOObjective`).

A rollout batch (`hyjax.rl.rollout.rollout_batch`, stacked `[accumulation, micro_batch, T]`) holds the
prompt + completion tokens with the loss mask on completion tokens, `old_log_probs` (the sampler's, at
the same positions), `advantages [.., micro_batch]` and, with a KL penalty, `ref_log_probs`
(`token_log_probs` of the reference policy). The loss's numerator and denominator add up over
micro-batches (`aggregate_sums`), so the accumulated gradient is exactly the whole batch's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from hyjax.model import apply as model_apply
from hyjax.rl.objective import AGGREGATIONS, aggregate_sums, grpo_token_terms
from hyjax.sampling import sampling_log_probs


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The objective's settings (see `hyjax.rl.objective`): the sampling temperature the learner's
    log-probabilities use, the KL weight, the clip range and how token losses are averaged."""

    temperature: float = 1.0
    beta: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "sequence_mean"
    counts_step: ClassVar[bool] = False  # the run's step counts sampled batches; each may get several updates

    @property
    def batch_fields(self) -> dict[str, Any]:
        """A rollout batch's arrays beyond the supervised ones, `[accumulation, micro_batch, T]` each."""
        fields = {"old_log_probs": jnp.float32, "advantages": jnp.float32}
        return {**fields, "ref_log_probs": jnp.float32} if self.beta > 0 else fields

    def micro_sums(self, model_config):
        """`grpo_sums` of these settings."""
        return grpo_sums(model_config, self)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (GRPO samples its completions)")
        if self.beta < 0 or not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError(f"beta={self.beta}, clip_low={self.clip_low} and clip_high={self.clip_high} must be "
                             ">= 0, with clip_low < 1")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} must be one of {list(AGGREGATIONS)}")


def token_log_probs(model_config, params: dict, batch: dict, temperature: float) -> jax.Array:
    """`[B, T]` log-probabilities of the batch's targets under softmax(logits / temperature) where its
    loss mask is set (0 elsewhere); logits are computed at the `loss_positions` only."""
    index = batch["loss_positions"]
    valid = index >= 0
    index = jnp.where(valid, index, 0)
    logits = model_apply(model_config, params, batch["tokens"], batch["positions"], batch["segment_ids"], index)
    targets = jnp.take_along_axis(batch["targets"], index, axis=-1)
    picked = sampling_log_probs(logits, targets, temperature) * valid
    rows = jnp.arange(index.shape[0])[:, None]
    return jnp.zeros(batch["loss_mask"].shape, jnp.float32).at[rows, index].add(picked) * batch["loss_mask"]


def grpo_sums(model_config, objective: GRPOObjective):
    """GRPO's micro-batch sums for `hyjax.training.step.accumulated_update`: `sums(params, micro) ->
    (numerator, denominator, metric numerators, metric sums)` of the clipped-ratio loss
    (`aggregate_sums` of `grpo_token_terms`), with the clipped share, the mean ratio and, with a KL
    penalty, the KL over the same denominator, and the completion tokens."""

    def sums(params, micro):
        log_probs = token_log_probs(model_config, params, micro, objective.temperature)
        terms = grpo_token_terms(log_probs, micro["old_log_probs"], micro["advantages"],
                                 ref_log_probs=micro.get("ref_log_probs"), beta=objective.beta,
                                 clip_low=objective.clip_low, clip_high=objective.clip_high)
        mask = micro["loss_mask"]
        summed = {name: aggregate_sums(value, mask, objective.aggregation) for name, value in terms.items()}
        numerator, denominator = summed.pop("loss")
        means = {METRIC_NAMES.get(name, name): value for name, (value, _) in summed.items()}
        return numerator, denominator, means, {"completion_tokens": jnp.sum(mask)}

    return sums


# The metric each GRPO term is reported as.
METRIC_NAMES = {"clipped": "clip_fraction"}
