"""The device mesh of a run: `data x fsdp x tensor` over every device of every process.

Sizes come from the `mesh` config section; one of them may be -1 (whatever the others leave). With
`slices > 1` (several TPU slices joined by the data-centre network) the `data` axis spans the slices
and the other axes stay inside a slice, where the interconnect is fast.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from hyjax.sharding.rules import MESH_AXES, ShardingError


def check_sizes(sizes: dict[str, int]) -> None:
    """Raises `ShardingError` unless every axis size is positive or -1 (fill), with at most one -1."""
    for axis in MESH_AXES:
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise ShardingError(f"{axis}={sizes[axis]} must be a positive size or -1 (fill with the remaining "
                                "devices)")
    if sum(sizes[axis] == -1 for axis in MESH_AXES) > 1:
        raise ShardingError(f"{', '.join(f'{a}={sizes[a]}' for a in MESH_AXES)}: at most one may be -1")


def resolve_shape(sizes: dict[str, int], device_count: int) -> dict[str, int]:
    """Mesh axis sizes with a -1 filled in; raises `ShardingError` naming the sizes that do not fit."""
    check_sizes(sizes)
    unknown = [axis for axis in MESH_AXES if sizes[axis] == -1]
    known = math.prod(sizes[axis] for axis in MESH_AXES if sizes[axis] != -1)
    if unknown:
        if device_count % known:
            raise ShardingError(f"mesh sizes {sizes}: the fixed axes ({known} devices) do not divide the "
                                f"{device_count} devices")
        return {**sizes, unknown[0]: device_count // known}
    if known != device_count:
        raise ShardingError(f"mesh sizes {sizes} make {known} devices, but the run has {device_count}; "
                            "set one axis to -1 to fill the rest")
    return dict(sizes)


def build_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, slices: int = 1,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The `(data, fsdp, tensor)` mesh over `devices` (default: every device of every process).

    Devices are laid out so that neighbouring mesh positions are neighbours on the interconnect
    (`mesh_utils.create_device_mesh`) and each process holds a contiguous block of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    dims = tuple(shape[axis] for axis in MESH_AXES)
    if slices > 1:
        return Mesh(_multi_slice(dims, slices, devices), MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(dims)
    return Mesh(grid, MESH_AXES)


def _multi_slice(dims: tuple[int, int, int], slices: int, devices) -> np.ndarray:
    if dims[0] % slices:
        raise ShardingError(f"mesh.data={dims[0]} must divide by mesh.slices={slices} (data parallelism spans "
                            "the slices)")
    present = {getattr(d, "slice_index", None) for d in devices}
    if None in present or len(present) != slices:
        raise ShardingError(f"mesh.slices={slices}, but the devices come from {len(present - {None}) or 1} "
                            "slice(s); set mesh.slices to the number of TPU slices of the job")
    ici = (dims[0] // slices, dims[1], dims[2])
    return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices, allow_split_physical_axes=True)


def describe(mesh: Mesh) -> str:
    """`data 2 x fsdp 4 x tensor 1 (8 devices, 2 processes)`."""
    axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    processes = len({d.process_index for d in mesh.devices.flat})
    return f"{axes} ({mesh.size} devices, {processes} process{'es' if processes > 1 else ''})"
