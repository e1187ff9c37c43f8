"""What the hardware a worker runs on computes well: the one place that looks at it.

A recipe says `auto` for `rollout.dtype` and `model.compute_dtype` (the defaults); each worker
resolves that on its own machine (a Ray cluster may mix them) with `pick_dtype`:

- on a CUDA device, bf16 where the device computes it (compute capability 8 and newer);
- on a CPU, bf16 where the CPU computes it natively (AVX-512 BF16, which AMX machines also
  have, with oneDNN's bf16 kernels in this torch build), float32 elsewhere. Without native
  bf16 (AVX2-only x86, aarch64 here), bf16 GEMMs are emulated and run several times slower
  than float32 ones.

`RLKIT_CPU_ISA` (`rlkit.kernels.cpu.isa`) lowers what the CPU is taken to have, so the
portable choices are tested on the richer machine too. An explicit dtype always wins;
`slow_dtype_warning` says when it is slow where it runs.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import numpy as np
import torch

from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels.triton_support import HAS_TRITON

DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes bf16 matrix products natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return (
        cpu_kernels.isa() == "avx512_bf16"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def compiled_kernels(device: torch.device | str) -> bool:
    """Whether rlkit's Triton kernels run compiled on `device` (CUDA, Triton importable);
    elsewhere their dispatchers take the PyTorch references (or the CPU's C kernels)."""
    return torch.device(device).type == "cuda" and HAS_TRITON


def _cpu_name() -> str:
    isa = cpu_kernels.isa()
    if isa != cpu_kernels.machine_isa():
        return f"this CPU as RLKIT_CPU_ISA={isa}"
    return {
        "avx512_bf16": "this CPU (AVX-512 BF16)",
        "avx2": "this CPU (AVX2, no AVX-512 BF16)",
    }.get(isa, "this CPU (no AVX2)")


def cpu_summary() -> str:
    """The CPU's model and the instruction set in use, for benchmark records:
    "AMD EPYC, isa avx2 (machine avx2)"."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
            )
    except OSError:
        pass
    return f"{model}, isa {cpu_kernels.isa()} (machine {cpu_kernels.machine_isa()})"


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    why: str  # for start-up logs: "float32: no native bf16 on this CPU (AVX2, ...)"

    @property
    def name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def pick_dtype(spec: str, device: torch.device | str = "cpu") -> DtypeChoice:
    """The compute dtype for `spec` ("auto", "float32" or "bfloat16") on `device`."""
    device = torch.device(device)
    if spec != "auto":
        if spec not in _BY_NAME:
            raise ValueError(f"unknown dtype {spec!r}: expected auto, float32 or bfloat16")
        return DtypeChoice(_BY_NAME[spec], "set in the recipe")
    where = (
        _cpu_name() if device.type == "cpu" else f"this GPU ({torch.cuda.get_device_name(device)})"
    )
    if native_bf16(device):
        return DtypeChoice(torch.bfloat16, f"auto: native bf16 on {where}")
    return DtypeChoice(torch.float32, f"auto: no native bf16 on {where}")


def slow_dtype_warning(dtype: torch.dtype, device: torch.device | str, key: str) -> str | None:
    """A warning when `dtype`, set explicitly under `key`, computes slowly on `device`."""
    if dtype == torch.bfloat16 and not native_bf16(device):
        where = _cpu_name() if torch.device(device).type == "cpu" else "this GPU"
        return (
            f"{key}=bfloat16 on {where}: it has no native bf16 arithmetic, so bf16 matrix "
            f"products are emulated and several times slower than float32; "
            f"{key}=auto picks float32 here"
        )
    return None


# train.micro_batch_size: auto. A CPU keeps 32 sequences a micro-batch (the learner's memory on
# a laptop); a GPU takes as many as fill this many padded tokens: the default recipe's 128
# samples of ~80 tokens become one micro-batch (measured on an H200: 4 micro-batches of 32 cost
# ~1.3 s a step in kernel launches for ~0.15 s of GPU work), a 1.5B model at 1088 tokens a
# sample gets 30 a micro-batch.
CPU_MICRO_BATCH = 32
GPU_MICRO_BATCH_TOKENS = 32768


def micro_batch_size(spec: int | str, device: torch.device | str, seq_len: int) -> int:
    """Sequences per micro-batch for `train.micro_batch_size` = spec (an int, or "auto") on
    `device`, for a batch padded to seq_len tokens a sequence."""
    if spec != "auto":
        return int(spec)
    if torch.device(device).type == "cpu":
        return CPU_MICRO_BATCH
    return max(1, GPU_MICRO_BATCH_TOKENS // max(1, seq_len))


# The CUDA caching allocator's settings for rlkit's processes unless the user set their own:
# expandable segments grow one mapping instead of caching many fixed blocks, so the memory a
# colocated GPU worker holds stays near what its tensors use as the learner's and the engine's
# shapes change between phases (the default recipe: 4.63 GiB held for 4.26 GiB of tensors).
CUDA_ALLOC_CONF = "expandable_segments:True"


def cuda_allocator_env() -> dict[str, str]:
    """PYTORCH_CUDA_ALLOC_CONF for a process that may use CUDA: the user's, else rlkit's. It
    must be in the environment before the process first touches CUDA."""
    return {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)}


def use_attention_backends(device: torch.device | str) -> None:
    """Scaled-dot-product attention's backends for a process that trains or prefills on
    `device`. On CUDA, cuDNN's attention is left out: it builds an execution plan for each new
    (batch, length) shape, and RL batches have a new padded shape nearly every step (responses
    end where they end, groups with zero advantage drop out). Measured on an H200 at the
    default recipe's shape with a new response length each step: a learner step of 0.27-0.95 s
    with it, 0.13-0.18 s with flash attention, which needs no plan (benchmarks/RESULTS.md).
    A process-wide switch, set where a worker takes its device."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def to_device(host: np.ndarray | list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host integers (an array, a list, or a CPU tensor) on `device` without a host
    synchronisation: on CUDA through a pinned copy and an asynchronous transfer (a copy from
    pageable memory waits for the stream's queued work; PyTorch's pinned-memory cache keeps the
    copy until the transfer has run), so that the host can queue work ahead of the GPU. An array
    or list is copied first (the caller may change it next)."""
    t = host if isinstance(host, torch.Tensor) else torch.tensor(np.asarray(host, dtype=np.int64))
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (a CUDA device's stream; nothing to wait for on a
    CPU): a wall clock around device work reads true times only after it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
