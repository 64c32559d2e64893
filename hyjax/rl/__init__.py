"""Reinforcement learning from verifiable rewards: GRPO's objective (`objective`)."""

from hyjax.rl.objective import AGGREGATIONS, aggregate, group_advantages, grpo_loss, k3_kl

__all__ = ["AGGREGATIONS", "aggregate", "group_advantages", "grpo_loss", "k3_kl"]
