"""Fixtures every test area shares."""

import pytest
import torch
from rlkit.kernels import cpu as cpu_kernels


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def kernel_dtype(request):
    """Each dtype that has CPU kernels (bf16: the AVX-512 BF16 build; float32: the AVX2 one).
    A test taking it runs once per build and skips only where this machine lacks what that
    build needs (no compiler, the CPU's instruction set, RLKIT_CPU_ISA or RLKIT_CPU_KERNELS);
    where the machine has it, a build that fails fails the test."""
    why = cpu_kernels.missing_prerequisite(request.param)
    if why is not None:
        pytest.skip(f"machine lacks a kernel prerequisite: {why}")
    return request.param
