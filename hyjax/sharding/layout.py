"""`Layout`: a mesh and a rules table together, turning logical axes into shardings.

    layout = Layout(build_mesh(fsdp=4, tensor=2), Rules.default())
    shardings = layout.shardings(axes_tree)          # NamedSharding per array
    axes_tree = layout.fitted(abstract_tree, axes_tree)  # best-effort dimensions that do not divide stay whole
    layout.check(abstract_tree, axes_tree)           # every split dimension divides, or a clear error
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hyjax.sharding.axes import Axes
from hyjax.sharding.rules import Rules, ShardingError


def _is_axes(x) -> bool:
    return isinstance(x, Axes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run's arrays are split over its devices."""

    mesh: Mesh
    rules: Rules = Rules()

    def spec(self, names) -> P:
        """The `PartitionSpec` of logical `names` on this mesh (axes the mesh lacks are dropped)."""
        names = names.names if isinstance(names, Axes) else tuple(names)
        present = set(self.mesh.axis_names)
        spec = self.rules.spec(names)
        parts = []
        for part in spec:
            axes = () if part is None else (part,) if isinstance(part, str) else tuple(part)
            axes = tuple(a for a in axes if a in present)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*parts)

    def sharding(self, names) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    def shardings(self, axes_tree: Any) -> Any:
        """A `NamedSharding` for every `Axes` leaf of `axes_tree` (same structure)."""
        return jax.tree.map(self.sharding, axes_tree, is_leaf=_is_axes)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def ways(self, name: str) -> int:
        """Into how many parts a dimension named `name` is split."""
        return math.prod(self.mesh.shape[a] for a in self.rules.mesh_axes(name) if a in self.mesh.shape)

    def ways_of(self, part) -> int:
        """Into how many parts one entry of a `PartitionSpec` (None, a mesh axis or several) splits."""
        mesh_axes = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        return math.prod(self.mesh.shape[a] for a in mesh_axes)

    def fitted(self, abstract: Any, axes_tree: Any) -> Any:
        """`axes_tree` with every dimension of a `best_effort` array whose size does not divide by its
        mesh axes left unnamed (whole), or, named by a tuple, named by its longest prefix that divides;
        first dimension first, so a mesh axis it frees can split a later dimension. Other arrays are
        unchanged (`check` reports theirs)."""
        def divides(names, dim, size) -> bool:
            return size % self.ways_of(self.spec(names[:dim + 1])[dim]) == 0

        def fit(leaf, axes: Axes) -> Axes:
            if not axes.best_effort:
                return axes
            names = list(axes.names)
            for dim, size in enumerate(leaf.shape):
                name = names[dim]
                if isinstance(name, tuple):
                    choices = [name[:k] or None for k in range(len(name), -1, -1)]
                else:
                    choices = [name, None]
                names[dim] = next(c for c in choices if c is None or divides([*names[:dim], c], dim, size))
            return dataclasses.replace(axes, names=tuple(names))

        return jax.tree.map(fit, abstract, axes_tree, is_leaf=_is_axes)

    def check(self, abstract: Any, axes_tree: Any, what: str = "") -> None:
        """Raises `ShardingError` naming the array, dimension and mesh axes when a split dimension does
        not divide by its mesh axes' size."""
        leaves = jax.tree_util.tree_leaves_with_path(abstract)
        axes = jax.tree.leaves(axes_tree, is_leaf=_is_axes)
        if len(leaves) != len(axes):
            raise ValueError(f"{what}: {len(leaves)} arrays but {len(axes)} axis annotations")
        for (path, leaf), names in zip(leaves, axes):
            spec = self.spec(names)
            for dim, (size, part, name) in enumerate(zip(leaf.shape, spec, names.names)):
                if part is None:
                    continue
                mesh_axes = (part,) if isinstance(part, str) else tuple(part)
                ways = self.ways_of(part)
                if size % ways:
                    where = f"{what}{jax.tree_util.keystr(path)}"
                    sizes = " x ".join(f"{a} {self.mesh.shape[a]}" for a in mesh_axes)
                    raise ShardingError(
                        f"{where} has shape {tuple(leaf.shape)}: dimension {dim} ({name}, size {size}) does not "
                        f"divide by mesh axes {sizes} = {ways}; choose mesh sizes that divide {size}, or map "
                        f"{name!r} to other mesh axes with mesh.rules")

    def process_rows(self, rows: int) -> tuple[int, int]:
        """`(index, count)` of this process's part of a batch of `rows` split like `batch`: processes
        whose devices hold the same rows (tensor parallelism across hosts) read the same data."""
        sharding = NamedSharding(self.mesh, self.spec(("batch",)))
        held = set()
        for device, index in sharding.devices_indices_map((rows,)).items():
            if device.process_index == jax.process_index():
                held.add(index[0].indices(rows)[:2])
        starts = sorted(held)
        first, last = starts[0][0], max(stop for _, stop in starts)
        size = last - first
        if sum(stop - start for start, stop in starts) != size or rows % size or first % size:
            raise ShardingError(f"this process's devices hold rows {starts} of the batch, not one contiguous "
                                "block; put each process's devices on the data/fsdp axes together")
        return first // size, rows // size


def put_local(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a full host copy (every process holds the same `host`), each device taking
    its own slice: no device ever receives the whole array unless its sharding says so."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
