"""Logical axis names of everything a training step holds: base weights, adapter parameters,
optimizer state and batches.

Base weights carry their names from the model (`hyjax.model.logical_axes`). An adapted weight's
arrays take theirs from the method's `AXES` table, written per 2-D matrix with `in`/`out` standing for
the base weight's own input and output names, behind the base weight's leading (`layers`) names: a
LoRA factor of a scanned q_proj is `('layers', 'embed', 'adapter_rank')`, so adapters are split like
the weights they adapt, scan axis included. Optimizer-state leaves mirror the trainable leaf they
belong to (Adam's moments); everything else there (step counts, hybrid lambdas) is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Axes:
    """The logical names of one array's dimensions (None: no name, replicated). A pytree leaf."""

    names: tuple[str | None, ...]


def replicated(ndim: int) -> Axes:
    return Axes((None,) * ndim)


def _lookup(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def adapted_axes(tree: dict, base_axes: dict) -> dict:
    """`Axes` for every array of a (possibly adapted) parameter tree, given the model's `base_axes`
    (`Axes` or tuples of names per base weight)."""
    from hyjax.adapters.node import AdaptedWeight  # the model imports this package: adapters come later
    from hyjax.adapters.targets import map_paths

    def leaf_axes(path: str, leaf):
        names = _lookup(base_axes, path)
        names = names.names if isinstance(names, Axes) else tuple(names)
        if not isinstance(leaf, AdaptedWeight):
            return Axes(names)
        lead, (d_in, d_out) = names[:-2], (names[-2:] if len(names) >= 2 else (None, None))
        fields = {"base": Axes(names)}  # full fine-tuning also wraps 1-D weights (norms)
        for field in dataclasses.fields(leaf):
            value = getattr(leaf, field.name)
            if field.name == "base" or value is None or not field.metadata.get("pytree_node", True):
                continue
            per_matrix = tuple({"in": d_in, "out": d_out}.get(n, n) for n in leaf.AXES.get(field.name, ()))
            fields[field.name] = jax.tree.map(
                lambda x, per_matrix=per_matrix: Axes(
                    lead + per_matrix + (None,) * (x.ndim - len(lead) - len(per_matrix))), value)
        return leaf.replace(**fields)

    return map_paths(leaf_axes, tree)


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
