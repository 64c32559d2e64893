"""GRPO's objective against a NumPy reference written from its definition (hyjax/rl/objective.py), on fixed
samples over two optimizer updates of one sampled batch (the second has ratios away from 1 and clips)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax.rl import group_advantages, grpo_loss, k3_kl

PROMPTS, GROUP, TOKENS, VOCAB = 3, 4, 6, 5


def reference_advantages(rewards: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    out = np.zeros_like(rewards, dtype=np.float64)
    for p in range(rewards.shape[0]):
        group = rewards[p].astype(np.float64)
        out[p] = (group - group.mean()) / (np.sqrt(np.mean((group - group.mean()) ** 2)) + eps)
    return out


def reference_loss(logp, old, ref, adv, mask, beta, low, high, aggregation):
    """The loss and its gradient with respect to `logp`, token by token."""
    losses, grads = np.zeros_like(logp), np.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            ratio = np.exp(logp[i, t] - old[i, t])
            unclipped, clipped = ratio * adv[i], np.clip(ratio, 1 - low, 1 + high) * adv[i]
            kl = np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            losses[i, t] = -min(unclipped, clipped) + beta * kl
            kl_grad = 1 - np.exp(ref[i, t] - logp[i, t])
            grads[i, t] = (-ratio * adv[i] if unclipped <= clipped else 0.0) + beta * kl_grad
    if aggregation == "sequence_mean":
        weights = mask / mask.sum(axis=1, keepdims=True) / mask.shape[0]
    else:
        weights = mask / mask.sum()
    return float(np.sum(losses * weights)), grads * weights


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_two_updates_of_one_batch_match_the_reference(aggregation):
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=(PROMPTS * GROUP, TOKENS, VOCAB)), jnp.float32)
    reference_logits = theta + jnp.asarray(rng.normal(scale=0.3, size=theta.shape), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (PROMPTS * GROUP, TOKENS)))
    lengths = rng.integers(2, TOKENS + 1, PROMPTS * GROUP)
    mask = jnp.asarray(np.arange(TOKENS)[None, :] < lengths[:, None], jnp.float32)
    rewards = jnp.asarray(rng.integers(0, 2, (PROMPTS, GROUP)).astype(np.float32))
    advantages = group_advantages(rewards).reshape(-1)
    np.testing.assert_allclose(advantages, reference_advantages(np.asarray(rewards)).reshape(-1), rtol=1e-5, atol=1e-6)

    def token_log_probs(logits):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]

    old = token_log_probs(theta)  # the sampling policy: the parameters before the first update
    ref = token_log_probs(reference_logits)
    kwargs = dict(beta=0.04, clip_low=0.2, clip_high=0.28, aggregation=aggregation)

    def loss_of(params):
        return grpo_loss(token_log_probs(params), old, advantages, mask, ref_log_probs=ref, **kwargs)

    clip_fractions = []
    for update in range(2):
        logp = token_log_probs(theta)
        (loss, metrics), _ = jax.value_and_grad(loss_of, has_aux=True)(theta)
        grad_logp = jax.grad(lambda lp: grpo_loss(lp, old, advantages, mask, ref_log_probs=ref, **kwargs)[0])(logp)
        want_loss, want_grad = reference_loss(*(np.asarray(x, np.float64) for x in (logp, old, ref, advantages, mask)),
                                              0.04, 0.2, 0.28, aggregation)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grad_logp, want_grad, rtol=1e-4, atol=1e-7)
        clip_fractions.append(float(metrics["clip_fraction"]))
        theta = theta - 40.0 * jax.grad(lambda p: loss_of(p)[0])(theta)  # a large step: ratios leave the clip range
    assert clip_fractions[0] == 0.0 and clip_fractions[1] > 0.05, clip_fractions


def test_the_first_update_is_the_policy_gradient():
    """rho = 1: the loss's gradient with respect to each token's log-probability is -A / (n_i * N)."""
    logp = jnp.log(jnp.asarray([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = jnp.asarray([1.5, -0.5])
    grad = jax.grad(lambda lp: grpo_loss(lp, logp, advantages, mask)[0])(logp)
    np.testing.assert_allclose(grad, [[-1.5 / 4, -1.5 / 4, 0.0], [0.5 / 6, 0.5 / 6, 0.5 / 6]], rtol=1e-6)


def test_k3_averages_to_the_exact_kl_under_the_current_policy():
    rng = np.random.default_rng(1)
    current = jax.nn.log_softmax(jnp.asarray(rng.normal(size=7)))
    reference = jax.nn.log_softmax(jnp.asarray(rng.normal(size=7)))
    exact = float(jnp.sum(jnp.exp(current) * (current - reference)))
    estimate = float(jnp.sum(jnp.exp(current) * k3_kl(current, reference)))
    np.testing.assert_allclose(estimate, exact, rtol=1e-5)
    assert float(jnp.min(k3_kl(current, reference))) >= 0


def test_a_group_whose_rewards_tie_has_no_advantage():
    advantages = group_advantages(jnp.asarray([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(advantages[0], 0.0)
    assert float(advantages[1, 1]) > 1.0 and float(advantages[1, 0]) < 0
