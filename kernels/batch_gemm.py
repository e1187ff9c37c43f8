"""Linear layers of a decode step at large batch (hundreds of rows, e.g. the 455 sequences a
compressed cache admits at the memory wall): y = x @ W^T (+ bias), and the MLP's gate/up
projection with SiLU(gate) * up applied to the accumulators (one launch, half the output
written).

    batch_linear(x, weight, bias=None) -> y           x [M, K], weight [N, K] (nn.Linear's
                                                      layout), bias [N], y [M, N]
    batch_gate_up_silu(x, gate_up) -> y               gate_up [2I, K] (gate rows, then up
                                                      rows), y [M, I] = silu(x W_g^T) * x W_u^T

Why (issue 16): at 455 rows of the random 1.5B Qwen2 shape on an H200 the four projections are
bound by arithmetic, not by their weight reads, and cuBLAS's tile choice for the N = 2,048
outputs (o and down: 64 x 120 tiles, 144 of them on 132 multiprocessors, two waves the second
nearly empty) ran at ~480 TFLOP/s against ~640 for gate/up
(`benchmarks/results/profiles/gpu_prof_b455_sparse_2048_fused.txt`). This kernel is a plain
tiled GEMM (BLOCK_M x BLOCK_N tiles, the K loop pipelined, tiles ordered in groups of GROUP_M
row blocks so a weight tile is read from memory once and from L2 by the other row blocks) whose
tile shape is a knob: `benchmarks/bench_batch_gemm.py` sweeps it against cuBLAS per projection
and row count, and `BATCH_GEMM_KNOBS` holds what that bench measured faster, which is also
where the engine's GPU step (`Decoder._run_glued`) takes it (`batch_gemm_config`).

Per op the PyTorch reference (`*_reference`: F.linear, then silu * up in the output dtype)
and the Triton kernel (`*_triton`: float32 accumulators, one rounding to the output dtype;
tensor-core dots of the inputs' dtype, float32 products under the interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

__all__ = [
    "BATCH_GEMM_KNOBS",
    "HAS_TRITON",
    "batch_gate_up_silu_reference",
    "batch_gate_up_silu_triton",
    "batch_gemm_config",
    "batch_linear_reference",
    "batch_linear_triton",
]

# (op, rows low, rows high, N, K) -> the kernel's knobs, where the bench measured the kernel
# faster than cuBLAS on the device it names. Empty: the engine calls cuBLAS everywhere.
BATCH_GEMM_KNOBS: dict[tuple[str, int, int, int, int], dict[str, int]] = {}


def batch_gemm_config(op: str, x: torch.Tensor, weight: torch.Tensor) -> dict[str, int] | None:
    """The knobs with which the engine's GPU step takes the kernel for `op` ('linear' or
    'gate_up') on x [M, K] @ weight [N, K]^T, or None (cuBLAS): bf16 on CUDA, in a measured
    regime of `BATCH_GEMM_KNOBS` only."""
    if not (HAS_TRITON and x.is_cuda and x.dtype == torch.bfloat16 and BATCH_GEMM_KNOBS):
        return None
    M, (N, K) = x.shape[0], weight.shape
    for (name, lo, hi, n, k), knobs in BATCH_GEMM_KNOBS.items():
        if name == op and lo <= M <= hi and n == N and k == K:
            return knobs
    return None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: need x [M, K] and weight [N, K], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"{name}: x and weight differ in dtype or device")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{name}: bias must be [N={weight.shape[0]}], got {tuple(bias.shape)}")


def batch_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    _check(x, weight, bias, "batch_linear")
    return F.linear(x, weight, bias)


def batch_gate_up_silu_reference(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    _check(x, gate_up, None, "batch_gate_up_silu")
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _batch_gemm_kernel(
        X, W, Bias, Out,
        M, N, K, n_half,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        HAS_BIAS: tl.constexpr,
        SILU_PAIR: tl.constexpr,  # out[:, n] = silu(x W[n]) * x W[n + n_half]
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M row blocks take the same column block one after another: its weight tile
        # comes from memory once, from L2 for the others.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_m = offs_m < M
        m_n = offs_n < N
        p_x = X + offs_m[:, None].to(tl.int64) * stride_xm
        p_w = W + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            m_k = kk < K
            x = tl.load(p_x + kk[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
            w = tl.load(p_w + kk[None, :] * stride_wk, mask=m_n[:, None] & m_k[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
            if SILU_PAIR:
                w2 = tl.load(
                    p_w + n_half * stride_wn + kk[None, :] * stride_wk,
                    mask=m_n[:, None] & m_k[None, :],
                    other=0.0,
                )
                if UPCAST:
                    acc2 += tl.dot(
                        x.to(tl.float32), tl.trans(w2.to(tl.float32)), input_precision="ieee"
                    )
                else:
                    acc2 += tl.dot(x, tl.trans(w2))
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        if SILU_PAIR:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        tl.store(
            Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
            acc.to(Out.dtype.element_ty),
            mask=m_m[:, None] & m_n[None, :],
        )


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_out: int,
    silu_pair: bool,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    if not HAS_TRITON:
        raise RuntimeError("the batch GEMM kernel needs triton, which is not importable")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if group_m < 1:
        raise ValueError(f"group_m must be >= 1, got {group_m}")
    M, K = x.shape
    out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    if M == 0 or n_out == 0:
        return out
    grid = (triton.cdiv(M, block_m) * triton.cdiv(n_out, block_n),)
    _batch_gemm_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        M, n_out, K, n_out if silu_pair else 0,
        *x.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, SILU_PAIR=silu_pair,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        UPCAST=not x.is_cuda or x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def batch_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 64,
    group_m: int = 8,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """y = x @ weight^T + bias by the kernel (module docstring); the knobs for the bench."""
    _check(x, weight, bias, "batch_linear")
    return _launch(
        x, weight, bias, weight.shape[0], False, block_m, block_n, block_k, group_m, num_warps,
        num_stages,
    )  # fmt: skip


def batch_gate_up_silu_triton(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    *,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 64,
    group_m: int = 8,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """silu(x W_g^T) * x W_u^T by the kernel: each program computes the gate and up tiles of
    the same columns and writes only their product."""
    _check(x, gate_up, None, "batch_gate_up_silu")
    if gate_up.shape[0] % 2:
        raise ValueError(f"batch_gate_up_silu: gate_up must have 2I rows, got {gate_up.shape}")
    half = gate_up.shape[0] // 2
    return _launch(
        x, gate_up, None, half, True, block_m, block_n, block_k, group_m, num_warps, num_stages
    )
