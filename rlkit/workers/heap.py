"""Give freed heap memory back to the operating system.

glibc keeps memory that Python and torch free in its arenas for reuse; after a learner step
(activations, gradients) or a rollout (KV cache temporaries) a worker's resident memory stays
at its peak for the rest of the run although the memory is free. Trimming at the end of each
phase lowers what the whole run holds at once, at the cost of faulting those pages in again
at the next phase (milliseconds).
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

import torch


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim(device: torch.device | str = "cpu") -> None:
    """Trim after a phase whose tensors lived on `device`. A GPU phase's activations and
    caches are device memory, so its host heap barely moved: no trim there (glibc's walk of a
    multi-GB heap is host time inside a step that the host already bounds)."""
    if torch.device(device).type != "cpu":
        return
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
