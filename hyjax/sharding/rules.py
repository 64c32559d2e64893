"""The rules table: which mesh axes each logical axis name is split over.

Every array the run holds names its dimensions with logical axes (`('layers', 'embed', 'heads')` for
q_proj, `('accum', 'batch', 'seq')` for a batch); one ordered table maps each name to mesh axes
(`data`, `fsdp`, `tensor`). Changing how a model is split means changing this table (or overriding
entries with `mesh.rules`), never the model code.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable

from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names and the mesh axes they are split over by default:
#   batch over data and fsdp (FSDP shards the batch like data parallelism, and the weights too);
#   the embedding dimension of weights over fsdp (ZeRO-3 style: gathered per layer for the matmul);
#   heads, kv_heads, mlp and vocab over tensor (Megatron-style column/row parallel projections);
#   layers (the scan axis) and sequence replicated. Adapter arrays use their base weight's names
#   (hyjax.adapters.axes).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("layers", ()),
    ("seq", ()),
    ("accum", ()),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


class ShardingError(ValueError):
    """A mesh or rules table that cannot split the model as asked."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """An immutable logical-name -> mesh-axes table (`Rules.default().override([...])`)."""

    table: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    @classmethod
    def default(cls) -> "Rules":
        return cls()

    def override(self, entries: Iterable[tuple[str, Iterable[str]]]) -> "Rules":
        """This table with the given `(logical name, mesh axes)` entries replaced; names and mesh axes
        are checked (an empty list of mesh axes replicates that dimension)."""
        table = dict(self.table)
        for name, axes in entries:
            if name not in table:
                close = difflib.get_close_matches(name, LOGICAL_AXES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ShardingError(f"mesh.rules names logical axis {name!r}, which is not one of "
                                    f"{list(LOGICAL_AXES)}{hint}")
            axes = tuple(axes)
            for axis in axes:
                if axis not in MESH_AXES:
                    raise ShardingError(f"mesh.rules maps {name!r} to {axis!r}, which is not a mesh axis; "
                                        f"mesh axes are {list(MESH_AXES)}")
            table[name] = axes
        return Rules(tuple(table.items()))

    def mesh_axes(self, name: str | tuple[str, ...] | None) -> tuple[str, ...]:
        """The mesh axes of one logical name, or of several in order for a dimension named by a tuple
        (None and unknown names: replicated)."""
        if isinstance(name, tuple):
            return tuple(axis for part in name for axis in self.mesh_axes(part))
        return dict(self.table).get(name, ()) if name is not None else ()

    def spec(self, names: Iterable[str | tuple[str, ...] | None]) -> P:
        """The `PartitionSpec` of an array whose dimensions carry `names` (a tuple of names splits one
        dimension over all their mesh axes). A mesh axis already used by an earlier dimension is not used
        again (an array can be split over each mesh axis once)."""
        used: set[str] = set()
        parts = []
        for name in names:
            axes = tuple(dict.fromkeys(axis for axis in self.mesh_axes(name) if axis not in used))
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*parts)
