"""Where a compiled step's bytes go: its largest arrays, read from the optimized HLO of the executable
(`hyjax.planning.hlo`).

XLA's `memory_analysis()` gives per-device totals only. The optimized HLO (`compiled.as_text()`) names
every array the step produces, with its per-device shape, its layout and the JAX operation it came
from (`op_name` metadata). `largest_buffers` reports HBM sizes with the layout's tile padding, which is
what HBM holds; an array placed in another memory space (TPU's on-chip memories) takes no HBM.

This is a reading of the program, not XLA's buffer assignment: arrays that share a buffer (a while
loop's carry and its body's parameter) are counted once by shape, layout and origin, and the list says
what is large, not how many are live at once.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hyjax.planning.hlo import ITEMSIZE, Module
from hyjax.training.optimizer import path_string

# Opcodes that name a buffer produced elsewhere rather than a new one.
_ALIASES = {"parameter", "get-tuple-element", "bitcast", "tuple", "copy-start", "copy-done", "constant"}


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One array of the compiled program, per device."""

    dtype: str
    shape: tuple[int, ...]
    layout: str
    opcode: str
    source: str  # the JAX operation behind it (op_name metadata), "" if none
    bytes: int  # with tile padding
    unpadded_bytes: int
    like: str = ""  # the step argument whose per-device shard has this shape (a gradient or moment of it)

    def to_json(self) -> dict:
        return {"gib": self.bytes / 1024**3, "unpadded_gib": self.unpadded_bytes / 1024**3,
                "array": f"{self.dtype}{list(self.shape)}", "layout": self.layout, "op": self.opcode,
                "source": self.source, "like": self.like}


def largest_buffers(hlo_text: str, count: int = 8, arguments: dict | None = None) -> list[Buffer]:
    """The `count` largest distinct arrays the program computes (see the module docstring).

    arguments: `{path: per-device shard shape}` of the step's arguments; a buffer of the same shape is
    labelled with that path (a gradient, moment or update of that array).
    """
    found: dict[tuple, Buffer] = {}
    for instruction in Module.parse(hlo_text).instructions():
        if len(instruction.arrays) != 1 or instruction.opcode in _ALIASES:
            continue
        (dtype, shape, layout), = instruction.arrays
        if not shape or not instruction.bytes:  # a scalar, a token, or an array outside HBM
            continue
        key = (dtype, shape, layout, instruction.source)
        if key not in found:
            found[key] = Buffer(dtype=dtype, shape=shape, layout=layout, opcode=instruction.opcode,
                                source=instruction.source, bytes=instruction.bytes,
                                unpadded_bytes=math.prod(shape) * ITEMSIZE[dtype],
                                like=(arguments or {}).get(shape, ""))
    return sorted(found.values(), key=lambda b: -b.bytes)[:count]


def shard_shapes(tree, shardings) -> dict[tuple[int, ...], str]:
    """`{per-device shard shape: path}` of a tree of arrays (abstract or real) and its shardings; the first
    path wins where shapes repeat."""
    shapes: dict[tuple[int, ...], str] = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
        if jnp.ndim(leaf) >= 2:
            shapes.setdefault(tuple(sharding.shard_shape(leaf.shape)), path_string(path))
    return shapes
