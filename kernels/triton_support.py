"""Triton where it is installed (a GPU install, or the dev extras that run the kernels on CPU
under TRITON_INTERPRET=1); elsewhere `HAS_TRITON` is False and the kernels' PyTorch references
run. The one place that asks, for every Triton kernel module.

Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with `**pdl(device)`
may be scheduled while the kernel before it in the stream is still finishing, and waits for
that kernel's writes at its first statement, `wait_for_inputs(PDL)` (which every kernel
taking a `PDL: tl.constexpr` calls before anything else, so that no program reads or writes
memory, or exits, before the predecessor is done). What it saves is the gap between two
dependent launches: inside a CUDA graph on an H200 with Triton 3.6, a chain of small
producer/consumer Triton kernels took 3.33 instead of 4.06 us a pair
(`benchmarks/pdl_probe.py`, `benchmarks/results/gpu_pdl_probe.json`, results exact). A decode
step is ~170 launches. RLKIT_PDL=0 turns it off; off a CUDA device of compute capability 9.0
or more (and under the interpreter) `pdl` returns {"PDL": False} and the kernels launch as
before."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "pdl", "tl", "triton", "wait_for_inputs"]

_HAS_GDC = False
if HAS_TRITON:
    try:
        from triton.language.extra import cuda as _tl_cuda

        _HAS_GDC = hasattr(_tl_cuda, "gdc_wait")
    except ImportError:  # pragma: no cover - an old Triton
        _HAS_GDC = False

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """A PDL-launched kernel's first statement: wait until the previous kernel in the
        stream has finished and its writes are visible (a no-op without PDL)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

else:  # pragma: no cover - depends on the install
    wait_for_inputs = None

_PDL_ON = os.environ.get("RLKIT_PDL", "1") != "0"
_CAPABLE: dict[int, bool] = {}


def pdl(device: torch.device) -> dict[str, Any]:
    """The launch options of a kernel with a `PDL` constexpr on `device`: {"PDL": True,
    "launch_pdl": True} on a CUDA device of compute capability 9.0 or more with a Triton that
    has gdc_wait (and RLKIT_PDL not 0), else {"PDL": False}."""
    if not (_PDL_ON and _HAS_GDC and device.type == "cuda"):
        return {"PDL": False}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABLE:
        _CAPABLE[idx] = torch.cuda.get_device_capability(idx) >= (9, 0)
    return {"PDL": True, "launch_pdl": True} if _CAPABLE[idx] else {"PDL": False}
