"""Weights cross the object store as numpy arrays (zero-copy reads), bf16 as its bits."""

import pickle

import numpy as np
import pytest
import torch

from rlkit.workers import weight_wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_and_unpack_round_trip_without_copies(dtype):
    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(5, 7, generator=g).to(dtype),
        "b.bias": torch.randn(3, generator=g).to(dtype),
        "strided": torch.randn(6, 4, generator=g).to(dtype).t(),  # made contiguous once
    }
    packed = weight_wire.pack(state)
    # Contiguous tensors travel as views of their own memory.
    src = state["a.weight"]
    bits = src.view(torch.int16) if dtype == torch.bfloat16 else src
    assert np.shares_memory(packed["a.weight"][0], bits.numpy())
    # Through pickle protocol 5, as Ray's object store carries them.
    arrived = weight_wire.unpack(pickle.loads(pickle.dumps(packed, protocol=5)))
    assert set(arrived) == set(state)
    for k, v in state.items():
        assert arrived[k].dtype == dtype and torch.equal(arrived[k], v), k


def test_unpack_reads_read_only_buffers_in_place():
    array = np.arange(6, dtype=np.float32)
    array.setflags(write=False)  # as an object-store buffer arrives
    t = weight_wire.unpack({"w": (array, "torch.float32")})["w"]
    assert np.shares_memory(t.numpy(), array) and t.tolist() == list(range(6))


def test_pack_refuses_device_tensors():
    with pytest.raises(ValueError, match="pack takes CPU tensors"):
        weight_wire.pack({"w": torch.zeros(2, device="meta")})
