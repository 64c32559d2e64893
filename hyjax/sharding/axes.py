"""Logical axis names (`Axes`) of the arrays a training step holds, beyond the parameters' own:
optimizer state and batches.

Parameters carry theirs from the model (`hyjax.model.logical_axes`) and, adapted, from the adapter's
`AXES` table (`hyjax.adapters.axes`). Optimizer-state leaves mirror the trainable leaf they belong to
(Adam's moments); everything else there (step counts, hybrid lambdas) is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Axes:
    """The logical names of one array's dimensions (None: no name, replicated). A pytree leaf.

    best_effort: a dimension whose size does not divide by its mesh axes stays whole instead of being
    an error (`Layout.fitted`): adapter arrays, whose own small axes (a rank, a block's entries) borrow
    their base weight's mesh axes where they divide.
    """

    names: tuple[str | None, ...]
    best_effort: bool = False


def replicated(ndim: int) -> Axes:
    return Axes((None,) * ndim)


def optimizer_state_axes(opt_state: Any, trainable: Any, trainable_axes: Any) -> Any:
    """`Axes` for every leaf of an optimizer state (abstract or real): a leaf whose key path ends with
    a trainable leaf's path and has its shape gets that leaf's axes; any other leaf is replicated."""
    known = {}
    for (path, leaf), axes in zip(jax.tree_util.tree_leaves_with_path(trainable),
                                  jax.tree.leaves(trainable_axes, is_leaf=lambda x: isinstance(x, Axes))):
        known[tuple(path)] = (tuple(leaf.shape), axes)

    def leaf_axes(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            match = known.get(path[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated(len(leaf.shape))

    return jax.tree_util.tree_map_with_path(leaf_axes, opt_state)


BATCH_AXES = Axes(("accum", "batch", "seq"))  # [accumulation, micro_batch, T] arrays of a training batch
