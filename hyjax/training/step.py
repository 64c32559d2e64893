"""The jitted training step: loss over the answer tokens, gradients of the trainable leaves only,
gradient accumulation over micro-batches, and the optimizer update.

The loss of a step is the mean cross-entropy over every answer token of the global batch:

    loss = sum_{micro-batches m} sum_{tokens t in m} mask_t * nll_t  /  sum_m sum_t mask_t

so accumulating over micro-batches, or splitting the batch over devices and processes, computes the
same quantity as one pass over the whole batch (only the summation order differs).

Every objective's update is `accumulated_update` of its micro-batch sums (numerator and denominator of
its loss, as above): the supervised step is `first_order_step` (`answer_sums`), GRPO's is
`hyjax.training.grpo.grpo_step`. A run's step is that update, optionally wrapped by
`hyjax.optim.zeroth_order.zeroth_order_step` (the ZO + FO hybrid: SPSA on the base weights at the same
point, on `forward_loss` of the same sums), and `seeded`, which gives each step its randomness.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from hyjax import adapters
from hyjax.adapters.hybrid import set_lambdas
from hyjax.data.loss import batch_log_likelihood
from hyjax.model import apply as model_apply
from hyjax.optim import current_lambdas
from hyjax.optim.zeroth_order import ZerothOrder, join_base, zeroth_order_step


class TrainState(struct.PyTreeNode):
    """Everything a step changes: the optimizer steps taken, the trainable adapter parameters, the
    optimizer state (hybrid lambdas included), the run's base random key (raw uint32[2]) and, for the
    ZO + FO hybrid, the base weights its zeroth-order updates train (None otherwise)."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array
    base: Any = None

    @classmethod
    def create(cls, trainable, optimizer: optax.GradientTransformation, seed: int, base=None) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                   rng=jax.random.PRNGKey(seed), base=base)


def forward_params(trainable, frozen, opt_state, key: jax.Array | None, lambdas: bool) -> dict:
    """The adapted parameter tree the model runs with: trainable and frozen parts joined, fresh dropout
    randomness (`key`; None: dropout off) and, with `lambdas` (the hybrid), the per-layer mixing
    weights held in the optimizer state."""
    params = adapters.with_rng(adapters.combine(trainable, frozen), key)
    if lambdas:
        params = set_lambdas(params, current_lambdas(opt_state))
    return params


def state_params(state: TrainState, frozen: dict, lambdas: bool) -> dict:
    """The adapted parameter tree of a state, dropout off (for evaluation and export)."""
    return forward_params(state.trainable, join_base(state.base, frozen), state.opt_state, None, lambdas)


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


def answer_sums(model_config):
    """The supervised objective's micro-batch sums: `sums(params, micro) -> (numerator, denominator,
    metric numerators, metric sums)` with the answer tokens' summed negative log-likelihood over their
    count (`answer_nll_sum`) and the count reported as `answer_tokens`."""

    def sums(params, micro):
        nll, tokens = answer_nll_sum(model_config, params, micro)
        return nll, tokens, {}, {"answer_tokens": tokens}

    return sums


def forward_loss(micro_sums, lambdas: bool):
    """`loss(trainable, frozen, opt_state, batch, key)`: an objective's loss of a whole
    `[accumulation, micro_batch, ...]` batch by forward passes alone (micro-batch i with dropout key
    `fold_in(key, i)`, as the gradient's): its numerators and denominators summed over micro-batches,
    then divided (for the ZO + FO hybrid's SPSA estimates)."""

    def batch_loss(trainable, frozen, opt_state, batch, key):
        def add(carry, inputs):
            index, micro = inputs
            params = forward_params(trainable, frozen, opt_state, jax.random.fold_in(key, index), lambdas)
            numerator, denominator, _, _ = micro_sums(params, micro)
            return (carry[0] + numerator, carry[1] + denominator), None

        accumulation = batch["tokens"].shape[0]
        (total, count), _ = jax.lax.scan(add, (jnp.float32(0), jnp.float32(0)), (jnp.arange(accumulation), batch))
        return total / jnp.maximum(count, 1.0)

    return batch_loss


def make_batch_loss(model_config, lambdas: bool):
    """The step's mean answer-token loss by forward passes alone (`forward_loss` of `answer_sums`)."""
    return forward_loss(answer_sums(model_config), lambdas)


def accumulated_update(micro_sums, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                       lambdas: bool, *, counts_step: bool = True):
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
        numerator, denominator, means, sums = micro_sums(forward_params(trainable, frozen, opt_state, key, lambdas),
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


def first_order_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                     lambdas: bool):
    """The supervised update: `accumulated_update` of the answer tokens' loss (`answer_sums`); its
    metrics add `answer_tokens`."""
    return accumulated_update(answer_sums(model_config), optimizer, schedule, lambdas)


def seeded(step):
    """`step(state, frozen, batch)` of a `step(state, frozen, batch, key)`: the key of a step is the
    run's key folded with the step number, so a resumed run draws what an uninterrupted one does."""

    def seeded_step(state: TrainState, frozen: dict, batch: dict):
        return step(state, frozen, batch, jax.random.fold_in(state.rng, state.step))

    return seeded_step


def make_train_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    lambdas: bool, zeroth_order: ZerothOrder | None = None):
    """`step(state, frozen, batch) -> (state, metrics)`, not yet jitted: the first-order step, wrapped
    by the ZO + FO hybrid's SPSA part when `zeroth_order` is given (then `state.base` holds the base
    weights it trains and `frozen` the rest), with the step's randomness. `batch` holds
    `[accumulation, micro_batch, T]` arrays (tokens, targets, loss_mask, segment_ids, positions)."""
    step = first_order_step(model_config, optimizer, schedule, lambdas)
    if zeroth_order is not None:
        step = zeroth_order_step(step, make_batch_loss(model_config, lambdas), zeroth_order)
    return seeded(step)


def make_eval_step(model_config, lambdas: bool):
    """`eval_step(state, frozen, batch) -> (sum of answer-token nll, answer tokens)` on `[B, T]` arrays,
    dropout off."""

    def eval_step(state: TrainState, frozen: dict, batch: dict):
        return answer_nll_sum(model_config, state_params(state, frozen, lambdas), batch)

    return eval_step
