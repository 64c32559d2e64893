"""Adapters as pure functions of parameter trees: `apply`, `merge`, `unmerge`, `split_trainable`, `combine`.

    spec = AdapterSpec.for_method(LoRAConfig(rank=8))
    adapted = apply(spec, params, jax.random.key(0))       # targeted leaves become AdaptedWeight nodes
    trainable, frozen = split_trainable(adapted)          # gradients and optimizer state: trainable only
    logits = model.apply(config, combine(trainable, frozen), tokens)
    plain = merge(adapted)                                # a plain tree again, for export and serving
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from hyjax.adapters.node import AdaptedWeight
from hyjax.adapters.targets import (
    default_pattern,
    iter_paths,
    map_paths,
    match_rule,
    nest,
    stacked_axes,
    validate_patterns,
)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """An ordered table of `(regex over parameter paths, method config or None)` rules; first match wins."""

    rules: tuple[tuple[str, Any], ...]

    def __post_init__(self):
        validate_patterns(self.rules)

    @classmethod
    def for_method(cls, method, targets: str | Sequence[str] | None = None, frozen: Sequence[str] = (),
                   family: str = "llama") -> "AdapterSpec":
        """One method on `targets` (patterns; default: the family's table for the method), except paths
        matching a `frozen` pattern."""
        if targets is None:
            targets = [default_pattern(method.TARGETS, family)]
        elif isinstance(targets, str):
            targets = [targets]
        return cls(tuple((p, None) for p in frozen) + tuple((p, method) for p in targets))


def apply(spec: AdapterSpec, base_params: dict, key: jax.Array, gradients: dict | None = None) -> dict:
    """The parameter tree with every targeted leaf replaced by its method's adapted weight.

    `gradients` (same paths as the targets) feeds methods initialised from gradients (LoRA-GA). To
    rebuild a saved run instead, pass the `starting_values` its checkpoint kept: each such method then
    takes its start-up values from them and needs no gradient.
    Raises if no rule matches any path, listing the paths there are.
    """
    matched = []

    def adapt(path, leaf):
        method = match_rule(spec.rules, path)
        if method is None:
            return leaf
        if isinstance(leaf, AdaptedWeight):
            raise ValueError(f"{path} is already adapted ({leaf.NAME}); merge it before adapting again")
        matched.append(path)
        gradient = _lookup(gradients, path) if gradients is not None else None
        return method.init_stacked(leaf, jax.random.fold_in(key, len(matched)), gradient, stacked_axes(path))

    adapted = map_paths(adapt, base_params)
    if not matched:
        paths = [p for p, _ in iter_paths(base_params)]
        raise ValueError(f"the adapter spec's targets {[p for p, m in spec.rules if m is not None]} match no "
                         f"parameter; available paths: {paths}")
    return adapted


def merge(tree: dict) -> dict:
    """Every adapted weight replaced by the equivalent plain weight (for export and serving)."""
    return map_paths(lambda _, leaf: leaf.merged() if isinstance(leaf, AdaptedWeight) else leaf, tree)


def unmerge(merged_params: dict, adapted: dict) -> dict:
    """The adapted tree whose merge is `merged_params`: each adapter kept, its base weight recovered."""
    def recover(path, leaf):
        if isinstance(leaf, AdaptedWeight):
            return leaf.unmerge(_lookup(merged_params, path))
        return _lookup(merged_params, path)

    return map_paths(recover, adapted)


def split_trainable(tree: dict) -> tuple[dict, dict]:
    """`(trainable, frozen)`: trainable holds only adapter parameters (by path), frozen everything else."""
    trainable = nest({path: leaf.trainable() for path, leaf in iter_paths(tree)
                      if isinstance(leaf, AdaptedWeight) and leaf.TRAINABLE})
    frozen = map_paths(lambda _, leaf: leaf.frozen() if isinstance(leaf, AdaptedWeight) else leaf, tree)
    return trainable, frozen


def starting_values(tree: dict) -> dict:
    """The frozen values each adapter drew from data at start-up (its `STARTING` fields, e.g. LoRA-GA's
    initial factors), by path: what a checkpoint keeps so that `apply(..., gradients=starting_values)`
    rebuilds the same adapted tree on any mesh. Empty for methods that draw none."""
    return nest({path: leaf.starting() for path, leaf in iter_paths(tree)
                 if isinstance(leaf, AdaptedWeight) and leaf.STARTING})


def combine(trainable: dict, frozen: dict) -> dict:
    """The inverse of `split_trainable`."""
    def join(path, leaf):
        if isinstance(leaf, AdaptedWeight) and leaf.TRAINABLE:
            return leaf.replace(**_lookup(trainable, path))
        return leaf

    return map_paths(join, frozen)


def count_trainable(tree: dict) -> dict[str, int]:
    """Trainable parameters per method name, and their `total`."""
    counts: dict[str, int] = {}
    for _, leaf in iter_paths(tree):
        if isinstance(leaf, AdaptedWeight):
            size = sum(int(x.size) for x in jax.tree.leaves(leaf.trainable()))
            counts[leaf.NAME] = counts.get(leaf.NAME, 0) + size
    counts["total"] = sum(counts.values())
    return counts


def with_rng(tree: dict, key: jax.Array | None) -> dict:
    """Fresh randomness (dropout) for every adapted weight for one training step; `None` disables it."""
    index = iter(range(1 << 30))

    def refresh(_, leaf):
        if not isinstance(leaf, AdaptedWeight):
            return leaf
        return leaf.with_rng(None if key is None else jax.random.fold_in(key, next(index)))

    return map_paths(refresh, tree)


def _lookup(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree
