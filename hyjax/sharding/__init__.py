"""Sharding from one CPU to a pod: the mesh, logical axis names, the rules table mapping them to mesh
axes, and the shardings they give every array of a run (see DESIGN.md, principle 3)."""

from hyjax.sharding.activations import activation_sharding, constrain, on_local_tokens
from hyjax.sharding.axes import BATCH_AXES, Axes, optimizer_state_axes, replicated
from hyjax.sharding.layout import Layout, put_local
from hyjax.sharding.mesh import build_mesh, describe, resolve_shape
from hyjax.sharding.rules import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, Rules, ShardingError

__all__ = [
    "Axes", "BATCH_AXES", "DEFAULT_RULES", "LOGICAL_AXES", "Layout", "MESH_AXES", "Rules", "ShardingError",
    "activation_sharding", "build_mesh", "constrain", "describe", "on_local_tokens", "optimizer_state_axes",
    "put_local", "replicated", "resolve_shape",
]
