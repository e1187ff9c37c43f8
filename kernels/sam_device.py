"""The suffix-automaton (SAM) drafter of speculative decoding on the device, without host sync.

The host drafter (`rlkit.rollout.sam.TextMatcher`, no static automaton) drafts from the longest
suffix of a row's text that also occurs earlier in it. For a text x[0..e] (length e + 1):

- the match length l is the longest m such that the last m tokens x[e-m+1..e] also occur
  ending at an earlier position j <= e - 1;
- j* is the smallest such j (the first occurrence) with match length l, or with `latest` the
  largest (the most recent occurrence: `rollout.speculative.sam_match`);
- if l >= min_match (and l > 0) the draft is x[j*+1 : j*+1+room], at most `room` tokens,
  truncated at the text's end (min(room, e - j*) tokens); else there is no draft.

Here the same drafts come from a dense state that is updated elementwise, so that a decoding
step's extend + draft is a fixed sequence of kernels with no host reads (CUDA-graph capturable).
Per batch row b (a slot), all on one device:

    hist  [B, L] int64   the row's text (prompt + generated tokens); positions >= hlen[b]
                         are scratch
    M     [B, L] int32   M[b, o], o >= 1: the match length of the pair (end - o, end), end =
                         hlen[b] - 1: the longest m with x[end-o-m+1..end-o] == x[end-m+1..end];
                         M[b, 0] = 0 and M[b, o] = 0 for o > end
    hlen  [B] int64      the text's length

By offset, appending a token t at position n (the new end) is elementwise: for o in [1, n],
M[o] = M[o] + 1 if hist[n - o] == t else 0; entries o > n stay 0. Hence l = max_o M[o] and
j* = end - o*, o* the LARGEST offset with M[o*] = l (the smallest with `latest`).

    extend(hist, M, hlen, tokens, num) -> None         in place
    draft(hist, M, hlen, room, min_match, k, latest=False) -> (draft_tokens, draft_num)
    longest_match(M, hlen, latest=False) -> (length, offset)

    tokens       [B, T] int64   row b appends tokens[b, :num[b]]; the rest is ignored
    num          [B] int64      in [0, T]; the caller guarantees hlen + num <= L
    room         [B] int64      the most tokens row b may draft (>= 0; 0: no draft)
    min_match    int >= 0       the least match length that drafts (a match of 0 never does)
    k            int >= 0       the drafts' width
    draft_tokens [B, k] int64   hist[b, j*+1 .. j*+draft_num[b]], then zeros
    draft_num    [B] int64      min(room[b], o*, k) when l >= max(min_match, 1), else 0
    length       [B] int64      l (TextMatcher.match)
    offset       [B] int64      o* (0 when l = 0)
    latest       bool           draft from the most recent occurrence, not the first

`extend` writes the new tokens into hist[b, hlen:hlen+num] with one scatter, updates M token by
token (each token's update sees the earlier ones), and adds num to hlen; rows with num = 0 are
left bit for bit as they were (scratch included). A row starts empty with M[b] and hlen[b] zero:
the caller resets a slot it admits a new sequence to by zeroing both itself (`M[rows] = 0;
hlen[rows] = 0`; hist needs no clearing), then extends it by the prompt.

Nothing reads device data on the host (no .item(), .cpu(), boolean-mask indexing or
data-dependent Python control flow), so both the reference and the kernel can be captured in a
torch.cuda.CUDAGraph with the caller's static tensors.

Three functions for extend, as the other kernel modules: `extend_reference` (plain PyTorch, a
Python loop over the T columns with masks), `extend_triton` (grid (B, cdiv(L, BLOCK)): each
program keeps its block of offsets of M in registers across the T tokens, reading hist only)
and the dispatcher `extend` (the kernel for CUDA tensors when Triton is importable, else the
reference). `draft` and `longest_match` are PyTorch reductions over M, one version everywhere.

Cost: an extend is O(B L T) elementwise work and a draft O(B L), against the host automaton's
O(1) amortised per token; what is saved is the device-to-host round trip of every step.
"""

from __future__ import annotations

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

__all__ = [
    "HAS_TRITON",
    "draft",
    "extend",
    "extend_reference",
    "extend_triton",
    "longest_match",
]


def _expect(
    name: str, x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, hist: torch.Tensor
) -> None:
    """Raise ValueError unless x has this shape, dtype and hist's device."""
    if tuple(x.shape) != shape:
        dims = "[B, L]" if len(shape) == 2 else "[B]"
        raise ValueError(f"{name} must be {dims} = {shape}, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {x.dtype}")
    if x.device != hist.device:
        raise ValueError(f"{name} is on {x.device}, hist on {hist.device}")


def _check_state(hist: torch.Tensor, M: torch.Tensor, hlen: torch.Tensor) -> tuple[int, int]:
    """Raise ValueError naming the first wrong argument; else (B, L)."""
    if hist.dim() != 2:
        raise ValueError(f"hist must be [B, L], got shape {tuple(hist.shape)}")
    if hist.dtype != torch.int64:
        raise ValueError(f"hist must be int64, got {hist.dtype}")
    B, L = hist.shape
    _expect("M", M, (B, L), torch.int32, hist)
    _expect("hlen", hlen, (B,), torch.int64, hist)
    if L and (hist.stride(1) != 1 or M.stride(1) != 1):
        raise ValueError("hist and M need a unit column stride")
    return B, L


def _check_extend(
    hist: torch.Tensor, M: torch.Tensor, hlen: torch.Tensor, tokens: torch.Tensor, num: torch.Tensor
) -> tuple[int, int, int]:
    """Raise ValueError naming the first wrong argument; else (B, L, T)."""
    B, L = _check_state(hist, M, hlen)
    if tokens.dim() != 2 or tokens.shape[0] != B:
        raise ValueError(f"tokens must be [B, T] with B = {B}, got shape {tuple(tokens.shape)}")
    if tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64, got {tokens.dtype}")
    if tokens.device != hist.device:
        raise ValueError(f"tokens is on {tokens.device}, hist on {hist.device}")
    _expect("num", num, (B,), torch.int64, hist)
    T = tokens.shape[1]
    if T and tokens.stride(1) != 1:
        raise ValueError("tokens needs a unit column stride")
    return B, L, T


def _write_tokens(
    hist: torch.Tensor, hlen: torch.Tensor, tokens: torch.Tensor, num: torch.Tensor
) -> None:
    """hist[b, hlen:hlen+num] = tokens[b, :num], one scatter with no host read: the columns
    past num[b] rewrite the row's last new token (num 0: hist[b, hlen] its own value, clamped
    into the row), so that every duplicate index of the scatter carries the same value."""
    B, L = hist.shape
    T = tokens.shape[1]
    last = (num - 1).clamp(min=0).unsqueeze(1)
    col = torch.minimum(torch.arange(T, device=hist.device).unsqueeze(0), last)  # [B, T]
    idx = (hlen.unsqueeze(1) + col).clamp(max=L - 1)
    src = torch.where((num > 0).unsqueeze(1), tokens.gather(1, col), hist.gather(1, idx))
    hist.scatter_(1, idx, src)


def extend_reference(
    hist: torch.Tensor, M: torch.Tensor, hlen: torch.Tensor, tokens: torch.Tensor, num: torch.Tensor
) -> None:
    """Row b appends tokens[b, :num[b]] (module docstring), in place; plain PyTorch."""
    B, L, T = _check_extend(hist, M, hlen, tokens, num)
    if B == 0 or L == 0 or T == 0:
        return
    _write_tokens(hist, hlen, tokens, num)
    o = torch.arange(L, device=hist.device).unsqueeze(0)  # [1, L]
    for t in range(T):
        n = (hlen + t).unsqueeze(1)  # the new end, [B, 1]
        prev = hist.gather(1, (n - o).clamp(min=0, max=L - 1).expand(B, L))
        hit = (o >= 1) & (o <= n) & (prev == tokens[:, t : t + 1])
        new = torch.where(hit, M + 1, 0)
        M.copy_(torch.where((t < num).unsqueeze(1), new, M))
    hlen.add_(num)


if HAS_TRITON:

    @triton.jit
    def _extend_kernel(
        Hist, Mat, Hlen, Tokens, Num, stride_h, stride_m, stride_t, L, T, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        o = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_row = o < L
        h_row = Hist + row * stride_h
        m_ptr = Mat + row * stride_m + o
        m = tl.load(m_ptr, mask=in_row, other=0)
        hlen = tl.load(Hlen + row)
        num = tl.load(Num + row)
        for t in range(0, T):
            n = hlen + t  # the new end
            # A block, not a scalar: Triton's interpreter (3.x) mis-types a block mask & a
            # scalar one.
            active = tl.full([BLOCK], t, tl.int64) < num
            tok = tl.load(Tokens + row * stride_t + t)
            valid = in_row & (o >= 1) & (o <= n)
            prev = tl.load(h_row + (n - o), mask=valid & active, other=0)
            new = tl.where(valid & (prev == tok), m + 1, 0)
            m = tl.where(active, new, m)
        tl.store(m_ptr, m, mask=in_row)


def extend_triton(
    hist: torch.Tensor,
    M: torch.Tensor,
    hlen: torch.Tensor,
    tokens: torch.Tensor,
    num: torch.Tensor,
    *,
    block: int = 1024,
) -> None:
    """The kernel (module docstring), in place; `block`: offsets of M a program holds."""
    if not HAS_TRITON:
        raise RuntimeError("extend_triton needs triton, which is not importable")
    B, L, T = _check_extend(hist, M, hlen, tokens, num)
    if B == 0 or L == 0 or T == 0:
        return
    # The new tokens first: every program reads hist at the new positions.
    _write_tokens(hist, hlen, tokens, num)
    grid = (B, triton.cdiv(L, block))
    _extend_kernel[grid](hist, M, hlen, tokens, num, hist.stride(0), M.stride(0),
                         tokens.stride(0), L, T, BLOCK=block, num_warps=4)  # fmt: skip
    hlen.add_(num)


def extend(
    hist: torch.Tensor, M: torch.Tensor, hlen: torch.Tensor, tokens: torch.Tensor, num: torch.Tensor
) -> None:
    """Row b appends tokens[b, :num[b]] (module docstring), in place: the kernel for CUDA
    tensors when Triton is importable, else the reference."""
    if hist.is_cuda and HAS_TRITON:
        extend_triton(hist, M, hlen, tokens, num)
    else:
        extend_reference(hist, M, hlen, tokens, num)


def longest_match(
    M: torch.Tensor, hlen: torch.Tensor, latest: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, o*) [B] int64 each: the longest match's length and its largest offset (the first
    occurrence, j* = hlen - 1 - o*), or with `latest` its smallest (the most recent); o* = 0
    where l = 0."""
    if M.dim() != 2:
        raise ValueError(f"M must be [B, L], got shape {tuple(M.shape)}")
    B, L = M.shape
    if tuple(hlen.shape) != (B,):
        raise ValueError(f"hlen must be [B] = {(B,)}, got shape {tuple(hlen.shape)}")
    if L == 0:
        zero = torch.zeros(B, dtype=torch.int64, device=M.device)
        return zero, zero.clone()
    o = torch.arange(L, device=M.device).unsqueeze(0)
    m = torch.where((o >= 1) & (o < hlen.unsqueeze(1)), M, 0).to(torch.int64)
    length = m.max(dim=1).values
    hit = (m == length.unsqueeze(1)) & (length.unsqueeze(1) > 0)
    if latest:
        return length, torch.where(hit, o, L).min(dim=1).values % L  # L (no hit) -> 0
    return length, torch.where(hit, o, 0).max(dim=1).values


def draft(
    hist: torch.Tensor,
    M: torch.Tensor,
    hlen: torch.Tensor,
    room: torch.Tensor,
    min_match: int,
    k: int,
    latest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, k] int64, num [B] int64): each row's draft of up to min(room[b], k) tokens
    (module docstring), TextMatcher.draft's; capturable, PyTorch on every device."""
    B, L = _check_state(hist, M, hlen)
    if tuple(room.shape) != (B,):
        raise ValueError(f"room must be [B] = {(B,)}, got shape {tuple(room.shape)}")
    if room.device != hist.device:
        raise ValueError(f"room is on {room.device}, hist on {hist.device}")
    if min_match < 0 or k < 0:
        raise ValueError(f"min_match and k must be >= 0, got {min_match} and {k}")
    length, offset = longest_match(M, hlen, latest)
    cap = torch.minimum(room.to(torch.int64).clamp(min=0, max=k), offset)
    num = torch.where(length >= max(min_match, 1), cap, 0)
    i = torch.arange(k, device=hist.device).unsqueeze(0)
    start = (hlen - offset).unsqueeze(1)  # j* + 1
    if L == 0:
        return torch.zeros(B, k, dtype=torch.int64, device=hist.device), num
    got = hist.gather(1, (start + i).clamp(min=0, max=L - 1))
    return torch.where(i < num.unsqueeze(1), got, 0), num
