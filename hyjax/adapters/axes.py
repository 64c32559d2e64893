"""Logical axis names of every array of an adapted parameter tree.

Base weights carry their names from the model (`hyjax.model.logical_axes`). An adapted weight's
arrays take theirs from the method's `AXES` table, written per 2-D matrix with `in`/`out` standing for
the base weight's own input and output names, behind the base weight's leading (`layers`) names: a
LoRA factor of a scanned q_proj is `('layers', 'embed', 'adapter_rank')`, so adapters are split like
the weights they adapt, scan axis included.
"""

from __future__ import annotations

import dataclasses

import jax

from hyjax.adapters.node import AdaptedWeight
from hyjax.adapters.targets import map_paths
from hyjax.model import logical_axes
from hyjax.sharding import Axes


def base_axes(model_config) -> dict:
    """`Axes` of every base weight (the model's own logical names)."""
    return jax.tree.map(Axes, logical_axes(model_config), is_leaf=lambda x: isinstance(x, tuple))


def _lookup(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def adapted_axes(tree: dict, base_axes: dict) -> dict:
    """`Axes` for every array of a (possibly adapted) parameter tree, given the model's `base_axes`
    (`Axes` or tuples of names per base weight)."""
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
