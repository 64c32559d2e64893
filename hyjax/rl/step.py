"""GRPO's update: the clipped-ratio loss (`hyjax.rl.objective`) of a rollout batch through the run's
adapted model, gradients of the trainable leaves accumulated over micro-batches, one optimizer update.

A rollout batch (`hyjax.rl.rollout.rollout_batch`, stacked `[accumulation, micro_batch, T]`) holds the
prompt + completion tokens with the loss mask on completion tokens, `old_log_probs` (the sampler's, at
the same positions), `advantages [.., micro_batch]` and, with a KL penalty, `ref_log_probs`
(`token_log_probs` of the reference policy). The loss's numerator and denominator add up over
micro-batches (`aggregate_sums`), so the accumulated gradient is exactly the whole batch's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from hyjax.model import apply as model_apply
from hyjax.rl.objective import AGGREGATIONS, aggregate_sums, grpo_token_terms
from hyjax.sampling import sampling_log_probs
from hyjax.training.step import TrainState, forward_params


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The objective's settings (see `hyjax.rl.objective`): the sampling temperature the learner's
    log-probabilities use, the KL weight, the clip range and how token losses are averaged."""

    temperature: float = 1.0
    beta: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "sequence_mean"

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


def _micro_sums(model_config, lambdas: bool, objective: GRPOObjective):
    """`sums(trainable, frozen, opt_state, micro, key) -> {term: (numerator, denominator)}` of one
    micro-batch's GRPO terms (`aggregate_sums`), and its completion tokens."""

    def sums(trainable, frozen, opt_state, micro, key):
        params = forward_params(trainable, frozen, opt_state, key, lambdas)
        log_probs = token_log_probs(model_config, params, micro, objective.temperature)
        terms = grpo_token_terms(log_probs, micro["old_log_probs"], micro["advantages"],
                                 ref_log_probs=micro.get("ref_log_probs"), beta=objective.beta,
                                 clip_low=objective.clip_low, clip_high=objective.clip_high)
        mask = micro["loss_mask"]
        return ({name: aggregate_sums(value, mask, objective.aggregation) for name, value in terms.items()},
                jnp.sum(mask))

    return sums


def grpo_batch_loss(model_config, lambdas: bool, objective: GRPOObjective):
    """`loss(trainable, frozen, opt_state, batch, key)`: the GRPO loss of a rollout batch by forward passes
    alone (micro-batch i with key `fold_in(key, i)`, as the update's), for the ZO + FO hybrid's SPSA
    estimates (`hyjax.optim.zeroth_order.zeroth_order_step`)."""
    sums = _micro_sums(model_config, lambdas, objective)

    def batch_loss(trainable, frozen, opt_state, batch, key):
        def add(carry, inputs):
            index, micro = inputs
            terms, _ = sums(trainable, frozen, opt_state, micro, jax.random.fold_in(key, index))
            numerator, denominator = terms["loss"]
            return (carry[0] + numerator, carry[1] + denominator), None

        accumulation = batch["tokens"].shape[0]
        (numerator, denominator), _ = jax.lax.scan(add, (jnp.float32(0), jnp.float32(0)),
                                                   (jnp.arange(accumulation), batch))
        return numerator / jnp.maximum(denominator, 1.0)

    return batch_loss


def grpo_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule, lambdas: bool,
              objective: GRPOObjective):
    """`step(state, frozen, batch, key) -> (state, metrics)`: one optimizer update on a rollout batch
    (`state.step`, counting sampled batches, is left to the caller: a batch may get several updates).

    Metrics: loss, kl (with `ref_log_probs` in the batch), clip_fraction, ratio (mean importance ratio:
    1 on a batch's first update), grad_norm, learning_rate, completion_tokens, skipped."""

    sums_of = _micro_sums(model_config, lambdas, objective)

    def micro_sums(trainable, frozen, opt_state, micro, key):
        sums, tokens = sums_of(trainable, frozen, opt_state, micro, key)
        return sums["loss"][0], ({name: numerator for name, (numerator, _) in sums.items()}, sums["loss"][1], tokens)

    grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict, key: jax.Array):
        def accumulate(carry, inputs):
            grads, numerators, denominator, tokens = carry
            index, micro = inputs
            (_, (micro_numerators, micro_denominator, micro_tokens)), micro_grads = grad_fn(
                state.trainable, frozen, state.opt_state, micro, jax.random.fold_in(key, index))
            return (jax.tree.map(jnp.add, grads, micro_grads), jax.tree.map(jnp.add, numerators, micro_numerators),
                    denominator + micro_denominator, tokens + micro_tokens), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
        names = ["loss", "clipped", "ratio"] + (["kl"] if "ref_log_probs" in batch else [])
        start = (zeros, {name: jnp.float32(0) for name in names}, jnp.float32(0), jnp.float32(0))
        accumulation = batch["tokens"].shape[0]
        (grads, numerators, denominator, tokens), _ = jax.lax.scan(accumulate, start,
                                                                    (jnp.arange(accumulation), batch))
        denominator = jnp.maximum(denominator, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        means = {name: value / denominator for name, value in numerators.items()}
        metrics = {"loss": means.pop("loss"), "clip_fraction": means.pop("clipped"), **means,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
                   "completion_tokens": tokens,
                   "skipped": jnp.logical_not(opt_state.last_finite).astype(jnp.int32)}
        return state.replace(trainable=trainable, opt_state=opt_state), metrics

    return step
