"""KV compression on the GPU (Sparse-RL): scoring, selection and compaction of cached entries.

A compression of one layer (`rollout/compression.py`, `rollout/kv_cache.py`) reads the cached
keys of R sequences, scores every entry, keeps `budget` of them and gathers those to the front
of each sequence's cache row. Three ops, each a Triton kernel beside its PyTorch reference:

    window_scores(queries, keys, lengths) -> scores
        queries  [R, H, w, D]   the last w tokens' queries, oldest first (query i sits at
                                entry lengths[r] - w + i and sees the entries up to it)
        keys     [R, KVH, L, D] any strides (a view of the cache); lengths[r] >= w
        scores   [R, KVH, L] float32: the attention probabilities the G * w queries of each kv
                                head's group give each entry, averaged; 0 past a length

    keep_top(scores, lengths, budget, window) -> indices
        scores   [R, X, L]      (X: kv heads, or 1 for a row shared by every head)
        indices  [R, X, budget] int64, ascending: the last `window` valid entries, then the
                                highest scores among the other valid ones; ties go to the
                                earlier entry (the reference's stable sort)

    compact_rows(store, rows, indices)        in place
        store    [S, KVH, L, D] (or [S, KVH, L]) a cache tensor; rows [R] int64 slots;
        indices  [R, KVH, budget] ascending  -> store[rows[r], h, :budget] = store[rows[r], h,
                                                indices[r, h]]

    fill_moves(chosen, budget, length) -> (src, dst)
        chosen   [R, KVH, budget] the kept entries, any order, all < length
        src, dst [R, KVH, length - budget] int64: the kept entries at or past `budget` (in
                                entry order) and the evicted places below it (in order) they
                                go to; -1 past each row's count. Pure PyTorch, no host read.

    fill_plan(kept, budget, length) -> (src, dst, head)
        kept     [R, KVH, budget] the kept places in their tokens' order: the places below the
                                budget in any order, then the ones at or past it ascending
                                (those hold the tokens since the last compression)
        src, dst as fill_moves'; head [R, KVH, budget] int64: places 0..budget-1 after the
                                moves in their tokens' order (the unmoved kept places, then
                                the places the moved entries went to). The order a filled row
                                keeps for its next compression.

    fill_rows(store, rows, src, dst)          in place
        store[rows[r], h, dst[r, h, i]] = store[rows[r], h, src[r, h, i]] where src >= 0:
        the kept entries end in places 0..budget-1 moving only the ones past the budget
        (a row's order changes; `rollout/kv_cache.py` keeps the entries' positions)

The dispatchers (`window_scores`, `keep_top`, `compact_rows`, `fill_plan`, `fill_rows`) run the
kernel for CUDA tensors when Triton is importable and the reference otherwise. None of them reads a value
back to the host, so a compression is launched without a host synchronisation.

Kernels. `window_scores`: three launches, the first and last parallel over (entry block, kv
head, sequence), so that the work spreads over the whole GPU whatever the batch: per block of
entries, each of the G * w query rows' logits max and exp-sum (`_window_stats_kernel`); per
row, those combined into the log2 softmax denominator (`_window_norm_kernel`); per block again,
the logits recomputed, normalised and summed over rows (`_window_probs_kernel`). The logits
are a tensor-core dot of the cache's dtype with a float32 accumulator (bf16 products are exact
in float32, so only the summation order differs from the reference; float32 inputs take three
tf32 products); under the interpreter (CPU tensors) the dot is float32. Loop bounds are kernel
arguments, never loaded from memory (the interpreter of triton 3.6 cannot take those); each
row's length masks, and entries at or past it are not read.

`keep_top` ranks without sorting: entry i's rank is the number of entries scoring higher plus
the earlier ones scoring the same (the stable sort's order), window entries scoring +inf and
padding -inf; an entry is kept when its rank is under the budget (`_keep_rank_kernel`, parallel
over (entry block, head, row)), and its output place is the number of kept entries before it
(`_keep_place_kernel`: a running count and a cumulative sum over blocks, per (head, row)).
`compact_rows`: one program per (sequence, kv head) walks the kept places in blocks; since
indices are ascending and indices[p] >= p, a block reads only places at or after its own, and
a barrier between its loads and its stores makes the copy in place safe (and the walk serial).
It reads and writes every kept entry: at the memory wall (455 rows of a 1.5B model) 252 us a
layer's K or V, at the copy bandwidth. `fill_rows` moves only the kept entries past the budget,
at most `interval` a row (sources past the budget, destinations below it: no program reads
what another writes), one program per (sequence, kv head, block of moves). `fill_plan`: one
program per (sequence, kv head) in one launch, where `fill_moves` and the head's order take a
dozen PyTorch launches: the kept places below the budget marked in a scratch row (a scatter,
then a barrier), the evicted places ranked by a cumulative sum, and src, dst and the head's
order scattered from those ranks.
"""

from __future__ import annotations

import math

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

__all__ = [
    "HAS_TRITON",
    "compact_rows",
    "compact_rows_reference",
    "compact_rows_triton",
    "fill_moves",
    "fill_rows",
    "fill_rows_reference",
    "fill_rows_triton",
    "keep_top",
    "keep_top_reference",
    "keep_top_triton",
    "window_scores",
    "window_scores_reference",
    "window_scores_triton",
]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> None:
    if queries.dim() != 4:
        raise ValueError(f"queries must be [R, H, w, D], got shape {tuple(queries.shape)}")
    if keys.dim() != 4:
        raise ValueError(f"keys must be [R, KVH, L, D], got shape {tuple(keys.shape)}")
    R, H, _, D = queries.shape
    if keys.shape[0] != R or keys.shape[3] != D:
        raise ValueError(
            f"keys shape {tuple(keys.shape)} does not match queries {tuple(queries.shape)}"
        )
    if keys.shape[1] == 0 or H % keys.shape[1]:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads {keys.shape[1]}")
    if lengths.shape != (R,):
        raise ValueError(f"lengths must be [R]=[{R}], got shape {tuple(lengths.shape)}")


def _check_keep(scores: torch.Tensor, lengths: torch.Tensor, budget: int, window: int) -> None:
    if scores.dim() != 3:
        raise ValueError(f"scores must be [R, X, L], got shape {tuple(scores.shape)}")
    if lengths.shape != (scores.shape[0],):
        raise ValueError(
            f"lengths must be [R]=[{scores.shape[0]}], got shape {tuple(lengths.shape)}"
        )
    if not 0 <= window <= budget <= scores.shape[2]:
        raise ValueError(
            f"need 0 <= window <= budget <= L, got window {window}, budget {budget}, "
            f"L {scores.shape[2]}"
        )


def _check_compact(store: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor) -> None:
    if store.dim() not in (3, 4):
        raise ValueError(f"store must be [S, KVH, L(, D)], got shape {tuple(store.shape)}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be [R], got shape {tuple(rows.shape)}")
    R, kvh = rows.shape[0], store.shape[1]
    if indices.dim() != 3 or indices.shape[:2] != (R, kvh) or indices.shape[2] > store.shape[2]:
        raise ValueError(
            f"indices must be [R, KVH, budget]=[{R}, {kvh}, <= {store.shape[2]}], got "
            f"shape {tuple(indices.shape)}"
        )


# -- references -----------------------------------------------------------------------------


def window_scores_reference(
    queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch (float32 math) with the contract of the module docstring."""
    _check_scores(queries, keys, lengths)
    B, H, w, D = queries.shape
    kvh, L = keys.shape[1], keys.shape[2]
    group = H // kvh
    q = queries.reshape(B, kvh, group * w, D).float()
    logits = q @ keys.float().transpose(-1, -2) / math.sqrt(D)  # [B, KVH, G*w, L]
    at = lengths.to(keys.device)[:, None] - w + torch.arange(w, device=keys.device)  # [B, w]
    visible = torch.arange(L, device=keys.device) <= at[:, :, None]  # [B, w, L]
    visible = visible[:, None, None].expand(B, 1, group, w, L).reshape(B, 1, group * w, L)
    probs = logits.masked_fill(~visible, -math.inf).softmax(dim=-1)
    return probs.mean(dim=2)


def keep_top_reference(
    scores: torch.Tensor, lengths: torch.Tensor, budget: int, window: int
) -> torch.Tensor:
    """Plain PyTorch: a stable sort, so that ties (max-pooling makes plateaus of equal scores)
    go to the earlier entry whatever the row's padding, and a sequence keeps the same entries
    in any batch."""
    _check_keep(scores, lengths, budget, window)
    L = scores.shape[-1]
    idx = torch.arange(L, device=scores.device)
    lens = lengths.to(scores.device)[:, None, None]
    s = scores.float().masked_fill(idx >= lens - window, math.inf)
    s = s.masked_fill(idx >= lens, -math.inf)
    order = s.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :budget].sort(dim=-1).values


def selection_gap(
    got: torch.Tensor, want: torch.Tensor, lengths: torch.Tensor, budget: int, window: int
) -> float:
    """How far from the reference's cut-off (its weakest kept non-window score) lies any entry
    that the selection from `got` scores [R, X, L] and the one from `want` disagree on: 0 when
    they keep the same entries; near-ties at the cut-off may swap by up to the scores' error.
    (How a scoring kernel is judged against its reference: by what it keeps.)"""
    L = want.shape[-1]
    a = keep_top_reference(got, lengths, budget, window)
    b = keep_top_reference(want, lengths, budget, window)
    kept_a = torch.zeros_like(want, dtype=torch.bool).scatter_(-1, a, True)
    kept_b = torch.zeros_like(want, dtype=torch.bool).scatter_(-1, b, True)
    swapped = kept_a ^ kept_b  # [R, X, L]
    if not swapped.any():
        return 0.0
    in_window = torch.arange(L, device=want.device) >= (lengths[:, None] - window)  # [R, L]
    cut = want.masked_fill(~kept_b | in_window[:, None], torch.inf).amin(-1, keepdim=True)
    return float((want - cut).abs()[swapped].max())


def compact_rows_reference(store: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor) -> None:
    """Plain PyTorch: gather the kept entries out of place, write them back."""
    _check_compact(store, rows, indices)
    R, kvh, n = indices.shape
    rows = rows.to(store.device)
    heads = torch.arange(kvh, device=store.device)
    kept = store[rows[:, None, None], heads[None, :, None], indices.to(store.device)]
    store[rows, :, :n] = kept  # [R, KVH, n(, D)]


def fill_moves(chosen: torch.Tensor, budget: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) [R, KVH, length - budget] of `fill_rows` for the kept entries `chosen`
    [R, KVH, budget] (distinct, < length): the i-th kept entry at or past the budget goes to
    the i-th evicted place below it; -1 past each row's count (the two counts are equal)."""
    if chosen.dim() != 3 or chosen.shape[2] != budget or not 0 < budget <= length:
        raise ValueError(
            f"chosen must be [R, KVH, budget={budget}] with budget <= length {length}, got "
            f"shape {tuple(chosen.shape)}"
        )
    R, kvh, _ = chosen.shape
    kept = torch.zeros(R, kvh, length, dtype=torch.bool, device=chosen.device)
    kept.scatter_(-1, chosen, True)
    moves = length - budget

    def ranked(mask: torch.Tensor, offset: int) -> torch.Tensor:
        # The indices (+ offset) of mask's True entries in order, into `moves` places.
        rank = torch.where(mask, mask.long().cumsum(-1) - 1, moves)  # `moves`: a spare place
        at = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask) + offset
        out = torch.full((R, kvh, moves + 1), -1, dtype=torch.long, device=mask.device)
        out.scatter_(-1, rank, torch.where(mask, at, -1))
        return out[..., :moves]

    return ranked(kept[..., budget:], budget), ranked(~kept[..., :budget], 0)


def _check_plan(kept: torch.Tensor, budget: int, length: int) -> None:
    if kept.dim() != 3 or kept.shape[2] != budget or not 0 < budget < length:
        raise ValueError(
            f"kept must be [R, KVH, budget={budget}] with budget < length {length}, got shape "
            f"{tuple(kept.shape)}"
        )


def fill_plan_reference(
    kept: torch.Tensor, budget: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: `fill_moves`, then the head's order (module docstring)."""
    _check_plan(kept, budget, length)
    src, dst = fill_moves(kept, budget, length)
    stay = budget - (kept >= budget).sum(dim=-1, keepdim=True)  # [R, KVH, 1]
    i = torch.arange(budget, device=kept.device)
    moved_to = dst.gather(-1, (i - stay).clamp(min=0))
    return src, dst, torch.where(i < stay, kept, moved_to)


def _check_fill(store: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
    if store.dim() not in (3, 4):
        raise ValueError(f"store must be [S, KVH, L(, D)], got shape {tuple(store.shape)}")
    if rows.dim() != 1 or src.dim() != 3 or src.shape != dst.shape:
        raise ValueError(
            f"need rows [R] and src, dst [R, KVH, M] of one shape, got {tuple(rows.shape)}, "
            f"{tuple(src.shape)}, {tuple(dst.shape)}"
        )
    if src.shape[:2] != (rows.shape[0], store.shape[1]):
        raise ValueError(
            f"src must be [R={rows.shape[0]}, KVH={store.shape[1]}, M], got {tuple(src.shape)}"
        )
    if src.stride() != dst.stride():  # the kernel reads both with src's strides
        raise ValueError(f"src and dst need one layout, got strides {src.stride()}, {dst.stride()}")


def fill_rows_reference(
    store: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Plain PyTorch: gather the moved entries out of place, write them to their places."""
    _check_fill(store, rows, src, dst)
    R, kvh, M = src.shape
    dev = store.device
    valid = (src >= 0).to(dev)
    r = rows.to(dev)[:, None, None].expand(R, kvh, M)[valid]
    h = torch.arange(kvh, device=dev)[None, :, None].expand(R, kvh, M)[valid]
    moved = store[r, h, src.to(dev)[valid]]
    store[r, h, dst.to(dev)[valid]] = moved


# -- Triton kernels -------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _window_logits(
        Q,
        K,
        b,
        kvh,
        length,
        pos,
        L,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_qw,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        G: tl.constexpr,
        W: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Logits (log2 units) [BLOCK_M, BLOCK_N] of the group's query rows g * W + i against
        the entries `pos` [BLOCK_N]; -inf where a row does not see the entry."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_rows = offs_m < G * W
        m_d = offs_d < D
        head = kvh * G + offs_m // W
        i = offs_m % W
        p_q = Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qw
        b_q = tl.load(
            p_q + offs_d[None, :] * stride_qd, mask=m_rows[:, None] & m_d[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_D]
        # Padding entries are never read (masked loads issue no memory traffic).
        m_k = (pos < length) & (pos < L)
        p_k = K + b * stride_kb + kvh * stride_kh + pos[:, None].to(tl.int64) * stride_kl
        b_k = tl.load(
            p_k + offs_d[None, :] * stride_kd, mask=m_k[:, None] & m_d[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            # The interpreter's dot takes no bf16: float32 products, as the reference.
            s = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision="ieee")
        else:
            # Tensor cores: bf16/fp16 products are exact in the float32 accumulator; float32
            # inputs take three tf32 products (float32 accuracy).
            s = tl.dot(b_q, tl.trans(b_k), input_precision="tf32x3")
        s = s * qk_scale  # [BLOCK_M, BLOCK_N]
        # Query row m sits at entry length - W + i and sees the entries up to it.
        last = length - W + i
        ok = (pos[None, :] <= last[:, None]) & (pos[None, :] < L) & m_rows[:, None]
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _window_stats_kernel(
        Q,
        K,
        Lens,
        Stats,
        L,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_qw,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        G: tl.constexpr,
        W: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        nb = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        n_blocks = tl.num_programs(0)
        length = tl.load(Lens + b).to(tl.int32)
        pos = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _window_logits(
            Q, K, b, kvh, length, pos, L, qk_scale,
            stride_qb, stride_qh, stride_qw, stride_qd,
            stride_kb, stride_kh, stride_kl, stride_kd,
            G, W, D, BLOCK_M, BLOCK_D, UPCAST,
        )  # fmt: skip
        b_m = tl.max(s, 1)  # [BLOCK_M] the block's row max, -inf where it sees nothing
        m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_l = tl.sum(tl.exp2(s - m_safe[:, None]), 1)  # [BLOCK_M]
        # Stats [R, KVH, n_blocks, 2, BLOCK_M], contiguous: (max, sum) per row.
        offs_m = tl.arange(0, BLOCK_M)
        p_s = Stats + ((b * tl.num_programs(1) + kvh) * n_blocks + nb) * (2 * BLOCK_M) + offs_m
        tl.store(p_s, b_m)
        tl.store(p_s + BLOCK_M, b_l)

    @triton.jit
    def _window_norm_kernel(
        Stats,
        Lse,
        n_blocks,
        BLOCK_M: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        kvh = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        row = b * tl.num_programs(0) + kvh
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_B)
        p_s = Stats + row * n_blocks * (2 * BLOCK_M)
        b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j0 in range(0, n_blocks, BLOCK_B):
            blk = j0 + offs_j
            p = p_s + blk[:, None].to(tl.int64) * (2 * BLOCK_M) + offs_m[None, :]
            m_j = blk[:, None] < n_blocks
            s_m = tl.load(p, mask=m_j, other=float("-inf"))  # [BLOCK_B, BLOCK_M]
            s_l = tl.load(p + BLOCK_M, mask=m_j, other=0.0)
            m_new = tl.maximum(b_m, tl.max(s_m, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            b_l = b_l * tl.exp2(b_m - m_safe) + tl.sum(s_l * tl.exp2(s_m - m_safe[None, :]), 0)
            b_m = m_new
        # log2 of each row's softmax denominator; +inf for a row that sees nothing (padding
        # rows of the tile), whose probabilities are then 0.
        lse = tl.where(b_l > 0.0, b_m + tl.log2(tl.where(b_l > 0.0, b_l, 1.0)), float("inf"))
        tl.store(Lse + row * BLOCK_M + offs_m, lse)

    @triton.jit
    def _window_probs_kernel(
        Q,
        K,
        Lens,
        Lse,
        Out,
        L,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_qw,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        stride_ob,
        stride_oh,
        stride_ol,
        G: tl.constexpr,
        W: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        nb = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        length = tl.load(Lens + b).to(tl.int32)
        pos = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _window_logits(
            Q, K, b, kvh, length, pos, L, qk_scale,
            stride_qb, stride_qh, stride_qw, stride_qd,
            stride_kb, stride_kh, stride_kl, stride_kd,
            G, W, D, BLOCK_M, BLOCK_D, UPCAST,
        )  # fmt: skip
        offs_m = tl.arange(0, BLOCK_M)
        lse = tl.load(Lse + (b * tl.num_programs(1) + kvh) * BLOCK_M + offs_m)  # [BLOCK_M]
        p = tl.exp2(s - lse[:, None])  # softmax probabilities, 0 where unseen
        col = tl.sum(p, 0) / (G * W)  # [BLOCK_N]
        tl.store(
            Out + b * stride_ob + kvh * stride_oh + pos.to(tl.int64) * stride_ol,
            col,
            mask=pos < L,
        )

    @triton.jit
    def _selection_scores(p_s, pos, L, length, window, stride_sl):
        """The scores keep_top ranks at entries `pos` of a row (float32): +inf for the last
        `window` valid entries (always kept), -inf past the row's length."""
        s = tl.load(p_s + pos.to(tl.int64) * stride_sl, mask=pos < L, other=0.0).to(tl.float32)
        s = tl.where(pos >= length - window, float("inf"), s)
        return tl.where(pos >= length, float("-inf"), s)

    @triton.jit
    def _keep_rank_kernel(
        S,
        Lens,
        Keep,
        L,
        budget,
        window,
        stride_sb,
        stride_sx,
        stride_sl,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
    ):
        ib = tl.program_id(0)
        x = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        length = tl.load(Lens + b).to(tl.int32)
        p_s = S + b * stride_sb + x * stride_sx
        pos_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_j = tl.arange(0, BLOCK_J)
        s_i = _selection_scores(p_s, pos_i, L, length, window, stride_sl)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, L, BLOCK_J):
            pos_j = j0 + offs_j
            s_j = _selection_scores(p_s, pos_j, L, length, window, stride_sl)
            # Past L: never ahead (scores -inf, places after every entry).
            s_j = tl.where(pos_j < L, s_j, float("-inf"))
            ahead = (s_j[None, :] > s_i[:, None]) | (
                (s_j[None, :] == s_i[:, None]) & (pos_j[None, :] < pos_i[:, None])
            )
            rank += tl.sum(ahead.to(tl.int32), 1)
        # Keep [R, X, L] int8, contiguous: whether the entry is among the budget best.
        p_keep = Keep + (b * tl.num_programs(1) + x) * L + pos_i.to(tl.int64)
        tl.store(p_keep, (rank < budget).to(tl.int8), mask=pos_i < L)

    @triton.jit
    def _keep_select_kernel(
        S,
        Lens,
        Keep,
        L,
        budget,
        window,
        stride_sb,
        stride_sx,
        stride_sl,
        LP: tl.constexpr,
    ):
        """Program (head, row) with the whole row in registers: the budget-th best score by a
        bisection over the scores' ordered integer keys (32 counting passes, not L * L
        comparisons), then every entry above it and the earliest ones equal to it."""
        x = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        length = tl.load(Lens + b).to(tl.int32)
        pos = tl.arange(0, LP)
        p_s = S + b * stride_sb + x * stride_sx
        s = _selection_scores(p_s, pos, L, length, window, stride_sl)
        # Float order as integer order in [0, 2**32): negative floats' magnitude bits flipped,
        # then shifted up by 2**31 (non-negative, so that // rounds down); padding is -1.
        bits = s.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2**31
        key = tl.where(pos < L, key, -1)
        # The largest t with at least `budget` keys >= t (budget <= L: t = 0 qualifies): the
        # budget-th best key.
        lo = tl.sum(tl.zeros([1], dtype=tl.int64), 0)
        hi = lo + 2**32 - 1
        for _ in range(32):
            mid = (lo + hi + 1) // 2
            enough = tl.sum((key >= mid).to(tl.int32), 0) >= budget
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        above = key > lo
        tie = key == lo
        # Ties go to the earlier entry: an equal one is kept while the budget has room.
        room = budget - tl.sum(above.to(tl.int32), 0)
        tie_i = tie.to(tl.int32)
        keep = above | (tie & (tl.cumsum(tie_i, 0) - tie_i < room))
        p_keep = Keep + (b * tl.num_programs(0) + x) * L + pos.to(tl.int64)
        tl.store(p_keep, keep.to(tl.int8), mask=pos < L)

    @triton.jit
    def _keep_place_kernel(
        Keep,
        Idx,
        L,
        stride_ib,
        stride_ix,
        stride_il,
        BLOCK_C: tl.constexpr,
    ):
        x = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        p_keep = Keep + (b * tl.num_programs(0) + x) * L
        offs = tl.arange(0, BLOCK_C)
        kept = tl.sum(tl.zeros([BLOCK_C], dtype=tl.int32), 0)
        for c0 in range(0, L, BLOCK_C):
            pos = c0 + offs
            k32 = tl.load(p_keep + pos.to(tl.int64), mask=pos < L, other=0).to(tl.int32)
            # A kept entry's place: the number of kept entries before it.
            place = kept + tl.cumsum(k32, 0) - k32
            tl.store(
                Idx + b * stride_ib + x * stride_ix + place.to(tl.int64) * stride_il,
                pos.to(tl.int64),
                mask=k32 > 0,
            )
            kept += tl.sum(k32, 0)

    @triton.jit
    def _compact_kernel(
        Store,
        Rows,
        Idx,
        n_keep,
        stride_s0,
        stride_sh,
        stride_sl,
        stride_sd,
        stride_ib,
        stride_ih,
        stride_il,
        D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        slot = tl.load(Rows + r).to(tl.int64)
        base = Store + slot * stride_s0 + h * stride_sh
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        m_d = offs_d < D
        for p0 in range(0, n_keep, BLOCK_P):
            place = p0 + offs_p
            m_p = place < n_keep
            src = tl.load(
                Idx + r * stride_ib + h * stride_ih + place.to(tl.int64) * stride_il,
                mask=m_p,
                other=0,
            ).to(tl.int64)
            m = m_p[:, None] & m_d[None, :]
            vals = tl.load(
                base + src[:, None] * stride_sl + offs_d[None, :] * stride_sd, mask=m, other=0
            )
            # Every thread's loads of this block before any store: a block reads places at or
            # after its own (indices ascending, indices[p] >= p), the next block's stores
            # come after the next barrier.
            tl.debug_barrier()
            tl.store(
                base + place[:, None].to(tl.int64) * stride_sl + offs_d[None, :] * stride_sd,
                vals,
                mask=m,
            )

    @triton.jit
    def _fill_plan_kernel(
        Kept,
        Src,
        Dst,
        Head,
        Scratch,
        budget,
        n_moves,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_mb,
        stride_mh,
        stride_ml,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK_B)
        in_b = offs < budget
        kept = tl.load(
            Kept + r * stride_kb + h * stride_kh + offs * stride_kl, mask=in_b, other=0
        ).to(tl.int64)
        past = in_b & (kept >= budget)  # the last m of `kept` (the contract)
        stay = budget - tl.sum(past.to(tl.int32), 0)
        # Which places below the budget stay: marked in this program's scratch row.
        scr = Scratch + (r * tl.num_programs(1) + h) * BLOCK_B
        tl.store(scr + offs, tl.zeros([BLOCK_B], dtype=tl.int32))
        tl.debug_barrier()
        tl.store(scr + kept, tl.full([BLOCK_B], 1, dtype=tl.int32), mask=in_b & (kept < budget))
        tl.debug_barrier()
        hit = tl.load(scr + offs, cache_modifier=".cg")  # past the L1: other threads' stores
        evicted = in_b & (hit == 0)
        rank = tl.cumsum(evicted.to(tl.int32), 0) - 1  # among the evicted places, < m
        mv = r * stride_mb + h * stride_mh
        offs_m = tl.arange(0, BLOCK_M)
        rest = (offs_m >= budget - stay) & (offs_m < n_moves)
        # The i-th kept place past the budget moves to the i-th evicted place.
        tl.store(Src + mv + (offs - stay).to(tl.int64) * stride_ml, kept, mask=past)
        tl.store(Dst + mv + rank.to(tl.int64) * stride_ml, offs.to(tl.int64), mask=evicted)
        tl.store(Src + mv + offs_m * stride_ml, tl.full([BLOCK_M], -1, tl.int64), mask=rest)
        tl.store(Dst + mv + offs_m * stride_ml, tl.full([BLOCK_M], -1, tl.int64), mask=rest)
        hd = Head + (r * tl.num_programs(1) + h) * budget
        tl.store(hd + offs, kept, mask=in_b & (offs < stay))
        tl.store(hd + stay + rank, offs.to(tl.int64), mask=evicted)

    @triton.jit
    def _fill_kernel(
        Store,
        Rows,
        Src,
        Dst,
        n_moves,
        stride_s0,
        stride_sh,
        stride_sl,
        stride_sd,
        stride_mb,
        stride_mh,
        stride_ml,
        D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        slot = tl.load(Rows + r).to(tl.int64)
        base = Store + slot * stride_s0 + h * stride_sh
        at = r * stride_mb + h * stride_mh + offs_p.to(tl.int64) * stride_ml
        m_p = offs_p < n_moves
        src = tl.load(Src + at, mask=m_p, other=-1).to(tl.int64)
        dst = tl.load(Dst + at, mask=m_p, other=-1).to(tl.int64)
        valid = m_p & (src >= 0)
        offs_d = tl.arange(0, BLOCK_D)
        m = valid[:, None] & (offs_d < D)[None, :]
        # Sources lie past the budget and destinations below it: no barrier needed.
        vals = tl.load(base + src[:, None] * stride_sl + offs_d[None, :] * stride_sd, mask=m)
        tl.store(base + dst[:, None] * stride_sl + offs_d[None, :] * stride_sd, vals, mask=m)


# Rows up to this many entries take the bisection kernel of `keep_top_triton` (its registers
# hold a row); longer ones the rank kernel.
SELECT_MAX_L = 8192


def _require_triton(name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton, which is not importable")


def window_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    *,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    _require_triton("window_scores_triton")
    _check_scores(queries, keys, lengths)
    R, H, w, D = queries.shape
    kvh, L = keys.shape[1], keys.shape[2]
    G = H // kvh
    out = torch.empty((R, kvh, L), dtype=torch.float32, device=keys.device)
    if R == 0 or L == 0:
        return out
    if queries.dtype != keys.dtype:  # tl.dot takes one dtype: the wider (copies one side)
        dtype = torch.promote_types(queries.dtype, keys.dtype)
        queries, keys = queries.to(dtype), keys.to(dtype)
    block_m = max(16, _next_pow2(G * w))
    n_blocks = triton.cdiv(L, block_n)
    # Per (sequence, kv head, entry block): each row's max and sum, then per row the log2
    # softmax denominator.
    stats = torch.empty((R, kvh, n_blocks, 2, block_m), dtype=torch.float32, device=keys.device)
    lse = torch.empty((R, kvh, block_m), dtype=torch.float32, device=keys.device)
    qk_scale = 1.4426950408889634 / math.sqrt(D)  # log2(e) / sqrt(D): exp2 in the kernels
    meta = {
        "G": G,
        "W": w,
        "D": D,
        "BLOCK_M": block_m,
        "BLOCK_D": max(16, _next_pow2(D)),
        "BLOCK_N": block_n,
        # The interpreter (CPU tensors) multiplies in float32: its dot takes no bf16.
        "UPCAST": not keys.is_cuda,
        "num_warps": num_warps,
    }
    grid = (n_blocks, kvh, R)
    _window_stats_kernel[grid](
        queries, keys, lengths, stats, L, qk_scale, *queries.stride(), *keys.stride(), **meta
    )
    _window_norm_kernel[(kvh, R)](
        stats, lse, n_blocks, BLOCK_M=block_m, BLOCK_B=min(64, max(2, _next_pow2(n_blocks)))
    )
    _window_probs_kernel[grid](
        queries,
        keys,
        lengths,
        lse,
        out,
        L,
        qk_scale,
        *queries.stride(),
        *keys.stride(),
        *out.stride(),
        **meta,
    )
    return out


def keep_top_triton(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    budget: int,
    window: int,
    *,
    block_i: int = 64,
    block_j: int = 64,
    block_c: int = 1024,
    select: bool | None = None,
) -> torch.Tensor:
    """select: the bisection kernel (a row in registers; default for L <= SELECT_MAX_L), or
    False for the rank kernel (any L)."""
    _require_triton("keep_top_triton")
    _check_keep(scores, lengths, budget, window)
    R, X, L = scores.shape
    out = torch.empty((R, X, budget), dtype=torch.int64, device=scores.device)
    if R == 0 or X == 0 or budget == 0:
        return out
    keep = torch.empty((R, X, L), dtype=torch.int8, device=scores.device)
    if select is None:
        select = L <= SELECT_MAX_L
    if select:
        lp = _next_pow2(L)
        _keep_select_kernel[(X, R)](
            scores, lengths, keep, L, budget, window, *scores.stride(), LP=lp,
            num_warps=max(1, min(16, lp // 256)),
        )  # fmt: skip
    else:
        _keep_rank_kernel[(triton.cdiv(L, block_i), X, R)](
            scores,
            lengths,
            keep,
            L,
            budget,
            window,
            *scores.stride(),
            BLOCK_I=block_i,
            BLOCK_J=block_j,
            num_warps=4,
        )
    _keep_place_kernel[(X, R)](
        keep, out, L, *out.stride(), BLOCK_C=min(block_c, _next_pow2(L)), num_warps=4
    )
    return out


def compact_rows_triton(
    store: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, *, block_p: int = 32
) -> None:
    _require_triton("compact_rows_triton")
    _check_compact(store, rows, indices)
    view = store if store.dim() == 4 else store[..., None]
    R, kvh, n = indices.shape
    if R == 0 or n == 0:
        return
    D = view.shape[3]
    _compact_kernel[(R, kvh)](
        view,
        rows,
        indices,
        n,
        *view.stride(),
        *indices.stride(),
        D=D,
        BLOCK_P=block_p,
        BLOCK_D=max(2, _next_pow2(D)),
        num_warps=4,
    )


def fill_plan_triton(
    kept: torch.Tensor, budget: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel (contract in the module docstring): one program per (row, kv head)."""
    _require_triton("fill_plan_triton")
    _check_plan(kept, budget, length)
    R, kvh, _ = kept.shape
    M, dev = length - budget, kept.device
    src = torch.empty(R, kvh, M, dtype=torch.long, device=dev)
    dst = torch.empty_like(src)
    head = torch.empty(R, kvh, budget, dtype=torch.long, device=dev)
    if R == 0 or kvh == 0:
        return src, dst, head
    block_b = max(16, _next_pow2(budget))
    scratch = torch.empty(R * kvh * block_b, dtype=torch.int32, device=dev)
    _fill_plan_kernel[(R, kvh)](
        kept, src, dst, head, scratch, budget, M, *kept.stride(), *src.stride(),
        BLOCK_B=block_b, BLOCK_M=max(16, _next_pow2(M)), num_warps=4,
    )  # fmt: skip
    return src, dst, head


def fill_rows_triton(
    store: torch.Tensor,
    rows: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    block_p: int = 16,
) -> None:
    _require_triton("fill_rows_triton")
    _check_fill(store, rows, src, dst)
    view = store if store.dim() == 4 else store[..., None]
    R, kvh, M = src.shape
    if R == 0 or M == 0:
        return
    D = view.shape[3]
    _fill_kernel[(R, kvh, triton.cdiv(M, block_p))](
        view,
        rows,
        src,
        dst,
        M,
        *view.stride(),
        *src.stride(),
        D=D,
        BLOCK_P=block_p,
        BLOCK_D=max(2, _next_pow2(D)),
        num_warps=4,
    )


# -- dispatchers ----------------------------------------------------------------------------


def window_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    if keys.is_cuda and HAS_TRITON:
        return window_scores_triton(queries, keys, lengths)
    return window_scores_reference(queries, keys, lengths)


def keep_top(scores: torch.Tensor, lengths: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    if scores.is_cuda and HAS_TRITON:
        return keep_top_triton(scores, lengths, budget, window)
    return keep_top_reference(scores, lengths, budget, window)


def compact_rows(store: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor) -> None:
    if store.is_cuda and HAS_TRITON:
        compact_rows_triton(store, rows, indices)
    else:
        compact_rows_reference(store, rows, indices)


def fill_plan(
    kept: torch.Tensor, budget: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kept.is_cuda and HAS_TRITON:
        return fill_plan_triton(kept, budget, length)
    return fill_plan_reference(kept, budget, length)


def fill_rows(
    store: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    if store.is_cuda and HAS_TRITON:
        fill_rows_triton(store, rows, src, dst)
    else:
        fill_rows_reference(store, rows, src, dst)
