"""rlkit.device: bf16 where the hardware computes it natively, float32 elsewhere; explicit
settings win with a warning where they are slow; RLKIT_CPU_ISA forces the portable choices."""

import os
import subprocess
import sys

import pytest
import torch
from rlkit.kernels import cpu as cpu_kernels

from rlkit import device
from rlkit.models.decoder import can_prepack


@pytest.fixture
def cpu_as(monkeypatch):
    """cpu_as(isa, onednn_bf16): make this CPU look like one of that level."""

    def set_(isa: str, onednn_bf16: bool = True) -> None:
        monkeypatch.setattr(cpu_kernels, "isa", lambda: isa)
        monkeypatch.setattr(cpu_kernels, "machine_isa", lambda: isa)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)

    return set_


def test_auto_takes_bf16_on_a_cpu_with_avx512_bf16(cpu_as):
    cpu_as("avx512_bf16")
    choice = device.pick_dtype("auto", "cpu")
    assert choice.dtype == torch.bfloat16 and choice.name == "bfloat16"
    assert choice.why == "auto: native bf16 on this CPU (AVX-512 BF16)"
    assert device.slow_dtype_warning(torch.bfloat16, "cpu", "rollout.dtype") is None


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_auto_takes_float32_where_bf16_is_emulated(cpu_as, isa):
    cpu_as(isa)
    choice = device.pick_dtype("auto", "cpu")
    assert choice.dtype == torch.float32
    assert choice.why.startswith("auto: no native bf16 on this CPU")
    warning = device.slow_dtype_warning(torch.bfloat16, "cpu", "model.compute_dtype")
    assert warning is not None and "model.compute_dtype=bfloat16" in warning
    assert "model.compute_dtype=auto picks float32" in warning
    assert device.slow_dtype_warning(torch.float32, "cpu", "rollout.dtype") is None


def test_torch_without_onednn_bf16_gets_float32(cpu_as):
    cpu_as("avx512_bf16", onednn_bf16=False)
    assert device.pick_dtype("auto", "cpu").dtype == torch.float32


@pytest.mark.parametrize("isa", ["avx512_bf16", "avx2"])
@pytest.mark.parametrize("spec, want", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_an_explicit_dtype_wins(cpu_as, isa, spec, want):
    cpu_as(isa)
    choice = device.pick_dtype(spec, "cpu")
    assert choice.dtype == want and choice.why == "set in the recipe"


def test_an_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        device.pick_dtype("float16")


def test_cpu_summary_names_the_instruction_set():
    summary = device.cpu_summary()
    assert f"isa {cpu_kernels.isa()} (machine {cpu_kernels.machine_isa()})" in summary


def _child(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


ENGINE = """
import torch
from rlkit.device import pick_dtype
from rlkit.models.tiny import save_tiny_model
from rlkit.models import load_model
from rlkit.rollout import Engine
import tempfile
path = save_tiny_model(tempfile.mkdtemp() + "/m", "llama", seed=0, hidden_size=192,
                       head_dim=64, num_heads=3, num_kv_heads=1)
choice = pick_dtype("auto")
model, tok = load_model(path)
print(choice.name, "|", Engine(model, tok, dtype=choice.dtype).describe())
"""


@pytest.mark.parametrize("forced", ["avx2", "generic"])
def test_RLKIT_CPU_ISA_forces_the_portable_engine(forced):
    """What an AVX2-only (or a non-x86) machine runs, on whatever machine runs the test: a
    float32 engine on the AVX2 kernels, or on PyTorch ops."""
    name, described = _child(ENGINE, RLKIT_CPU_ISA=forced).strip().split(" | ")
    assert name == "float32"
    if forced == "avx2" and cpu_kernels.missing_prerequisite(torch.float32) is None:
        assert "decode step on C kernels avx2 (float32)" in described
        assert "weights packed for the AVX2 GEMM" in described
    if forced == "generic":
        assert "decode step on PyTorch ops" in described and "RLKIT_CPU_ISA=generic" in described
        assert "AVX2 GEMM" not in described
        if can_prepack(torch.device("cpu"), torch.float32):
            assert "oneDNN-prepacked weights" in described


def test_auto_micro_batch_is_32_on_a_cpu_and_a_token_budget_on_a_gpu():
    from rlkit.device import GPU_MICRO_BATCH_TOKENS, micro_batch_size

    assert micro_batch_size(7, "cpu", 100) == 7 and micro_batch_size(7, "cuda", 100) == 7
    assert micro_batch_size("auto", "cpu", 100) == 32
    assert micro_batch_size("auto", "cuda", 80) == GPU_MICRO_BATCH_TOKENS // 80
    assert micro_batch_size("auto", "cuda", 10**6) == 1


def test_micro_batch_size_takes_auto_or_a_positive_integer():
    from rlkit.config import load_recipe
    from rlkit.config.errors import ConfigError

    assert load_recipe(None, ["train.micro_batch_size=auto"]).train.micro_batch_size == "auto"
    for bad in ("0", "big"):
        with pytest.raises(ConfigError, match="train.micro_batch_size"):
            load_recipe(None, [f"train.micro_batch_size={bad}"])


def test_cuda_allocator_env_keeps_the_users_setting(monkeypatch):
    from rlkit.device import CUDA_ALLOC_CONF, cuda_allocator_env

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert cuda_allocator_env() == {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert cuda_allocator_env() == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}


def test_cuda_workers_take_sdpa_without_cudnn_and_cpu_workers_change_nothing():
    """The switch is a flag (no GPU needed to set it): a CPU worker leaves it, a CUDA worker
    turns cuDNN's attention off for its process (a plan per new shape; flash needs none)."""
    from rlkit.device import use_attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        use_attention_backends("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        use_attention_backends(torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_compiled_kernels_are_cuda_with_triton():
    from rlkit.kernels.triton_support import HAS_TRITON

    assert not device.compiled_kernels("cpu") and not device.compiled_kernels(torch.device("cpu"))
    assert device.compiled_kernels("cuda") == HAS_TRITON  # a device type: no GPU needed to ask
