"""The jitted training step: loss over the answer tokens, gradients of the trainable leaves only,
gradient accumulation over micro-batches, and the optimizer update.

The loss of a step is the mean cross-entropy over every answer token of the global batch:

    loss = sum_{micro-batches m} sum_{tokens t in m} mask_t * nll_t  /  sum_m sum_t mask_t

so accumulating over micro-batches, or splitting the batch over devices and processes, computes the
same quantity as one pass over the whole batch (only the summation order differs).

Every objective's update is `objective_update`: `accumulated_update` of the objective's micro-batch
sums (numerator and denominator of its loss, as above; the supervised `AnswerObjective`'s are
`answer_sums`, GRPO's `hyjax.rl.step.grpo_sums`), extended by the method's own weights when it has
some (`Method.own_weights(...).wrap`: the ZO + FO hybrid's SPSA on the base weights at the same point,
on `forward_loss` of the same sums). A supervised run's step is that update `seeded`, which gives each
step its randomness (`make_train_step`; `hyjax.training.run_plan.RunPlan.train_step` jits it).

The method sets what its forward reads from the optimizer state into the tree before every forward
(`Method.forward_state`, `Method.with_forward_state`: the hybrid's per-layer mix); `method` None below is a
method with no such state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import struct

from hyjax import adapters
from hyjax.data.loss import batch_log_likelihood
from hyjax.methods import Method, OwnWeights
from hyjax.model import apply as model_apply


class TrainState(struct.PyTreeNode):
    """Everything a step changes: the optimizer steps taken, the trainable adapter parameters, the
    optimizer state (with the method's forward state, e.g. the hybrid's per-layer mix), the run's base random
    key (raw uint32[2]) and the weights the method trains itself (`Method.own_weights`: the ZO + FO
    hybrid's base weights; None otherwise)."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array
    base: Any = None

    @classmethod
    def create(cls, trainable, optimizer: optax.GradientTransformation, seed: int, base=None) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                   rng=jax.random.PRNGKey(seed), base=base)


def forward_params(trainable, frozen, opt_state, key: jax.Array | None, method: Method | None) -> dict:
    """The adapted parameter tree the model runs with: trainable and frozen parts joined, fresh dropout
    randomness (`key`; None: dropout off) and the method's forward state taken from the optimizer
    state (the hybrid's per-layer mix)."""
    params = adapters.with_rng(adapters.combine(trainable, frozen), key)
    if method is not None:
        params = method.with_forward_state(params, method.forward_state(opt_state))
    return params


def policy_params(trainable, base, forward_state, frozen: dict, method: Method | None,
                  own_weights: OwnWeights | None) -> dict:
    """The adapted parameter tree of a policy, dropout off: its trainable values joined with `frozen`
    and with the method's own weights `base` (which `frozen` lacks when it has some), its forward state
    set into it. A state's (`state_params`) and GRPO's reference policy's."""
    if own_weights is not None:
        frozen = own_weights.join(base, frozen)
    params = adapters.with_rng(adapters.combine(trainable, frozen), None)
    return params if method is None else method.with_forward_state(params, forward_state)


def state_params(state: TrainState, frozen: dict, method: Method | None, own_weights: OwnWeights | None) -> dict:
    """The adapted parameter tree of a state, dropout off (for evaluation and export)."""
    forward_state = None if method is None else method.forward_state(state.opt_state)
    return policy_params(state.trainable, state.base, forward_state, frozen, method, own_weights)


def answer_nll_sum(model_config, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """`(sum of -log p over answer tokens, number of answer tokens)` of one batch, with the final norm,
    head and log-softmax at the batch's loss positions only (`batch_log_likelihood`)."""
    logits_fn = functools.partial(model_apply, model_config, params)
    total = -jnp.sum(batch_log_likelihood(logits_fn, batch))
    return total, jnp.sum(batch["loss_mask"].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class AnswerLoss:
    """Mean cross-entropy over the answer tokens of a batch, as a hashable callable (the loss of
    `adapters.estimate_gradients`, which compiles once per loss function)."""

    model_config: Any

    def __call__(self, params: dict, batch: dict) -> jax.Array:
        total, count = answer_nll_sum(self.model_config, params, batch)
        return total / jnp.maximum(count, 1.0)


@dataclasses.dataclass(frozen=True)
class AnswerObjective:
    """The supervised objective (`train.objective: sft`): the mean cross-entropy over the answer
    tokens of each batch (`answer_sums`), one optimizer update per batch. An objective gives `plan_run`
    its micro-batch sums, the arrays its batches hold beyond `BATCH_DTYPES`' and whether its update
    counts the run's steps (GRPO's, `hyjax.rl.step.GRPOObjective`, counts sampled batches itself)."""

    counts_step: ClassVar[bool] = True
    batch_fields: ClassVar[dict[str, Any]] = {}

    def micro_sums(self, model_config):
        return answer_sums(model_config)


def answer_sums(model_config):
    """The supervised objective's micro-batch sums: `sums(params, micro) -> (numerator, denominator,
    metric numerators, metric sums)` with the answer tokens' summed negative log-likelihood over their
    count (`answer_nll_sum`) and the count reported as `answer_tokens`."""

    def sums(params, micro):
        nll, tokens = answer_nll_sum(model_config, params, micro)
        return nll, tokens, {}, {"answer_tokens": tokens}

    return sums


def forward_loss(micro_sums, method: Method | None):
    """`loss(trainable, frozen, opt_state, batch, key)`: an objective's loss of a whole
    `[accumulation, micro_batch, ...]` batch by forward passes alone (micro-batch i with dropout key
    `fold_in(key, i)`, as the gradient's): its numerators and denominators summed over micro-batches,
    then divided (for the ZO + FO hybrid's SPSA estimates)."""

    def batch_loss(trainable, frozen, opt_state, batch, key):
        def add(carry, inputs):
            index, micro = inputs
            params = forward_params(trainable, frozen, opt_state, jax.random.fold_in(key, index), method)
            numerator, denominator, _, _ = micro_sums(params, micro)
            return (carry[0] + numerator, carry[1] + denominator), None

        accumulation = batch["tokens"].shape[0]
        (total, count), _ = jax.lax.scan(add, (jnp.float32(0), jnp.float32(0)), (jnp.arange(accumulation), batch))
        return total / jnp.maximum(count, 1.0)

    return batch_loss


def accumulated_update(micro_sums, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                       method: Method | None, *, counts_step: bool = True):
    """`step(state, frozen, batch, key) -> (state, metrics)`: one optimizer update of any objective.

    `micro_sums(params, micro) -> (numerator, denominator, metric numerators, metric sums)` is the
    objective's micro-batch loss: the batch's loss is sum(numerators) / sum(denominators) over its
    micro-batches, so accumulating gives exactly the whole batch's gradient. Gradients of the trainable
    leaves are accumulated in float32 over the micro-batches (micro-batch i with dropout key
    `fold_in(key, i)`), divided by the summed denominator, cast to each parameter's dtype, clipped and
    applied by `optimizer`. `counts_step=False` leaves `state.step` to the caller (GRPO counts sampled
    batches, each of which may get several updates).

    Metrics: loss, each metric numerator over the summed denominator, each metric sum, grad_norm
    (before clipping), learning_rate, and `skipped` (1 when the gradient was not finite and the update
    was skipped)."""

    def loss_of(trainable, frozen, opt_state, micro, key):
        numerator, denominator, means, sums = micro_sums(forward_params(trainable, frozen, opt_state, key, method),
                                                         micro)
        return numerator, (denominator, means, sums)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict, key: jax.Array):
        def accumulate(carry, inputs):
            index, micro = inputs
            micro_values, micro_grads = grad_fn(state.trainable, frozen, state.opt_state, micro,
                                                jax.random.fold_in(key, index))
            grads, values = carry
            return (jax.tree.map(jnp.add, grads, micro_grads), jax.tree.map(jnp.add, values, micro_values)), None

        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(loss_of, state.trainable, frozen, state.opt_state, first, key)
        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable),  # accumulate in float32
                 jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes))
        accumulation = batch["tokens"].shape[0]
        (grads, (total, (denominator, means, sums))), _ = jax.lax.scan(accumulate, zeros,
                                                                       (jnp.arange(accumulation), batch))
        denominator = jnp.maximum(denominator, 1.0)
        # The optimizer sees gradients in each parameter's own dtype (its state has that dtype too).
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": total / denominator, **{name: value / denominator for name, value in means.items()},
                   **sums, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
                   "skipped": jnp.logical_not(opt_state.last_finite).astype(jnp.int32)}
        state = state.replace(trainable=trainable, opt_state=opt_state)
        return (state.replace(step=state.step + 1) if counts_step else state), metrics

    return step


def objective_update(objective, model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                     method: Method | None = None, own_weights: OwnWeights | None = None):
    """`update(state, frozen, batch, key) -> (state, metrics)`: one optimizer update of `objective`'s loss
    (`accumulated_update` of its micro-batch sums), extended to the method's own weights when it has
    some (`OwnWeights.wrap`, on the same loss by forward passes; then `state.base` holds them and
    `frozen` the rest)."""
    sums = objective.micro_sums(model_config)
    update = accumulated_update(sums, optimizer, schedule, method, counts_step=objective.counts_step)
    if own_weights is not None:
        update = own_weights.wrap(update, forward_loss(sums, method))
    return update


def seeded(step):
    """`step(state, frozen, batch)` of a `step(state, frozen, batch, key)`: the key of a step is the
    run's key folded with the step number, so a resumed run draws what an uninterrupted one does."""

    def seeded_step(state: TrainState, frozen: dict, batch: dict):
        return step(state, frozen, batch, jax.random.fold_in(state.rng, state.step))

    return seeded_step


def make_train_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    method: Method | None = None, own_weights: OwnWeights | None = None):
    """`step(state, frozen, batch) -> (state, metrics)`, not yet jitted: the supervised update
    (`objective_update` of `AnswerObjective`; metrics add `answer_tokens`) with the step's randomness.
    `batch` holds `[accumulation, micro_batch, T]` arrays (tokens, targets, loss_mask, segment_ids,
    positions)."""
    return seeded(objective_update(AnswerObjective(), model_config, optimizer, schedule, method, own_weights))


def make_eval_step(model_config, method: Method | None = None, own_weights: OwnWeights | None = None):
    """`eval_step(state, frozen, batch) -> (sum of answer-token nll, answer tokens)` on `[B, T]` arrays,
    dropout off."""

    def eval_step(state: TrainState, frozen: dict, batch: dict):
        return answer_nll_sum(model_config, state_params(state, frozen, method, own_weights), batch)

    return eval_step
