"""Temperature sampling of a batch of logit rows in one launch: the next token of every row and
its log-probability under the sampling distribution.

    sample_rows(logits, temperature, uniforms) -> (tokens, logp)

    logits       [N, V] bf16 / fp16 / fp32   one row per sequence (row stride free, unit
                                             column stride)
    temperature  float > 0
    uniforms     [N] float64 in [0, 1)       one per row
    tokens       [N] int64                   the first token whose running probability sum
                                             exceeds u times the total (inverse CDF)
    logp         [N] float32                 log softmax(logits / temperature) at the token

The rule is the sampler's (`rlkit.rollout.sampling.draw`), the CPU C kernel's
(`rlkit.kernels.cpu.sample_rows`) and `verify_drafts`' residual draw: one uniform per row, the
running sum accumulated in float64 so that tail tokens keep their probability once most of the
mass is behind them. The PyTorch path materialises five [N, V] tensors (a float32 copy, the
log-softmax, its exponential, a float64 cumulative sum, the searchsorted), each its own
launches; at 455 sequences and a 32k vocabulary the CDF's scan alone was ~5% of a sparse decode
step's device time on an H200. `rlkit.rollout.sampling.sample` calls it for CUDA logits
(`benchmarks/bench_sampler.py`: 0.09 ms for 455 x 32,000 bf16 rows on an H200, against 0.90 ms
for the PyTorch path in the engine's old 64-row chunks).

Three functions, as the other kernel modules: `sample_rows_reference` (plain PyTorch, exactly
the engine's path), the Triton kernel `sample_rows_triton` (one program per row, three
passes over its logits: the maximum, the total of exp(x / T - max), then the first token whose
running sum passes u times the total, with the log-probability from the same maximum and
total), and the dispatcher `sample_rows` (the kernel for CUDA tensors when Triton is importable,
else the reference). The two agree on the token except where u falls within float32 rounding
of a boundary between two tokens' shares (a probability of ~1e-7 a draw).
"""

from __future__ import annotations

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "sample_rows", "sample_rows_reference", "sample_rows_triton"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _check(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> tuple[int, int]:
    """Raise ValueError naming the first wrong argument; else (N, V)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise ValueError(f"logits must be bf16, fp16 or fp32, got {logits.dtype}")
    n, v = logits.shape
    if v < 1:
        raise ValueError("logits must have at least one column")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (greedy is an argmax), got {temperature}")
    if uniforms.shape != (n,):
        raise ValueError(f"uniforms must be [{n}], got {tuple(uniforms.shape)}")
    if uniforms.device != logits.device:
        raise ValueError(f"uniforms on {uniforms.device}, logits on {logits.device}")
    return n, v


def sample_rows_reference(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of the module docstring in plain PyTorch (the kernel's reference)."""
    _check(logits, temperature, uniforms)
    logp = torch.log_softmax(logits.to(torch.float32, copy=True).div_(temperature), dim=-1)
    cdf = logp.exp().cumsum(dim=-1, dtype=torch.float64)  # [N, V]
    u = uniforms.to(torch.float64)[:, None]
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    tokens = tokens.clamp_max_(cdf.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


if HAS_TRITON:

    @triton.jit
    def _sample_kernel(
        X,
        U,
        Tokens,
        Logp,
        V,
        stride_x,
        inv_t,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = X + row * stride_x
        offs = tl.arange(0, BLOCK_V)
        # Pass 1: the row's maximum of x / T.
        top = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            top = tl.maximum(top, x * inv_t)
        m = tl.max(top, 0)
        # Pass 2: the total of exp(x / T - max), block sums accumulated in float64.
        total = tl.zeros([1], dtype=tl.float64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            total += tl.sum(tl.exp(x * inv_t - m).to(tl.float64), 0)
        z = tl.sum(total, 0)
        goal = tl.load(U + row) * z
        # Pass 3: the first token whose running sum exceeds u times the total.
        running = tl.zeros([1], dtype=tl.float64)
        token = tl.full([1], V - 1, dtype=tl.int64)
        found = tl.zeros([1], dtype=tl.int1)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            valid = cols < V
            x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
            e = tl.exp(x * inv_t - m).to(tl.float64)
            cdf = tl.sum(running, 0) + tl.cumsum(e, 0)
            hit = (cdf > goal) & valid
            first = tl.min(tl.where(hit, cols, V), 0).to(tl.int64)
            take = (first < V) & (found == 0)
            token = tl.where(take, first, token)
            found = found | take
            running += tl.sum(e, 0)
        x_tok = tl.load(base + token).to(tl.float32)
        logp = x_tok * inv_t - m - tl.log(z.to(tl.float32))
        one = tl.arange(0, 1)
        tl.store(Tokens + row + one, token)
        tl.store(Logp + row + one, logp)


def sample_rows_triton(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor, *, block_v: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (contract in the module docstring): one program per row."""
    if not HAS_TRITON:
        raise RuntimeError("sample_rows_triton needs triton, which is not importable")
    n, v = _check(logits, temperature, uniforms)
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return tokens, logp
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    u = uniforms.to(torch.float64).contiguous()
    _sample_kernel[(n,)](
        logits, u, tokens, logp, v, logits.stride(0), 1.0 / temperature, BLOCK_V=block_v,
        num_warps=4,
    )  # fmt: skip
    return tokens, logp


def sample_rows(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N] and their log-probabilities [N] (module docstring): the Triton kernel for
    CUDA tensors when Triton is importable, else the PyTorch reference."""
    if logits.is_cuda and HAS_TRITON:
        return sample_rows_triton(logits, temperature, uniforms)
    return sample_rows_reference(logits, temperature, uniforms)
