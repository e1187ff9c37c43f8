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
the engine's path), `sample_rows_triton`, and the dispatcher `sample_rows` (the kernels for
CUDA tensors when Triton is importable, else the reference). The Triton path is two launches
that split every row over the GPU: one program per (row, chunk of `chunk` columns) writes the
chunk's maximum of x / T and its total of exp(x / T - max) (float64); then one program per row
combines them into the row's maximum and total, finds the chunk where the running sum passes u
times the total, and scans only that chunk for the token, with the log-probability from the
same maximum and total. (The first version, one program per row making three passes over its
whole row, left most of the GPU idle at batch 64: 37 us a step on an H200, ~20% of the gap to
the issue 16 target.) With `emit` the second launch also writes each token where the engine
keeps it (`Emit`: the output row, the last token, the stop flag, the count), which saves the
engine's six launches of `emit_one`. The kernel and the reference agree on the token except
where u falls within float32 rounding of a boundary between two tokens' shares (a probability
of ~1e-7 a draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rlkit.kernels.triton_support import HAS_TRITON, pdl, tl, triton, wait_for_inputs

__all__ = [
    "HAS_TRITON",
    "Emit",
    "emit_reference",
    "sample_rows",
    "sample_rows_reference",
    "sample_rows_triton",
]

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


@dataclass
class Emit:
    """Where the sampled tokens go, written by the kernel itself (the engine's `emit_one`):
    for row b of the batch, out_tokens[seq[b], count[b]] = token, out_logp[seq[b], count[b]]
    = its log-prob, last[b] = token, done[b] |= token in stop_ids, count[b] += 1.

    out_tokens [S, W] int64 and out_logp [S, W] float32 with the same strides; seq, count,
    last [>= N] int64; done [>= N] bool; stop_ids [K] int64 (K may be 0)."""

    out_tokens: torch.Tensor
    out_logp: torch.Tensor
    seq: torch.Tensor
    count: torch.Tensor
    last: torch.Tensor
    done: torch.Tensor
    stop_ids: torch.Tensor


def emit_reference(emit: Emit, tokens: torch.Tensor, logp: torch.Tensor) -> None:
    """The emit epilogue in plain PyTorch (the engine's former ops)."""
    n = tokens.shape[0]
    seq, count = emit.seq[:n], emit.count[:n]
    emit.out_tokens[seq, count] = tokens
    emit.out_logp[seq, count] = logp
    emit.done[:n] |= torch.isin(tokens, emit.stop_ids)
    emit.last[:n] = tokens
    emit.count[:n] += 1


if HAS_TRITON:

    @triton.jit
    def _chunk_stats_kernel(
        X, M, S, V, stride_x, C, inv_t, CHUNK: tl.constexpr, PDL: tl.constexpr = False
    ):
        """Program (row, chunk): the chunk's maximum of x / T and its total of
        exp(x / T - that maximum), accumulated in float64."""
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        cols = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf"))
        x = x.to(tl.float32) * inv_t
        m = tl.max(x, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk without mass sums to 0
        total = tl.sum(tl.exp(x - m_safe).to(tl.float64), 0)
        tl.store(M + row * C + c, m)
        tl.store(S + row * C + c, total)

    @triton.jit
    def _pick_kernel(
        X, M, S, U, Tokens, Logp, V, stride_x, C, inv_t,
        OutTok, OutLogp, stride_out, Seq, Count, Last, Done, Stop, n_stop,
        CHUNK: tl.constexpr, CP: tl.constexpr, EMIT: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Program row: combine the chunks' statistics into the row's maximum and total, find
        the chunk where the running sum passes u times the total, then the token inside it."""
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cs = tl.arange(0, CP)
        m_c = tl.load(M + row * C + cs, mask=cs < C, other=float("-inf"))
        s_c = tl.load(S + row * C + cs, mask=cs < C, other=0.0)
        m = tl.max(m_c, 0)
        w = s_c * tl.exp(m_c - m).to(tl.float64)  # each chunk's share, on the row's scale
        z = tl.sum(w, 0)
        goal = tl.load(U + row) * z
        cw = tl.cumsum(w, 0)
        # The chunk where the running sum passes the goal (the last one with mass, should
        # rounding leave the goal just past the total).
        last_mass = tl.max(tl.where((w > 0) & (cs < C), cs, 0), 0)
        j = tl.minimum(tl.min(tl.where((cw > goal) & (cs < C), cs, CP), 0), last_mass)
        before = tl.sum(tl.where(cs < j, w, 0.0), 0)
        cols = j * CHUNK + tl.arange(0, CHUNK)
        valid = cols < V
        x = tl.load(X + row * stride_x + cols, mask=valid, other=float("-inf"))
        e = tl.exp(x.to(tl.float32) * inv_t - m).to(tl.float64)
        cdf = before + tl.cumsum(e, 0)
        first = tl.min(tl.where((cdf > goal) & valid, cols, V), 0)
        fallback = tl.max(tl.where(valid & (e > 0), cols, -1), 0)
        token = tl.where(first < V, first, fallback).to(tl.int64)
        x_tok = tl.load(X + row * stride_x + token).to(tl.float32)
        logp = x_tok * inv_t - m - tl.log(z.to(tl.float32))
        tl.store(Tokens + row, token)
        tl.store(Logp + row, logp)
        if EMIT:
            seq = tl.load(Seq + row)
            count = tl.load(Count + row)
            tl.store(OutTok + seq * stride_out + count, token)
            tl.store(OutLogp + seq * stride_out + count, logp)
            tl.store(Last + row, token)
            tl.store(Count + row, count + 1)
            hit = tl.load(Done + row) != 0
            for i in range(0, n_stop):
                hit = hit | (tl.load(Stop + i) == token)
            tl.store(Done + row, hit.to(tl.uint8))


def _check_emit(emit: Emit, n: int, device: torch.device) -> None:
    for name in ("out_tokens", "out_logp", "seq", "count", "last", "done", "stop_ids"):
        t = getattr(emit, name)
        if t.device != device:
            raise ValueError(f"emit.{name} on {t.device}, logits on {device}")
    if emit.out_tokens.dim() != 2 or emit.out_tokens.stride() != emit.out_logp.stride():
        raise ValueError("emit.out_tokens and emit.out_logp must be [S, W] with the same strides")
    for name, dtype in (("seq", torch.int64), ("count", torch.int64), ("last", torch.int64),
                        ("done", torch.bool), ("stop_ids", torch.int64)):  # fmt: skip
        t = getattr(emit, name)
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"emit.{name} must be contiguous {dtype}, got {t.dtype}")
        if name != "stop_ids" and t.shape[0] < n:
            raise ValueError(f"emit.{name} holds {t.shape[0]} rows, fewer than the {n} sampled")
    if emit.out_tokens.dtype != torch.int64 or emit.out_logp.dtype != torch.float32:
        raise ValueError("emit.out_tokens must be int64 and emit.out_logp float32")


def sample_rows_triton(
    logits: torch.Tensor,
    temperature: float,
    uniforms: torch.Tensor,
    *,
    chunk: int = 2048,
    emit: Emit | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels (contract in the module docstring); `emit`: also write each row's
    token where the engine keeps it (`Emit`), in the same launch."""
    if not HAS_TRITON:
        raise RuntimeError("sample_rows_triton needs triton, which is not importable")
    n, v = _check(logits, temperature, uniforms)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    dev = logits.device
    if emit is not None:
        _check_emit(emit, n, dev)
    tokens = torch.empty(n, dtype=torch.int64, device=dev)
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return tokens, logp
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    u = uniforms.to(torch.float64).contiguous()
    c = triton.cdiv(v, chunk)
    m = torch.empty(n, c, dtype=torch.float32, device=dev)
    s = torch.empty(n, c, dtype=torch.float64, device=dev)
    inv_t = 1.0 / temperature
    _chunk_stats_kernel[(n, c)](
        logits, m, s, v, logits.stride(0), c, inv_t, CHUNK=chunk, **pdl(dev)
    )
    if emit is None:
        targets: tuple = (tokens, logp, 0, tokens, tokens, tokens, tokens, tokens, 0)
    else:
        targets = (
            emit.out_tokens, emit.out_logp, emit.out_tokens.stride(0), emit.seq, emit.count,
            emit.last, emit.done.view(torch.uint8), emit.stop_ids, emit.stop_ids.numel(),
        )  # fmt: skip
    _pick_kernel[(n,)](
        logits, m, s, u, tokens, logp, v, logits.stride(0), c, inv_t, *targets,
        CHUNK=chunk, CP=triton.next_power_of_2(c), EMIT=emit is not None, num_warps=4,
        **pdl(dev),
    )  # fmt: skip
    return tokens, logp


def sample_rows(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor, emit: Emit | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N] and their log-probabilities [N] (module docstring), written through `emit`
    too when given: the Triton kernels for CUDA tensors when Triton is importable, else the
    PyTorch reference."""
    if logits.is_cuda and HAS_TRITON:
        return sample_rows_triton(logits, temperature, uniforms, emit=emit)
    tokens, logp = sample_rows_reference(logits, temperature, uniforms)
    if emit is not None:
        emit_reference(emit, tokens, logp)
    return tokens, logp
