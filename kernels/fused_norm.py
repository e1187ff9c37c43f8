"""The elementwise glue of a decoder layer's inference step in single launches: the residual
add fused with the next RMSNorm, and SiLU(gate) * up.

    h = add_rms_norm(x, y, weight, eps)   x [N, C] += y [N, C] in place (rounded to x's dtype),
                                          h = RMSNorm(x) * weight (float32 statistics, one
                                          rounding), returned [N, C] in x's dtype; y may also
                                          be S partial sums [S, N, C] (a split-K GEMM's,
                                          `decode_gemm.linear_partials`): x += their float32
                                          sum, one rounding
    a = silu_mul(gate_up)                 gate_up [N, 2I] (gate, then up) -> [N, I]:
                                          silu(gate) * up in float32, one rounding

In a CUDA-graph decode step of a small batch each launch costs a few microseconds whatever its
size; the PyTorch path spends two launches on each residual add and norm and two on the
activation, three more per layer than these (`benchmarks/profile_rollout.py`). Inference only:
no autograd (the learner's forward keeps PyTorch's ops).

Three functions per op, as the other kernel modules: `*_reference` (plain PyTorch: the layer's
former ops), `*_triton` (one program per row), and the dispatcher (the kernel for CUDA tensors
when Triton is importable, else the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rlkit.kernels.triton_support import HAS_TRITON, pdl, tl, triton, wait_for_inputs

__all__ = [
    "HAS_TRITON",
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_rms_norm_triton",
    "silu_mul",
    "silu_mul_reference",
    "silu_mul_triton",
]


def _check_rows(name: str, *xs: torch.Tensor) -> None:
    for x in xs:
        if x.dim() != 2 or x.stride(-1) != 1:
            raise ValueError(f"{name}: rows must be [N, C] with a unit last stride, got {x.shape}")


def _check_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> None:
    _check_rows("add_rms_norm", x)
    if y.dim() == 3:  # partial sums [S, N, C]
        _check_rows("add_rms_norm", *y)
    else:
        _check_rows("add_rms_norm", y)
    if y.shape[-2:] != x.shape or weight.shape != (x.shape[1],):
        raise ValueError(f"add_rms_norm: y {y.shape} / weight {weight.shape} vs x {x.shape}")


def add_rms_norm_reference(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x += y (or the float32 sum of partials y [S, N, C]) in place; returns RMSNorm(x) *
    weight (the model's ops)."""
    _check_add(x, y, weight)
    if y.dim() == 3:
        x.copy_(x.float() + y.float().sum(0))
    else:
        x.add_(y)
    return F.rms_norm(x, weight.shape, weight, eps)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [N, 2I] (the model's ops)."""
    _check_rows("silu_mul", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must have an even width, got {gate_up.shape}")
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(
        X, Y, W, H, C, sx, sy, sparts, sh, eps, PARTS: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * sy + cols, mask=mask, other=0.0).to(tl.float32)
        for p in tl.static_range(1, PARTS):  # y's partial sums in float32, then x + y
            y += tl.load(Y + p * sparts + row * sy + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + y).to(X.dtype.element_ty)
        tl.store(X + row * sx + cols, s, mask=mask)
        sf = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / C + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(H + row * sh + cols, (sf * rstd * w).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, A, inner, sg, sa, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        g = tl.load(GU + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * sg + inner + cols, mask=mask, other=0.0).to(tl.float32)
        a = g / (1.0 + tl.exp(-g)) * u
        tl.store(A + row * sa + cols, a.to(A.dtype.element_ty), mask=mask)


def add_rms_norm_triton(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The Triton kernel (contract in the module docstring): one program per row."""
    if not HAS_TRITON:
        raise RuntimeError("add_rms_norm_triton needs triton, which is not importable")
    _check_add(x, y, weight)
    n, c = x.shape
    h = torch.empty_like(x)
    parts = y if y.dim() == 3 else y[None]
    if n:
        block = triton.next_power_of_2(c)
        _add_rms_norm_kernel[(n,)](
            x, parts, weight, h, c, x.stride(0), parts.stride(1), parts.stride(0), h.stride(0),
            eps, PARTS=parts.shape[0], BLOCK=block, num_warps=4 if block <= 2048 else 8,
            **pdl(x.device),
        )  # fmt: skip
    return h


def silu_mul_triton(gate_up: torch.Tensor, *, block: int = 1024) -> torch.Tensor:
    """The Triton kernel (contract in the module docstring): programs over (row, column
    block)."""
    if not HAS_TRITON:
        raise RuntimeError("silu_mul_triton needs triton, which is not importable")
    _check_rows("silu_mul", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must have an even width, got {gate_up.shape}")
    n, inner = gate_up.shape[0], gate_up.shape[1] // 2
    a = torch.empty((n, inner), dtype=gate_up.dtype, device=gate_up.device)
    if n:
        grid = (n, triton.cdiv(inner, block))
        _silu_mul_kernel[grid](
            gate_up, a, inner, gate_up.stride(0), a.stride(0), BLOCK=block, **pdl(a.device)
        )
    return a


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x += y (or y's partial sums) in place; RMSNorm(x) * weight (module docstring): the
    kernel on CUDA."""
    fn = add_rms_norm_triton if x.is_cuda and HAS_TRITON else add_rms_norm_reference
    return fn(x, y, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (module docstring): the kernel on CUDA."""
    return (
        silu_mul_triton(gate_up) if gate_up.is_cuda and HAS_TRITON else silu_mul_reference(gate_up)
    )
