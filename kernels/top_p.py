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
searches the floor among the row's own values. One pass reads the row's maximum, least finite
logit and softmax total Z (each lane rescaling its sum as its maximum grows). Then it bisects:
- `search="values"` (the GPU path): over logit values from max - (ln(V / (1 - top_p)) + 1),
  below which the tokens cannot hold 1 - top_p of the mass, up to the maximum. Each pass at a
  threshold t sums M(t) and also finds the nearest logits on either side of t with their mass,
  so it ends as soon as t falls within a logit's gap of the floor: ~6 passes on SmolLM2-sized
  rows of randn * 4.
- `search="keys"`: over the float32 values ordered as integers (a float's bits, the negative
  ones' magnitude bits flipped), keeping M(hi) < top_p Z <= M(lo) until hi and lo are
  adjacent floats (~34 passes).
Each pass reads the row from L2 while the batch's rows fit there (64 rows of 49,152 float32
are 12.6 MB). On the H200 the value search takes 64-91 us at 1-64 rows, against 166-171 for
the key search and 89-440 for the sort (`bench_top_p.py`, fifteenth session). The sums run
in float32 in another order than the sort's cumulative sum, so the two can differ only where
M(v) is within float32 rounding of top_p Z.
"""

from __future__ import annotations

import math

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
        X, Out, Need, stride_x, V, top_p, span,
        HAS_NEED: tl.constexpr, BLOCK: tl.constexpr, BY_VALUE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = X + row * stride_x
        offs = tl.arange(0, BLOCK)
        if HAS_NEED:
            # A row not needed reads nothing: every loop below runs 0 times, the bracket is
            # empty, and the floor stored is -inf.
            need = tl.load(Need + row) != 0
            V = tl.where(need, V, 0)
        # One pass: the row's maximum, its least finite logit and Z, the softmax total relative
        # to the maximum (each lane rescales its sum when its maximum grows).
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        lo_x = tl.full([BLOCK], float("inf"), tl.float32)
        lane_z = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
            new_max = tl.maximum(lane_max, x)
            finite = new_max > float("-inf")
            lane_z = tl.where(
                finite, lane_z * tl.exp(lane_max - new_max) + tl.exp(x - new_max), 0.0
            )
            lane_max = new_max
            lo_x = tl.minimum(lo_x, tl.where(x == float("-inf"), float("inf"), x))
        m = tl.max(lane_max, 0)
        least = tl.min(lo_x, 0)
        z = tl.sum(tl.where(lane_max > float("-inf"), lane_z * tl.exp(lane_max - m), 0.0), 0)
        target = top_p * z
        if BY_VALUE:
            # Bisection over logit values. M(v): the mass strictly above v; the floor f is the
            # least logit with M(f) < target. Invariant: lo < f <= up. Start: up = max (M = 0),
            # lo = max - span with span = ln(V / (1 - top_p)) + 1: the tokens at or below lo
            # hold at most V e^-span < (1 - top_p) of Z (Z >= 1, the maximum's own term), so
            # M(lo) >= top_p Z. A pass at t = (lo + up) / 2 sums S = M(t) and finds a, the
            # least logit above t, and b, the greatest at or below it, with the mass of the
            # tokens equal to each (w_a, w_b). S >= target: f > t, and f = a when M(a) =
            # S - w_a < target (no logit between t and f); else lo = t. S < target: f <= t
            # (b qualifies: M(b) = S), and f = b when M(next logit below b) = S + w_b >=
            # target; else up = t. It ends once t falls within a logit's gap of f: a few
            # passes on a language model's rows; adjacent floats end it too (f = up).
            up = m
            lo = m - span
            floor = m
            done = tl.zeros([], tl.int32)
            while done == 0:
                t = lo + (up - lo) * 0.5
                # Adjacent floats (or an empty row's NaN): f is up.
                adjacent = (t <= lo) | (t >= up) | (t != t)
                n = tl.where(adjacent, 0, V)
                acc = tl.zeros([BLOCK], tl.float32)
                a_x = tl.full([BLOCK], float("inf"), tl.float32)
                a_w = tl.zeros([BLOCK], tl.float32)
                b_x = tl.full([BLOCK], float("-inf"), tl.float32)
                b_w = tl.zeros([BLOCK], tl.float32)
                for start in range(0, n, BLOCK):
                    x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
                    e = tl.exp(x - m)
                    above = x > t
                    acc += tl.where(above, e, 0.0)
                    # Each lane's least value above t and its mass, greatest at or below.
                    a_w = tl.where(above & (x == a_x), a_w + e, a_w)
                    a_new = above & (x < a_x)
                    a_w = tl.where(a_new, e, a_w)
                    a_x = tl.where(a_new, x, a_x)
                    below_t = (~above) & (x > float("-inf"))
                    b_w = tl.where(below_t & (x == b_x), b_w + e, b_w)
                    b_new = below_t & (x > b_x)
                    b_w = tl.where(b_new, e, b_w)
                    b_x = tl.where(b_new, x, b_x)
                s_t = tl.sum(acc, 0)
                a = tl.min(a_x, 0)
                w_a = tl.sum(tl.where(a_x == a, a_w, 0.0), 0)
                b = tl.max(b_x, 0)
                w_b = tl.sum(tl.where(b_x == b, b_w, 0.0), 0)
                reach = s_t >= target
                found_a = reach & (s_t - w_a < target) & ~adjacent
                found_b = (~reach) & (s_t + w_b >= target) & ~adjacent
                floor = tl.where(adjacent, up, tl.where(found_a, a, tl.where(found_b, b, floor)))
                done = (adjacent | found_a | found_b).to(tl.int32)
                lo = tl.where(reach & ~adjacent, t, lo)
                up = tl.where((~reach) & ~adjacent, t, up)
        else:
            # Bisection over the float32 keys between the least logit and the maximum: M(max)
            # = 0; below the least logit, M = Z. Until hi and lo are adjacent floats (~32
            # passes): hi is then a logit of the row and the floor.
            khi = _key(m).to(tl.int64)
            klo = _key(least).to(tl.int64) - 1
            while khi - klo > 1:
                mid = klo + (khi - klo) // 2
                t = _value(mid)
                acc = tl.zeros([BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
                    acc += tl.where(x > t, tl.exp(x - m), 0.0)
                above = tl.sum(acc, 0)
                khi = tl.where(above < target, mid, khi)
                klo = tl.where(above < target, klo, mid)
            floor = _value(khi)
        if HAS_NEED:
            floor = tl.where(need, floor, float("-inf"))
        tl.store(Out + row, floor)


# The kernel's setting on the GPU path: 1,024 columns an iteration, the search over values.
# The search over keys (~34 passes a row) took 128-136 us for 1-16 rows of SmolLM2's 49,152
# tokens in the H200 engine's profiles (2026-11-30, fifteenth session: 12-13% of a plain decode
# step at 1-16 rows); the search over values needs ~6 passes on randn * 4 rows of that size (14
# on randn * 2). `benchmarks/bench_top_p.py` on the H200, same session, values search at 1,024
# / 2,048 columns: 64 / 67 us at 1 row, 85 / 90 at 16, 85 / 91 at 64, 154 / 163 at 256 (the
# key search at 2,048: 166 / 171 / 171 / 555). The W-way key search lost to bisection (188 /
# 346 / 764 us at 64 / 256 / 448 rows, eleventh session) and is gone.
BLOCK, SEARCH = 1024, "values"
SEARCHES = ("values", "keys")


def top_p_floor_triton(
    scaled: torch.Tensor,
    top_p: float,
    need: torch.Tensor | None = None,
    *,
    block: int = BLOCK,
    search: str = SEARCH,
) -> torch.Tensor:
    """The kernel (module docstring); `block`: columns a program reads per iteration;
    `search`: "values" (bisection over logit values snapped to the row's logits) or "keys"
    (bisection over the float32 keys to adjacent floats). Both find the same floor."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if not HAS_TRITON:
        raise RuntimeError("top_p_floor_triton needs triton, which is not importable")
    _check(scaled, top_p, need)
    N, V = scaled.shape
    out = torch.empty((N, 1), dtype=torch.float32, device=scaled.device)
    if N == 0:
        return out
    span = math.log(max(V, 1) / (1.0 - top_p)) + 1.0
    _top_p_floor_kernel[(N,)](
        scaled, out, out if need is None else need, scaled.stride(0), V, float(top_p), span,
        HAS_NEED=need is not None, BLOCK=block, BY_VALUE=search == "values", num_warps=8,
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
