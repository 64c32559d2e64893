"""Reinforcement learning from verifiable rewards: GRPO's objective (`objective`)."""

from hyjax.rl.objective import (
    AGGREGATIONS,
    aggregate,
    aggregate_sums,
    group_advantages,
    grpo_loss,
    grpo_token_terms,
    k3_kl,
)

__all__ = ["AGGREGATIONS", "aggregate", "aggregate_sums", "group_advantages", "grpo_loss", "grpo_token_terms",
           "k3_kl"]
