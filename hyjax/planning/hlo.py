"""The optimized HLO text of a compiled program (`compiled.as_text()`), parsed: its computations, their
instructions, and the bytes each array takes in HBM. `hyjax.planning.cost` (FLOPs and traffic) and
`hyjax.planning.buffers` (the largest arrays) read programs through this one parser.

An instruction line is `%name = SHAPE opcode(OPERANDS), attributes`: SHAPE is one array
`f32[126,2,3328,16,16]{3,4,2,1,0:T(8,128)}` or a tuple of them. On TPU a layout carries a tiling,
`{1,0:T(8,128)(2,1)}`: the two minor dimensions are padded to whole tiles (128 lanes; 8 sublanes of
32-bit words, so 16 rows of bfloat16), and a `[..., 16, 16]` float32 array takes 8x its element count;
`S(n)` (n > 0) in a layout places the array in another memory space (TPU's on-chip memories), not HBM.
An instruction may run over several lines (a Pallas kernel's backend config printed as indented JSON):
until its braces close, the lines that follow belong to it.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](?:\{([^}]*)\})?")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%[\w.\-]+)")
_MEMORY_SPACE = re.compile(r"S\([1-9]\d*\)")
_TILE = re.compile(r"^([\d,]+)(?::T\((\d+),(\d+)\))?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# A Pallas kernel's own estimate in its custom call's backend config (numbers quoted or not, by JAX version).
_KERNEL_COST = re.compile(r'"cost_estimate"\s*:\s*\{([^}]*)\}')
_KERNEL_COST_FIELD = re.compile(r'"(\w+)"\s*:\s*"?(\d+)"?')
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
            "f64": 8, "s64": 8, "u64": 8, "c64": 8}


def padded_bytes(dtype: str, shape: tuple[int, ...], layout: str) -> int:
    """Bytes of an array in a layout `minor_to_major[:T(rows,lanes)...]`: the tiled dimensions rounded up to
    whole tiles (sub-32-bit types pack `4 / itemsize` rows per 32-bit sublane)."""
    itemsize = ITEMSIZE[dtype]
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


def hbm_bytes(dtype: str, dims: tuple[int, ...], layout: str) -> int:
    """HBM bytes of an array: its padded bytes; 0 for one placed in another memory space, and for types
    that hold no array data (token[], opaque types)."""
    if _MEMORY_SPACE.search(layout) or dtype not in ITEMSIZE:
        return 0
    return padded_bytes(dtype, dims, layout)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction."""

    name: str
    opcode: str
    arrays: tuple[tuple[str, tuple[int, ...], str], ...]  # (dtype, dims, layout) of its result (tuple: each)
    arguments: str  # what its parentheses hold: operands, a parameter's index, a constant's value
    operands: tuple[str, ...]
    attributes: str  # everything after the operand list
    called: dict  # kind (calls, to_apply, body, condition, branch_computations) -> computation names

    @property
    def bytes(self) -> int:
        """HBM bytes of its result."""
        return sum(hbm_bytes(dtype, dims, layout) for dtype, dims, layout in self.arrays)

    @property
    def elements(self) -> int:
        return sum(math.prod(dims) for _, dims, _ in self.arrays)

    @property
    def kernel_cost(self) -> dict[str, int] | None:
        """A Pallas kernel's own estimate of its work (`flops`, `transcendentals`, `bytes_accessed`: what its
        `pl.CostEstimate` said), from a custom call's backend config; None where there is none."""
        found = _KERNEL_COST.search(self.attributes)
        return None if found is None else {key: int(value) for key, value in _KERNEL_COST_FIELD.findall(found.group(1))}

    @property
    def source(self) -> str:
        """The JAX operation it came from (its `op_name` metadata), "" if none."""
        found = _OP_NAME.search(self.attributes)
        return found.group(1) if found else ""


@dataclasses.dataclass
class Module:
    """An HLO module: `{computation: {instruction name: Instruction}}`, each computation's root, and the
    entry computation."""

    computations: dict[str, dict[str, Instruction]]
    roots: dict[str, str]
    entry: str

    @classmethod
    def parse(cls, hlo_text: str) -> "Module":
        computations: dict[str, dict[str, Instruction]] = {}
        roots: dict[str, str] = {}
        entry = current = None
        for line in _joined_lines(hlo_text):
            header = _HEADER.match(line)
            if header and not line.startswith(" "):
                current = header.group(1)
                computations[current] = {}
                if line.startswith("ENTRY"):
                    entry = current
            elif line == "}":
                current = None
            elif current is not None and _NAME.match(line):
                instruction = parse_instruction(line)
                computations[current][instruction.name] = instruction
                if line.lstrip().startswith("ROOT "):
                    roots[current] = instruction.name
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        return cls(computations, roots, entry)

    def instructions(self):
        """Every instruction of every computation (fused ones included)."""
        for instructions in self.computations.values():
            yield from instructions.values()


def _joined_lines(hlo_text: str):
    """The text's lines, each instruction on one: an instruction whose braces are still open at the end of
    its line (a backend config printed as indented JSON) continues on the next lines until they close."""
    pending, depth = None, 0
    for line in hlo_text.splitlines():
        if pending is not None:
            pending += " " + line.strip()
        elif _NAME.match(line):
            pending = line
        else:
            yield line
            continue
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            yield pending
            pending, depth = None, 0
    if pending is not None:
        yield pending


def parse_instruction(line: str) -> Instruction:
    """One instruction line: `%name = SHAPE opcode(ARGUMENTS), attributes`."""
    head = _NAME.match(line)
    rest = line[head.end():]
    if rest.startswith("("):  # a tuple shape, which holds parentheses of its own
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 2:]
    else:
        shape, rest = rest.split(" ", 1)
    opcode = rest[:rest.index("(")]
    end = _closing(rest, len(opcode))
    arguments, attributes = rest[len(opcode) + 1:end], rest[end + 1:]
    called = {kind: tuple(_OPERAND.findall(value)) for kind, value in _CALLED.findall(attributes)}
    return Instruction(name=head.group(1), opcode=opcode,
                       arrays=tuple((d, tuple(int(x) for x in dims.split(",") if x), layout or "")
                                    for d, dims, layout in _ARRAY.findall(shape)),
                       arguments=arguments, operands=tuple(_OPERAND.findall(arguments)), attributes=attributes,
                       called=called)


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `text[start]`."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced parentheses in HLO: {text[:200]}")
