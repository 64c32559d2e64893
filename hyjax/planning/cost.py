"""FLOPs and memory traffic of a compiled program, read from its optimized HLO, every loop body counted as
often as it runs.

XLA's `cost_analysis()` counts a `while` body once, so a training step whose layers run in a scan (and
whose micro-batches run in another) is undercounted by about layers x micro-batches. This reading walks
the program instead: each computation's cost is the sum of its instructions', a `while` costs its trip
count (the constant its condition compares the counter with) times its body, a fusion's arithmetic is
that of the computation it fuses, and its memory traffic is what crosses the fusion's boundary.

Per instruction, as XLA's own analysis counts them:
  * FLOPs: `dot`, 2 x output elements x contracted elements; `convolution` (TPU's form of most matmuls),
    2 x output elements x kernel elements per output feature; 1 per output element of arithmetic
    elementwise ops and per input element of a reduction. Transcendentals (exp, log, tanh, ...) are
    counted apart. A Pallas kernel (a custom call) counts what its own `pl.CostEstimate` says, which
    XLA cannot see inside it; a custom call without one counts no FLOPs. `Cost.custom_calls` says how
    many ran.
  * Bytes: every array read and written by an instruction of a non-fused computation, with the TPU tile
    padding of its layout (`hyjax.planning.hlo.hbm_bytes`); a fusion operand that is only sliced
    inside (a layer's weights taken from the stacked weights) counts its slices, and an in-place
    `dynamic-update-slice` counts the update, not the whole buffer. A kernel counts its estimate's
    `bytes_accessed` when that is more than its operands and results (it reads some tiles more than
    once); a kernel with its inputs fused into it counts its fusion's boundary.

An estimate for a roofline, not a simulation: it does not model overlap, caches or collectives' links.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

from hyjax.planning.hlo import Instruction, Module

# Instructions that move no data of their own (names for buffers made elsewhere, markers).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
               "replica-id", "opt-barrier", "add-dependency", "while", "call", "conditional"}
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "rsqrt",
                   "sqrt", "cbrt", "power", "sine", "cosine", "tan", "atan2", "erf"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "sign", "floor",
                "ceil", "round-nearest-even", "round-nearest-afz", "remainder", "compare", "select", "clamp", "and",
                "or", "xor", "not", "convert", "is-finite", "reduce-precision"}
_SLICING = {"dynamic-slice", "slice", "gather"}


@dataclasses.dataclass
class Cost:
    """Per-device totals of a program (or part of one)."""

    flops: float = 0.0
    transcendentals: float = 0.0
    bytes: float = 0.0
    custom_calls: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.transcendentals + other.transcendentals,
                    self.bytes + other.bytes, self.custom_calls + other.custom_calls)

    def __mul__(self, times: int) -> "Cost":
        return Cost(self.flops * times, self.transcendentals * times, self.bytes * times, self.custom_calls * times)


def program_cost(hlo_text: str) -> Cost:
    """The per-device cost of the optimized HLO module `hlo_text` (`compiled.as_text()`), loops unrolled."""
    return _Program(hlo_text).cost()


class _Program:
    def __init__(self, hlo_text: str):
        module = Module.parse(hlo_text)
        self.computations, self.roots, self.entry = module.computations, module.roots, module.entry

    def cost(self) -> Cost:
        return self._computation(self.entry)

    @functools.cache
    def _computation(self, name: str) -> Cost:
        """Cost of a computation that runs on its own (not fused): its instructions' arithmetic and traffic."""
        instructions = self.computations[name]
        total = Cost()
        for instruction in instructions.values():
            op, called = instruction.opcode, instruction.called
            if op == "while":
                body, condition = called["body"][0], called["condition"][0]
                trips = self._trip_count(condition)
                total += (self._computation(body) + self._computation(condition)) * trips
            elif op == "call":
                total += sum((self._computation(c) for c in called["to_apply"]), Cost())
            elif op == "conditional":
                branches = [self._computation(c) for c in called["branch_computations"]]
                total += max(branches, key=lambda cost: cost.flops + cost.bytes)
            elif op == "fusion":
                fused = called["calls"][0]
                total += self._fused(fused) + Cost(bytes=self._fusion_traffic(instruction, instructions, fused))
            else:
                total += self._arithmetic(instruction, instructions)
                if op not in _NO_TRAFFIC and not op.endswith("-done"):
                    traffic = instruction.bytes + sum(instructions[o].bytes for o in instruction.operands
                                                      if o in instructions and not op.endswith("-start"))
                    estimate = instruction.kernel_cost or {}
                    total.bytes += max(traffic, estimate.get("bytes_accessed", 0))
        return total

    @functools.cache
    def _fused(self, name: str) -> Cost:
        """Arithmetic of a fused computation (its traffic is the fusion's)."""
        instructions = self.computations[name]
        total = Cost()
        for instruction in instructions.values():
            if instruction.opcode == "fusion":
                total += self._fused(instruction.called["calls"][0])
            else:
                total += self._arithmetic(instruction, instructions)
        return total

    def _arithmetic(self, instruction: Instruction, scope: dict[str, Instruction]) -> Cost:
        op = instruction.opcode
        if op == "custom-call":
            estimate = instruction.kernel_cost or {}
            return Cost(flops=float(estimate.get("flops", 0)), transcendentals=float(estimate.get("transcendentals", 0)),
                        custom_calls=1)
        if op == "dot":
            lhs = _dims(scope, instruction.operands[0])
            contracted = math.prod(lhs[i] for i in _int_list(instruction.attributes, "lhs_contracting_dims"))
            return Cost(flops=2.0 * instruction.elements * contracted)
        if op == "convolution":
            return Cost(flops=2.0 * _convolution_macs(instruction, scope))
        if op in _TRANSCENDENTAL:
            return Cost(transcendentals=float(instruction.elements))
        if op in _ELEMENTWISE:
            return Cost(flops=float(instruction.elements))
        if op in ("reduce", "reduce-window"):
            return Cost(flops=float(math.prod(_dims(scope, instruction.operands[0]))))
        return Cost()

    def _fusion_traffic(self, fusion: Instruction, scope: dict[str, Instruction], fused: str) -> float:
        """Bytes a fusion reads and writes: each operand as the fused computation uses it, and its result."""
        inner = self.computations[fused]
        root = inner[self.roots[fused]]
        parameters = _parameters(inner)
        in_place, written = set(), 0.0
        for output in (root.operands if root.opcode == "tuple" else (root.name,)):
            result = inner[_through_bitcasts(inner, output)]
            if result.opcode == "dynamic-update-slice":  # writes the update into a buffer it aliases
                in_place.add(_through_bitcasts(inner, result.operands[0]))
                written += inner[result.operands[1]].bytes
            else:
                written += result.bytes
        read = 0.0
        for index, operand in enumerate(fusion.operands):
            parameter = parameters.get(index)
            if parameter is not None and parameter not in in_place and operand in scope:
                read += self._read_bytes(inner, parameter, scope[operand].bytes)
        return read + written

    def _read_bytes(self, scope: dict[str, Instruction], name: str, whole: float) -> float:
        """Bytes read of fused parameter `name` (`whole` bytes): its slices when slicing is all that uses it
        (through bitcasts and nested fusions), else all of it."""
        read = 0.0
        for user in _users(scope, name):
            if user.opcode in _SLICING and user.operands[0] == name:
                read += user.bytes
            elif user.opcode == "bitcast":
                read += self._read_bytes(scope, user.name, whole)
            elif user.opcode == "fusion":
                nested = self.computations[user.called["calls"][0]]
                parameters = _parameters(nested)
                read += sum(self._read_bytes(nested, parameters[index], whole)
                            for index, operand in enumerate(user.operands) if operand == name)
            else:
                return whole
        return min(read, whole)

    def _trip_count(self, condition: str) -> int:
        """The loop bound: the integer constant the condition's root compares the counter with (0: unknown)."""
        instructions = self.computations[condition]
        root = instructions[self.roots[condition]]
        for operand in root.operands:
            constant = instructions.get(operand)
            if constant is not None and constant.opcode == "constant":
                return int(constant.arguments)
        raise ValueError(f"cannot read the trip count of loop condition {condition}")


def _dims(scope: dict[str, Instruction], name: str) -> tuple[int, ...]:
    return scope[name].arrays[0][1]


def _convolution_macs(instruction: Instruction, scope: dict[str, Instruction]) -> float:
    """Multiply-adds of a convolution, as XLA counts them: batch x output features x input features per
    group x, for each spatial dimension, the (output, window) position pairs that land on real input.
    TPU writes batched matmuls as convolutions whose batch-like spatial dimensions are dilated so that
    one window position per output is real; counting whole windows would overcount those by their size."""
    lhs_labels, rhs_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes).groups()
    lhs, rhs, out = _dims(scope, instruction.operands[0]), _dims(scope, instruction.operands[1]), \
        instruction.arrays[0][1]
    window = dict(re.findall(r"(\w+)=([\dx_]+)", (re.search(r"window=\{([^}]*)\}", instruction.attributes)
                                                  or re.search("()", "")).group(1)))
    spatial = [c for c in lhs_labels if c.isdigit()]
    per_dim = {key: [int(v) for v in window[key].split("x")] for key in ("size", "stride", "lhs_dilate", "rhs_dilate")
               if key in window}
    pads = [int(p.split("_")[0]) for p in window["pad"].split("x")] if "pad" in window else [0] * len(spatial)
    pairs = 1
    for index, label in enumerate(spatial):
        size = per_dim.get("size", [1] * len(spatial))[index]
        stride = per_dim.get("stride", [1] * len(spatial))[index]
        base = per_dim.get("lhs_dilate", [1] * len(spatial))[index]
        dilation = per_dim.get("rhs_dilate", [1] * len(spatial))[index]
        position = (np.arange(out[out_labels.index(label)])[:, None] * stride
                    + np.arange(size)[None, :] * dilation - pads[index])
        extent = (lhs[lhs_labels.index(label)] - 1) * base
        pairs *= int(np.sum((position >= 0) & (position <= extent) & (position % base == 0)))
    groups = int(re.search(r"batch_group_count=(\d+)", instruction.attributes).group(1)) \
        if "batch_group_count=" in instruction.attributes else 1
    return (lhs[lhs_labels.index("b")] / groups) * out[out_labels.index("f")] * rhs[rhs_labels.index("i")] * pairs


def _int_list(attributes: str, key: str) -> list[int]:
    found = re.search(key + r"=\{([\d,]*)\}", attributes)
    return [int(x) for x in found.group(1).split(",") if x] if found else []


def _users(scope: dict[str, Instruction], name: str) -> list[Instruction]:
    return [i for i in scope.values() if name in i.operands]


def _through_bitcasts(scope: dict[str, Instruction], name: str) -> str:
    """The instruction `name` is a bitcast chain of (itself if none)."""
    while scope[name].opcode == "bitcast":
        name = scope[name].operands[0]
    return name


def _parameters(scope: dict[str, Instruction]) -> dict[int, str]:
    """A computation's parameters by index."""
    return {int(i.arguments): i.name for i in scope.values() if i.opcode == "parameter"}
