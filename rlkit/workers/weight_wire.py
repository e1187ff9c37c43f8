"""Weights as they cross Ray's object store: numpy arrays, which Ray reads back without a copy.

Ray pickles a torch tensor's bytes into the object store and copies them out again on every
`get`; a numpy array travels as an out-of-band buffer and comes back as a read-only view of
the store's shared memory. For the learner → rollout-worker sync of a 135M-parameter float32
model (540 MB) on a 2-core CPU that was most of a 6-7 s sync (benchmarks/NOTES.md, "Weight
sync on CPU"). bf16 has no numpy dtype: it travels as its bits (int16) and is viewed back.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

# torch dtypes that travel as another dtype of the same width, viewed back on arrival.
_AS_BITS = {torch.bfloat16: torch.int16}
_BY_NAME = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}


def pack(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """CPU tensors -> {name: (array, torch dtype name)}: views, no copy (contiguous ones)."""
    out = {}
    for name, t in state.items():
        t = t.detach().contiguous()
        if t.device.type != "cpu":
            raise ValueError(f"{name}: pack takes CPU tensors, got one on {t.device}")
        bits = _AS_BITS.get(t.dtype)
        out[name] = ((t.view(bits) if bits is not None else t).numpy(), str(t.dtype))
    return out


def unpack(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{name: (array, dtype name)} -> tensors viewing the arrays (read-only shared memory when
    they came from the object store: the receiver copies them into its own weights)."""
    out = {}
    with warnings.catch_warnings():
        # torch warns that a tensor over a read-only array could be written through; the
        # receiver only reads these.
        warnings.simplefilter("ignore", UserWarning)
        for name, (array, dtype_name) in packed.items():
            dtype = _BY_NAME[dtype_name]
            t = torch.from_numpy(array)
            out[name] = t.view(dtype) if dtype in _AS_BITS else t
    return out
