"""Top-p's nucleus floor of a batch of logit rows without sorting them.

    top_p_floor(scaled, top_p, need=None) -> floor

    scaled  [N, V] float32   logits / temperature, -inf for tokens masked before (top-k);
                             unit column stride
    top_p   float in (0, 1)
    need    [N] bool or None the rows whose floor is wanted (None: all); the others get -inf
                             (top-p keeps all of such a row) at no cost: a speculative verify
                             step samples k + 1 positions a row, of which only the drafted
                             ones and the next are read
    floor   [N, 1] float32   the least logit the nucleus keeps: top-p keeps exactly the
                             tokens with scaled >= floor

The nucleus (Hugging Face's rule, `rlkit.rollout.sampling`): rank the tokens by probability;
keep a token while the mass of those ranked before it is below top_p (the most likely always
stays), and every token tied with the last one kept. Equivalently, with M(v) the mass of the
tokens whose logit is strictly above v, the floor is the least logit v of the row with
M(v) < top_p: a tie group is kept whole exactly when the mass above it is below top_p.

Three functions, as the other kernel modules: `top_p_floor_reference` (the sort: the rule as
stated), `top_p_floor_triton`, and the dispatcher `top_p_floor` (the kernel for CUDA tensors
when Triton is importable, else the reference).

Why a kernel: on a GPU the sort of every row was most of a sampled step's sampling
(`benchmarks/bench_top_p.py` on an H200, 2026-11-30: 467 us for 64 rows of SmolLM2's 49,152
tokens, 1,529 us for the 256 rows of a speculative verify step at k = 3, against 25 / 103 us
for the whole sampling distribution without top-p). The kernel is one program per row that
searches the floor among the row's own values: it reads the row once for its maximum and least
finite logit, once for the softmax total Z, then bisects over the float32 values between them
(ordered as integers: a float's bits, the negative ones' magnitude bits flipped), one pass per
step summing exp(x - max) over x > t, keeping M(hi) < top_p Z <= M(lo), until hi and lo are
adjacent floats; hi is then a logit of the row and the floor (with `ways` W > 2, each pass
tests W - 1 values at once and keeps the bracket between the last whose mass above still
reaches top_p Z and the next: W-fold a pass). At most 32 steps, each a pass
over the row (from L2 while the batch's rows fit there: 64 rows of 49,152 float32 are 12.6 MB);
on the H200 that is still 3.4x (64 rows) to 4.3x (256 rows) faster than the sort. The sums run
in float32 in another order than the sort's cumulative sum, so the two can differ only where
M(v) is within float32 rounding of top_p Z.
"""

from __future__ import annotations

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "top_p_floor", "top_p_floor_reference", "top_p_floor_triton"]


def _check(scaled: torch.Tensor, top_p: float, need: torch.Tensor | None = None) -> None:
    if need is not None and (
        need.dtype != torch.bool or tuple(need.shape) != scaled.shape[:1]
        or need.device != scaled.device
    ):  # fmt: skip
        raise ValueError(
            f"need must be a bool [N] = {tuple(scaled.shape[:1])} tensor on {scaled.device}, "
            f"got {need.dtype} {tuple(need.shape)} on {need.device}"
        )
    if scaled.dim() != 2:
        raise ValueError(f"scaled must be [N, V], got shape {tuple(scaled.shape)}")
    if scaled.dtype != torch.float32:
        raise ValueError(f"scaled must be float32, got {scaled.dtype}")
    if scaled.shape[1] and scaled.stride(1) != 1:
        raise ValueError("scaled needs a unit column stride")
    if not 0 < top_p < 1:
        raise ValueError(f"top_p must be in (0, 1), got {top_p}")


def top_p_floor_reference(
    scaled: torch.Tensor, top_p: float, need: torch.Tensor | None = None
) -> torch.Tensor:
    """The rule by sorting every row: the least kept logit [N, 1]."""
    _check(scaled, top_p, need)
    probs = torch.softmax(scaled, dim=-1)
    full, order = torch.sort(probs, dim=-1, descending=True)
    return unneeded(floor_of_sorted(scaled.gather(-1, order), full, top_p), need)


def unneeded(floor: torch.Tensor, need: torch.Tensor | None) -> torch.Tensor:
    """floor [N, 1] with -inf at the rows `need` [N] leaves out."""
    if need is None:
        return floor
    return torch.where(need[:, None], floor, float("-inf"))


def floor_of_sorted(logits: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The least kept logit [N, 1] from rows sorted by probability, descending (all of a row
    or its most likely candidates)."""
    kept = ((probs.cumsum(dim=-1) - probs) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    return logits.gather(-1, kept - 1)


if HAS_TRITON:

    @triton.jit
    def _key(x):
        # float32 -> int32 in the floats' order (the negative ones' magnitude bits flipped;
        # the map is its own inverse on the bits).
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _value(key):
        k = key.to(tl.int32)
        return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)

    @triton.jit
    def _top_p_floor_kernel(
        X, Out, Need, stride_x, V, top_p,
        HAS_NEED: tl.constexpr, BLOCK: tl.constexpr, WAYS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = X + row * stride_x
        offs = tl.arange(0, BLOCK)
        if HAS_NEED:
            # A row not needed reads nothing: every loop below runs 0 times, the bracket is
            # empty, and the floor stored is -inf.
            need = tl.load(Need + row) != 0
            V = tl.where(need, V, 0)
        # The row's maximum and least finite logit.
        hi_x = tl.full([BLOCK], float("-inf"), tl.float32)
        lo_x = tl.full([BLOCK], float("inf"), tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
            hi_x = tl.maximum(hi_x, x)
            lo_x = tl.minimum(lo_x, tl.where(x == float("-inf"), float("inf"), x))
        m = tl.max(hi_x, 0)
        least = tl.min(lo_x, 0)
        # Z: the softmax total, relative to the maximum.
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
            acc += tl.exp(x - m)
        target = top_p * tl.sum(acc, 0)
        # M(value(hi)) < target <= M(value(lo)): M(max) = 0; below the least logit, M = Z.
        hi = _key(m).to(tl.int64)
        lo = _key(least).to(tl.int64) - 1
        # Each pass tests WAYS - 1 keys spread over (lo, hi) (entry 0 is lo itself) and keeps
        # the bracket between the last one whose mass above reaches the target and the next:
        # the bracket shrinks WAYS-fold a pass (WAYS = 2: bisection).
        if WAYS == 2:
            # Bisection, with a [BLOCK] accumulator (the general loop's [2, BLOCK] one doubles
            # the work a pass: 332 against 131 us at 64 rows on the H200).
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                t = _value(mid)
                acc = tl.zeros([BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
                    acc += tl.where(x > t, tl.exp(x - m), 0.0)
                above = tl.sum(acc, 0)
                hi = tl.where(above < target, mid, hi)
                lo = tl.where(above < target, lo, mid)
        else:
            ways = tl.arange(0, WAYS).to(tl.int64)
            while hi - lo > 1:
                mids = lo + ((hi - lo) * ways) // WAYS  # [WAYS], non-decreasing
                t = _value(mids)
                mass = tl.zeros([WAYS, BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
                    e = tl.exp(x - m)[None, :]
                    mass += tl.where(x[None, :] > t[:, None], e, 0.0)
                above = tl.sum(mass, 1)  # [WAYS], non-increasing: sums of nested subsets
                reach = above >= target
                # Entry 0 (lo) always reaches; `hi` is the first test that does not, if any.
                lo = tl.max(tl.where(reach, mids, lo), 0)
                hi = tl.min(tl.where(reach, hi, mids), 0)
        floor = _value(hi)
        if HAS_NEED:
            floor = tl.where(need, floor, float("-inf"))
        tl.store(Out + row, floor)


# The kernel's setting on the GPU path: bisection with 2,048 columns an iteration. On the
# H200 (2026-11-30, eleventh session, `benchmarks/bench_top_p.py --kernels`) the W-way search
# lost to it: W = 16 / 1,024 columns took 188 / 346 / 764 us at 64 / 256 / 448 rows, the
# bisection 131 / 326 us at 64 / 256 (ninth session).
BLOCK, WAYS = 2048, 2


def top_p_floor_triton(
    scaled: torch.Tensor,
    top_p: float,
    need: torch.Tensor | None = None,
    *,
    block: int = BLOCK,
    ways: int = WAYS,
) -> torch.Tensor:
    """The kernel (module docstring); `block`: columns a program reads per iteration; `ways`
    (a power of two >= 2): keys tested a pass (2: bisection)."""
    if ways < 2 or ways & (ways - 1):
        raise ValueError(f"ways must be a power of two >= 2, got {ways}")
    if not HAS_TRITON:
        raise RuntimeError("top_p_floor_triton needs triton, which is not importable")
    _check(scaled, top_p, need)
    N, V = scaled.shape
    out = torch.empty((N, 1), dtype=torch.float32, device=scaled.device)
    if N == 0:
        return out
    _top_p_floor_kernel[(N,)](
        scaled, out, out if need is None else need, scaled.stride(0), V, float(top_p),
        HAS_NEED=need is not None, BLOCK=block, WAYS=ways, num_warps=8,
    )  # fmt: skip
    return out


def top_p_floor(
    scaled: torch.Tensor, top_p: float, need: torch.Tensor | None = None
) -> torch.Tensor:
    """The nucleus floor [N, 1] (module docstring): the kernel for CUDA tensors when Triton is
    importable, else the sort."""
    if scaled.is_cuda and HAS_TRITON:
        return top_p_floor_triton(scaled, top_p, need)
    return top_p_floor_reference(scaled, top_p, need)
