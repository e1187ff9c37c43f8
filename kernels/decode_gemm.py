"""Linear layers of a decode step at small batch (M <= 128 rows), where a GEMM only streams its
weights: y = x @ W^T (+ bias), and the MLP's gate/up projection with SiLU(gate) * up applied to
the accumulators (one launch, half the output written).

    decode_linear(x, weight, bias=None) -> y           x [M, K], weight [N, K] (nn.Linear's
                                                       layout), bias [N], y [M, N]
    decode_gate_up_silu(x, gate_up) -> y               gate_up [2I, K] (gate rows, then up
                                                       rows), y [M, I] = silu(x W_g^T) * x W_u^T
    linear_partials(x, weight, splits) -> p            p [S, M, N]: x's K split in S slices,
                                                       p[s] = x[:, slice s] @ W[:, slice s]^T
                                                       (so sum_s p[s] = x @ W^T): cuBLAS's
                                                       batched GEMM over views, no copies

Why (issue 16): at batch 64 of a 1.5B model on an H200, cuBLAS's kernels for the four
projections of a layer ran at 37-79% of the bandwidth of their weight reads (40 us a layer
against a 25 us floor: `benchmarks/results/profiles/gpu_prof_b64_sparse_2048.txt`), the down
projection as a split-K GEMM plus a reduction kernel, and SiLU * up is one more launch; every
launch in a captured step also costs an inter-kernel gap. These kernels split N over programs
(BLOCK_N output columns each, all M rows, the K loop pipelined), so each weight element is read
once and every row's product comes from one pass.

Per op the PyTorch reference (`*_reference`: the model's ops, F.linear, then silu * up in the
output dtype) and the Triton kernel (`*_triton`: float32 accumulators, one rounding to the
output dtype; tensor-core dots of the inputs' dtype, float32 products under the interpreter).
`benchmarks/bench_decode_gemm.py` times them against cuBLAS at the 1.5B shapes on the device
(2026-11-30, H200, best configuration each): the gate/up kernel beat cuBLAS + `silu_mul`
1.10x at 16 rows and 1.17x at 64 (15.1 against 17.7 us); the plain linear kernel did not beat
cuBLAS (0.92-1.02x) and is not called. `gate_up_applies` says where the engine's GPU step
(`Decoder._run_glued`) takes the gate/up kernel: the measured regime only.

Split-K for the narrow projections (o and down: N = hidden): at a few hundred rows their
output has too few tiles to fill an H200, and cuBLAS ran them at 400-500 TFLOP/s (gate/up:
~700). One `torch.bmm` over 2 K-slices, its bf16 partial sums left for the consumer to add
(`fused_norm.add_rms_norm` sums them in float32 with the residual, in the launch it takes
anyway), took o from 10.1 to 8.5 us and down from 22.4 to 17.0 at 454 rows
(`benchmarks/bench_gemm_split.py`, 2026-12-01, H200; `gpu_bench_gemm_split*.json`). In the
engine's 454-row step the two took 26.0 us a layer against 30.9 and the adds 0.76 us more
each: ~3.4 us a layer net. At 64 rows the bench's gains (cuBLAS already splits down there)
did not survive the engine: the two GEMMs 14.3 against 15.1 us, the adds of 4 partials 3.9
against 2.0 us (`benchmarks/results/profiles/gpu_prof_b{64,454}_sparse_splitk.txt`). So
`split_k` takes 2 slices from SPLIT_MIN_ROWS rows to SPLIT_MAX_ROWS, and none elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rlkit.kernels.triton_support import HAS_TRITON, pdl, tl, triton, wait_for_inputs

__all__ = [
    "HAS_TRITON",
    "MAX_ROWS",
    "decode_gate_up_silu_reference",
    "decode_gate_up_silu_triton",
    "decode_linear_reference",
    "decode_linear_triton",
    "gate_up_applies",
    "GATE_UP_KNOBS",
    "linear_partials",
    "split_k",
]

# The kernels hold all M rows of a tile in registers.
MAX_ROWS = 128
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# The gate/up kernel's configuration and regime, from the bench above: bf16, at most 64 rows
# (measured at 16 and 64), an intermediate size of at least 4,096 (measured at 5,632; a narrow
# MLP, e.g. SmolLM2's 1,536, gives too few programs to fill the GPU and was not measured).
GATE_UP_KNOBS = {"block_n": 64, "block_k": 128, "num_stages": 4}
GATE_UP_MAX_ROWS = 64
GATE_UP_MIN_INTERMEDIATE = 4096


# Split-K's regime, from the engine's profiles above (bf16, the 1.5B shape): 2 slices from 384
# rows (64 lost; the bench's 256 gained less than the adds' extra reads cost at 454) to 512
# (past it the GEMM has tiles enough: a prefill).
SPLIT_MIN_ROWS = 384
SPLIT_MAX_ROWS = 512


def split_k(x: torch.Tensor, weight: object, bias: torch.Tensor | None) -> int:
    """The K slices `linear_partials` takes for x [M, K] @ weight [N, K]^T in a GPU decode
    step (`Decoder._run_glued`), or 0 where it does not apply: CUDA bf16/fp16, no bias, a
    plain weight, SPLIT_MIN_ROWS to SPLIT_MAX_ROWS rows, and K in two slices of a multiple of
    16 (aligned for the tensor cores)."""
    if not (
        isinstance(weight, torch.Tensor)
        and x.is_cuda
        and bias is None
        and x.dim() == 2
        and weight.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and SPLIT_MIN_ROWS <= x.shape[0] <= SPLIT_MAX_ROWS
        and x.shape[1] % 32 == 0
    ):
        return 0
    return 2


def linear_partials(
    x: torch.Tensor, weight: torch.Tensor, splits: int, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """[S, M, N] partial products of x [M, K] @ weight [N, K]^T over S equal K slices (module
    docstring): one batched GEMM over views of x and weight, each partial rounded to x's
    dtype (or to out_dtype, e.g. float32, where this torch's bmm takes one); their sum is the
    product."""
    _check(x, weight, None, "linear_partials")
    m, k = x.shape
    n = weight.shape[0]
    if splits < 1 or k % splits:
        raise ValueError(f"linear_partials: K = {k} does not split in {splits} slices")
    c = k // splits
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("linear_partials: x and weight need a unit stride on K")
    xs = x.as_strided((splits, m, c), (c, x.stride(0), 1))
    ws = weight.as_strided((splits, c, n), (c, 1, weight.stride(0)))
    return torch.bmm(xs, ws) if out_dtype is None else torch.bmm(xs, ws, out_dtype=out_dtype)


def gate_up_applies(x: torch.Tensor, gate_up: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `decode_gate_up_silu_triton` takes x [M, K] @ gate_up [2I, K]^T in a GPU step."""
    return (
        HAS_TRITON
        and x.is_cuda
        and bias is None
        and x.dtype == torch.bfloat16
        and gate_up.dtype == torch.bfloat16
        and x.dim() == 2
        and x.shape[0] <= GATE_UP_MAX_ROWS
        and gate_up.shape[0] // 2 >= GATE_UP_MIN_INTERMEDIATE
    )


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{name}: x must be [M, K] and weight [N, K], got {x.shape}, {weight.shape}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: K mismatch, x {tuple(x.shape)} weight {tuple(weight.shape)}")
    if x.dtype not in _FLOATS or weight.dtype != x.dtype:
        raise ValueError(
            f"{name}: x and weight must share a float dtype, got {x.dtype}, {weight.dtype}"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{name}: bias must be [{weight.shape[0]}] {x.dtype}, got {bias.shape}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"{name}: x, weight and bias must be on one device")


def decode_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    _check(x, weight, bias, "decode_linear")
    return F.linear(x, weight, bias)


def decode_gate_up_silu_reference(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    _check(x, gate_up, None, "decode_gate_up_silu")
    if gate_up.shape[0] % 2:
        raise ValueError(f"decode_gate_up_silu: gate_up must have 2I rows, got {gate_up.shape}")
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _decode_gemm_kernel(
        X, W, Bias, Out,
        M, N, K, n_half,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        HAS_BIAS: tl.constexpr,
        SILU_PAIR: tl.constexpr,  # out[:, n] = silu(x W[n]) * x W[n + n_half]
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
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
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    if not HAS_TRITON:
        raise RuntimeError("the decode GEMM kernels need triton, which is not importable")
    M, K = x.shape
    if M > MAX_ROWS:
        raise ValueError(f"the decode GEMM kernels take at most {MAX_ROWS} rows, got {M}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    if M == 0 or n_out == 0:
        return out
    _decode_gemm_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else x, out,
        M, n_out, K, n_out if silu_pair else 0,
        *x.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, SILU_PAIR=silu_pair,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
        UPCAST=not x.is_cuda or x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
        **pdl(x.device),
    )  # fmt: skip
    return out


def decode_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """y = x @ weight^T + bias by the kernel (module docstring); the knobs for the bench."""
    _check(x, weight, bias, "decode_linear")
    return _launch(x, weight, bias, weight.shape[0], False, block_n, block_k, num_warps, num_stages)


def decode_gate_up_silu_triton(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    *,
    block_n: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """silu(x W_g^T) * x W_u^T by the kernel: each program computes the gate and up tiles of
    the same columns and writes only their product."""
    _check(x, gate_up, None, "decode_gate_up_silu")
    if gate_up.shape[0] % 2:
        raise ValueError(f"decode_gate_up_silu: gate_up must have 2I rows, got {gate_up.shape}")
    half = gate_up.shape[0] // 2
    return _launch(x, gate_up, None, half, True, block_n, block_k, num_warps, num_stages)
