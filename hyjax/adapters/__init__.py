"""Adapters as pure transforms of parameter trees: targeted weights become `AdaptedWeight` nodes."""

from hyjax.adapters.api import (
    AdapterSpec,
    apply,
    combine,
    count_trainable,
    merge,
    split_trainable,
    unmerge,
    with_rng,
)
from hyjax.adapters.full import FullConfig, FullWeight
from hyjax.adapters.lora import LoRAConfig, LoRAWeight
from hyjax.adapters.node import AdaptedWeight

__all__ = [
    "AdaptedWeight", "AdapterSpec", "FullConfig", "FullWeight", "LoRAConfig", "LoRAWeight", "apply", "combine",
    "count_trainable", "merge", "split_trainable", "unmerge", "with_rng",
]
