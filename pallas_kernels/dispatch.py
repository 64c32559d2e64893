"""Choosing between a Pallas kernel and its XLA reference, and the per-platform Pallas settings."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Literal, get_args

import jax

Impl = Literal["auto", "xla", "pallas"]
IMPLS: tuple[str, ...] = get_args(Impl)  # the choices of every `impl` option
PALLAS_PLATFORMS = ("tpu", "gpu")
_TARGET = contextvars.ContextVar("pallas_kernels_target", default=None)


@contextlib.contextmanager
def compile_for(platform: str):
    """Kernels traced inside choose and lower as on `platform` ("tpu", "gpu", "cpu") instead of the
    default backend: a TPU program compiled ahead of time on a CPU host runs the TPU kernels."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_backend() -> str:
    """The platform kernels are traced for: `compile_for`'s, else the default backend."""
    return _TARGET.get() or jax.default_backend()


def use_pallas(impl: Impl, auto_platforms: tuple[str, ...] = PALLAS_PLATFORMS) -> bool:
    """Whether `impl` selects the Pallas kernel: "auto" does on `auto_platforms` (TPU and GPU)."""
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {', '.join(map(repr, IMPLS))}")
    if impl == "auto":
        return target_backend() in auto_platforms
    return impl == "pallas"


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def resolve_platform(platform: str | None) -> str:
    """The platform a Pallas kernel is tuned and lowered for: given, else `target_backend()`.

    A CPU default maps to "tpu": interpret mode runs the TPU kernel's program as written, and a
    deviceless TPU compile (libtpu on a CPU host) needs the TPU settings.
    """
    platform = platform or target_backend()
    if platform in ("cuda", "rocm"):
        platform = "gpu"
    if platform == "cpu":
        platform = "tpu"
    if platform not in PALLAS_PLATFORMS:
        raise ValueError(f"{platform=} must be one of {PALLAS_PLATFORMS}")
    return platform


def compiler_params(platform: str, semantics: tuple[str, ...], input_fusion: list[bool] | None = None):
    """Backend compiler parameters: grid dimension semantics on TPU (megacore split), Triton on GPU.

    input_fusion (TPU only): per operand, whether XLA may fuse its producer (a slice, a complex
    number's real or imaginary part) into the kernel's input instead of writing it to HBM first.
    """
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics, allow_input_fusion=input_fusion)
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def largest_lane_tile(n: int, multiple_of: int, target: int, platform: str) -> int:
    """Largest power-of-two tile <= target dividing n and a multiple of `multiple_of` (and of 128
    lanes on TPU), suiting Mosaic (lanes in 128s) and Triton (power-of-two blocks).

    Falls back to the full extent n, which both accept as a block dimension (Triton only when n is
    a power of two).
    """
    tile = 128 if platform == "tpu" else 16
    best = None
    while tile <= min(target, n):
        if n % tile == 0 and tile % multiple_of == 0:
            best = tile
        tile *= 2
    return best if best is not None else n


def token_tile(tokens: int, target: int, smallest: int = 16) -> int:
    """A power-of-two token tile, at least `smallest` (16: Triton's smallest dot) and at most `target`."""
    tile = smallest
    while tile < min(tokens, target):
        tile *= 2
    return tile
