"""Triton where it is installed (a GPU install, or the dev extras that run the kernels on CPU
under TRITON_INTERPRET=1); elsewhere `HAS_TRITON` is False and the kernels' PyTorch references
run. The one place that asks, for every Triton kernel module."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "tl", "triton"]
