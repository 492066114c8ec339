"""Shape and dtype assertions at module boundaries, on chex, with errors that name the function and argument.

They read shapes and dtypes only, so under `jax.jit` they run once at trace time (no runtime cost), and they
raise `ValueError` (chex's message plus ours: which function, which argument, what it must be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex

__all__ = ["assert_floating", "assert_rank", "assert_shape"]


def assert_shape(where: str, name: str, x: Any, shape: Sequence[int | None], what: str = "") -> None:
    """`x` has `shape` (None: any size on that axis)."""
    chex.assert_shape(x, tuple(shape), exception_type=ValueError,
                      custom_message=f"{where}: {name} must have shape {_axes(shape)}{what}")


def assert_rank(where: str, name: str, x: Any, rank: int, what: str = "") -> None:
    """`x` has `rank` axes."""
    chex.assert_rank(x, rank, exception_type=ValueError,
                     custom_message=f"{where}: {name} must have rank {rank}{what}")


def assert_floating(where: str, name: str, x: Any) -> None:
    """`x` has a floating dtype (float16/bfloat16/float32/float64)."""
    chex.assert_type(x, float, exception_type=ValueError,
                     custom_message=f"{where}: {name} must be a floating-point array")


def _axes(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
