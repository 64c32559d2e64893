"""Logical axis names of every array of an adapted parameter tree.

Base weights carry their names from the model (`hyjax.model.logical_axes`). An adapted weight's
arrays take theirs from the method's `AXES` table, written per 2-D matrix with `in`/`out` standing for
the base weight's own input and output names, behind the base weight's leading (`layers`) names; "in+out"
names a dimension by both (split over d_in's mesh axes, then d_out's) and "out+in" the other way round.
The tables give each adapter array every mesh axis its weight is split over: the axis that runs along
d_in or d_out first takes its own base axis's mesh axes and then the other's, and an adapter's own
small axis (a LoRA rank, a BOFT block's entries) takes whatever is left. LoRA's A of a scanned q_proj is
`('layers', ('embed', 'heads'), 'heads')`: its d_in rows split over fsdp and tensor like q_proj's.

Adapter arrays are `best_effort` (`hyjax.sharding.Layout.fitted`): a dimension that its mesh axes do not
divide keeps the longest prefix of them that does, or stays whole, and the mesh axes it leaves go to its
later dimensions (rank 8 on fsdp 64: B's d_out takes fsdp after tensor), rather than failing the run.
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
            base_names = {"in": d_in, "out": d_out, "in+out": (d_in, d_out), "out+in": (d_out, d_in)}
            per_matrix = tuple(base_names.get(n, n) for n in leaf.AXES.get(field.name, ()))
            fields[field.name] = jax.tree.map(
                lambda x, per_matrix=per_matrix: Axes(
                    lead + per_matrix + (None,) * (x.ndim - len(lead) - len(per_matrix)), best_effort=True), value)
        return leaf.replace(**fields)

    return map_paths(leaf_axes, tree)
