"""Fixtures every test area shares."""

import os

# One Ray authentication mode for the whole session. Ray 2.60 starts clusters with token
# authentication unless RAY_AUTH_MODE=disabled, and a process keeps the mode of its first
# ray.init: a test that set the variable for its own cluster (the two-node test) left the
# next test's ray.init mismatched with the GCS it started ("InvalidAuthToken"), or the other
# way round. The tests exercise no authentication.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from rlkit.kernels import cpu as cpu_kernels  # noqa: E402


def require_kernels(dtype: torch.dtype) -> torch.dtype:
    """Skip unless this machine has what the CPU kernels of `dtype` need (a compiler, the
    CPU's instruction set, RLKIT_CPU_ISA and RLKIT_CPU_KERNELS allowing them); where it has
    it, a build that fails fails the test."""
    why = cpu_kernels.missing_prerequisite(dtype)
    if why is not None:
        pytest.skip(f"machine lacks a kernel prerequisite: {why}")
    return dtype


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def kernel_dtype(request):
    """Each dtype that has CPU kernels (bf16: the AVX-512 BF16 build; float32: the AVX2 one):
    a test taking it runs once per build (`require_kernels`)."""
    return require_kernels(request.param)


@pytest.fixture
def f32_kernels():
    """The float32 (AVX2) CPU kernels, for tests of that build alone (`require_kernels`)."""
    return require_kernels(torch.float32)
