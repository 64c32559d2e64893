"""Where a compiled step's bytes go: its largest arrays, read from the optimized HLO of the executable.

XLA's `memory_analysis()` gives per-device totals only. The optimized HLO (`compiled.as_text()`) names
every array the step produces, with its per-device shape, its layout and the JAX operation it came
from (`op_name` metadata). On TPU a layout carries a tiling, `{1,0:T(8,128)(2,1)}`: the two minor
dimensions are padded to whole tiles (128 lanes; 8 sublanes of 32-bit words, so 16 rows of bfloat16),
and a `[..., 16, 16]` float32 array takes 8x its element count. `largest_buffers` reports sizes with
that padding, which is what HBM holds.

This is a reading of the program, not XLA's buffer assignment: arrays that share a buffer (a while
loop's carry and its body's parameter) are counted once by shape, layout and origin, and the list says
what is large, not how many are live at once.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from hyjax.training.optimizer import path_string

# `%name = f32[126,2,3328,16,16]{3,4,2,1,0:T(8,128)} opcode(...)`
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\{([^}]*)\} ([\w-]+)\(")
_TILE = re.compile(r"^([\d,]+)(?::T\((\d+),(\d+)\))?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Opcodes that name a buffer produced elsewhere rather than a new one.
_ALIASES = {"parameter", "get-tuple-element", "bitcast", "tuple", "copy-start", "copy-done", "constant"}
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8, "c64": 8}


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


def padded_bytes(dtype: str, shape: tuple[int, ...], layout: str) -> int:
    """Bytes of an array in a layout `minor_to_major[:T(rows,lanes)...]`: the tiled dimensions rounded up to
    whole tiles (sub-32-bit types pack `4 / itemsize` rows per 32-bit sublane)."""
    itemsize = _ITEMSIZE[dtype]
    dims = list(shape)
    match = _TILE.match(layout)
    if match and match.group(2) and len(dims) >= 2:
        minor_to_major = [int(i) for i in match.group(1).split(",")]
        rows, lanes = int(match.group(2)), int(match.group(3))
        rows *= max(1, 4 // itemsize)
        minor, second = minor_to_major[0], minor_to_major[1]
        dims[minor] = -(-dims[minor] // lanes) * lanes
        dims[second] = -(-dims[second] // rows) * rows
    return math.prod(dims) * itemsize


def largest_buffers(hlo_text: str, count: int = 8, arguments: dict | None = None) -> list[Buffer]:
    """The `count` largest distinct arrays the program computes (see the module docstring).

    arguments: `{path: per-device shard shape}` of the step's arguments; a buffer of the same shape is
    labelled with that path (a gradient, moment or update of that array).
    """
    found: dict[tuple, Buffer] = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        dtype, dims, layout, opcode = match.groups()
        if dtype not in _ITEMSIZE or not dims or opcode in _ALIASES:
            continue
        shape = tuple(int(d) for d in dims.split(","))
        op_name = _OP_NAME.search(line)
        source = op_name.group(1) if op_name else ""
        key = (dtype, shape, layout, source)
        if key not in found:
            found[key] = Buffer(dtype=dtype, shape=shape, layout=layout, opcode=opcode, source=source,
                                bytes=padded_bytes(dtype, shape, layout),
                                unpadded_bytes=math.prod(shape) * _ITEMSIZE[dtype],
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
