"""Optax transforms specific to hyjax's adapters."""

from hyjax.optim.hybrid_weights import HybridWeightsState, current_lambdas, hybrid_weights

__all__ = ["HybridWeightsState", "current_lambdas", "hybrid_weights"]
