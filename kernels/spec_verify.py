"""Draft verification for speculative decoding, for a whole batch in one call.

Each sequence b fed its last token and up to k drafts d_1..d_n (n = num_drafts[b]) through the
policy in one forward, which gave the target distribution p_i at each of the T = k + 1 fed
positions (p_0 scores d_1, p_i scores d_{i+1}, p_n is the next distribution after the last
draft). The standard rule (Leviathan et al. 2023, Chen et al. 2023) then keeps the emitted
tokens distributed exactly as p:

- draft i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)), in order, until the
  first rejection; `accepted` counts the drafts kept;
- on a rejection at draft a + 1 the next token is drawn from norm(max(0, p_a - q_{a+1}));
  when every draft passed, from p_n (the bonus token).

Deterministic drafts (a suffix automaton's) have q = one-hot(d): draft i is then accepted with
probability p(d_i) and the residual is p without d_i. Greedy decoding accepts while each draft is
the argmax of its target row and then emits the argmax of row `accepted`. The distributions are
the processed ones (temperature, top-k, top-p applied), so the rule is lossless for what the
sampler draws from.

    verify_drafts(target, draft_tokens, num_drafts, draft_probs=None, uniforms=None,
                  greedy=False, log=False) -> (accepted, token)

    target        [B, T, V] float32   target probabilities at the T = k + 1 fed positions
                                      (greedy: any scores whose argmax is the greedy token;
                                      log: their logarithms, exponentiated where the rule
                                      reads them, which on a CPU skips exp over the T x V
                                      it never reads: p at the drafts and one row a sequence)
    draft_tokens  [B, k] int64        drafts; entries at or past num_drafts[b] are ignored
    num_drafts    [B] int64           in [0, k]
    draft_probs   [B, k, V] float32   q_i of each draft, or None: every draft deterministic
    uniforms      [B, T]              in [0, 1): u[:, i] tests draft i + 1, u[:, k] draws the
                                      final token (stochastic only)
    accepted      [B] int64           drafts kept, in [0, num_drafts[b]]
    token         [B] int64           the token emitted after them

Several draft chains a sequence, verified in one forward (`verify_chains`): the fed positions
are a tree, the sequence's last token and then C deterministic chains of up to k drafts each
(index 1 + c * k + i: chain c's draft i + 1, whose row scores chain c's draft i + 2). From the
root the rule draws the emitted token from p at the current node (greedy: its argmax); where
that token is the next draft of chains still consistent with the path, the path moves to the
first such chain's node and draws again, else the step ends with that token. Every emitted
token is a draw from the policy's distribution after the tokens before it, so the output is
the policy's exactly, whatever the chains (one chain: the one-chain rule's law, another
coupling of the uniforms).

    verify_chains(target, chains, num, uniforms=None, greedy=False)
        -> (accepted, tokens, node)

    target    [B, 1 + C * k, V]   log-probabilities (greedy: scores) at the tree's positions
    chains    [B, C, k] int64     the chains' drafts; num [B, C] int64 their counts
    uniforms  [B, k + 1] float64  one a depth (stochastic only)
    accepted  [B] int64           drafts kept (of one chain)
    tokens    [B, k + 1] int64    the emitted tokens at 0..accepted (the kept drafts, then the
                                  drawn one; past that, scratch)
    node      [B, k + 1] int64    the position whose distribution emitted each token

PyTorch only (capturable, no host sync): a loop of k + 1 depths of [B, V] work.

Three functions, as `sparse_decode_attention.py`: `verify_drafts_reference` (plain PyTorch, the
rule as written above), the Triton kernels `verify_drafts_triton` (acceptance of all k drafts
at once, the first rejection, and the residual's inverse-CDF draw; each row's vocabulary split
over up to 16 programs in two launches, or one program a row), and the dispatcher `verify_drafts` (the kernel for CUDA
tensors when Triton is importable, else the reference). The inverse-CDF draw is the sampler's
(`rlkit.rollout.sampling.draw`): the first token whose running sum exceeds u times the total.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

__all__ = [
    "HAS_TRITON",
    "verify_chains",
    "verify_chains_reference",
    "verify_chains_triton",
    "verify_drafts",
    "verify_drafts_reference",
    "verify_drafts_triton",
]


def _check(
    target: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor | None,
    greedy: bool,
) -> tuple[int, int, int]:
    """Raise ValueError naming the first wrong argument; else (B, k, V)."""
    if target.dim() != 3:
        raise ValueError(f"target must be [B, k + 1, V], got shape {tuple(target.shape)}")
    B, T, V = target.shape
    k = T - 1
    if draft_tokens.shape != (B, k):
        raise ValueError(f"draft_tokens must be [{B}, {k}], got {tuple(draft_tokens.shape)}")
    if num_drafts.shape != (B,):
        raise ValueError(f"num_drafts must be [{B}], got {tuple(num_drafts.shape)}")
    if draft_tokens.dtype != torch.int64 or num_drafts.dtype != torch.int64:
        raise ValueError("draft_tokens and num_drafts must be int64")
    if draft_probs is not None and draft_probs.shape != (B, k, V):
        raise ValueError(f"draft_probs must be [{B}, {k}, {V}], got {tuple(draft_probs.shape)}")
    if not greedy:
        if uniforms is None or uniforms.shape != (B, T):
            got = None if uniforms is None else tuple(uniforms.shape)
            raise ValueError(f"uniforms must be [{B}, {T}] for stochastic verification, got {got}")
        if target.dtype != torch.float32 or (
            draft_probs is not None and draft_probs.dtype != torch.float32
        ):
            raise ValueError("target and draft_probs must be float32 probabilities")
    tensors = [target, draft_tokens, num_drafts, draft_probs, uniforms]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return B, k, V


def verify_drafts_reference(
    target: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    greedy: bool = False,
    log: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of the module docstring in plain PyTorch (the kernel's reference). log: target
    holds log-probabilities, exponentiated only where the rule reads them."""
    B, k, V = _check(target, draft_tokens, num_drafts, draft_probs, uniforms, greedy)
    dev = target.device
    rows = torch.arange(B, device=dev)
    steps = torch.arange(k, device=dev)
    live = steps[None, :] < num_drafts[:, None]  # [B, k]
    if greedy:
        best = target.argmax(dim=-1)  # [B, k + 1]
        passed = draft_tokens == best[:, :k]
    else:
        assert uniforms is not None
        # Accept draft i with probability min(1, p(d) / q(d)): u < p / q, written u * q < p.
        p_d = target[:, :k].gather(-1, draft_tokens[:, :, None])[..., 0]  # [B, k]
        if log:
            p_d = p_d.exp()
        q_d = (
            draft_probs.gather(-1, draft_tokens[:, :, None])[..., 0]
            if draft_probs is not None
            else torch.ones_like(p_d)
        )
        passed = uniforms[:, :k].to(torch.float64) * q_d.double() < p_d.double()
    # Drafts kept: the leading run of accepted ones.
    accepted = (passed & live).long().cumprod(dim=1).sum(dim=1)  # [B]
    if greedy:
        return accepted, best[rows, accepted]
    p = target[rows, accepted]  # [B, V] the row after the last kept draft
    p = (p.exp() if log else p).double()
    rejected = accepted < num_drafts  # [B]: a draft failed; else the bonus token
    at = accepted.clamp(max=max(k - 1, 0))
    if draft_probs is not None and k > 0:
        q = draft_probs[rows, at].double()
    else:
        q = torch.zeros_like(p)
        if k > 0:
            q[rows, draft_tokens[rows, at]] = 1.0
    residual = torch.where(rejected[:, None], (p - q).clamp(min=0), p)  # [B, V]
    # p == q on the rejected token's row is impossible in exact arithmetic (it would have been
    # accepted); rounding could leave nothing: then draw from p.
    empty = residual.sum(dim=-1) <= 0
    residual = torch.where(empty[:, None], p, residual)
    assert uniforms is not None
    cdf = residual.cumsum(dim=-1)  # [B, V] float64
    u = uniforms[:, k].to(torch.float64)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return accepted, token.clamp_(max=V - 1)


if HAS_TRITON:

    @triton.jit
    def _verify_greedy_kernel(
        P,
        Drafts,
        NumDrafts,
        Accepted,
        Token,
        V,
        stride_pb,
        stride_pt,
        stride_db,
        K: tl.constexpr,
        K_PAD: tl.constexpr,  # next power of two >= K + 1: the positions' axis
        BLOCK_V: tl.constexpr,
    ):
        # Greedy: a draft passes while it is the argmax of its row; the token is the argmax
        # of row `accepted` (the first index of the maximum, as torch). One program a row.
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.arange(0, K_PAD)
        m_k = offs_k < K
        n = tl.load(NumDrafts + b)
        d = tl.load(Drafts + b * stride_db + offs_k, mask=m_k, other=0)  # [K_PAD]
        p_base = P + b * stride_pb
        offs_v = tl.arange(0, BLOCK_V)
        best_val = tl.full([K_PAD], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([K_PAD], dtype=tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs_v
            m = (offs_k[:, None] <= K) & (cols[None, :] < V)
            s = tl.load(
                p_base + offs_k[:, None] * stride_pt + cols[None, :],
                mask=m,
                other=float("-inf"),
            ).to(tl.float32)  # [K_PAD, BLOCK_V]
            blk_max = tl.max(s, 1)
            is_max = (s == blk_max[:, None]) & m
            blk_idx = tl.min(tl.where(is_max, cols[None, :], V), 1).to(tl.int64)
            better = blk_max > best_val
            best_idx = tl.where(better, blk_idx, best_idx)
            best_val = tl.where(better, blk_max, best_val)
        live = (d == best_idx) & (offs_k < n) & m_k
        # The first draft that is not kept (a rejection, or past the row's drafts).
        accepted = tl.minimum(tl.min(tl.where(live, K_PAD, offs_k), 0), n).to(tl.int64)
        tl.store(Accepted + b, accepted)
        tl.store(Token + b, tl.sum(tl.where(offs_k == accepted, best_idx, 0), 0))

    @triton.jit
    def _accepted_stochastic(
        P, Q, Drafts, NumDrafts, U, b, stride_pb, stride_pt, stride_qb, stride_qt, stride_db,
        stride_ub, K: tl.constexpr, K_PAD: tl.constexpr, HAS_Q: tl.constexpr,
    ):  # fmt: skip
        """(drafts kept, the row's draft count, the draft at the first failure or 0)."""
        offs_k = tl.arange(0, K_PAD)
        m_k = offs_k < K
        n = tl.load(NumDrafts + b)
        d = tl.load(Drafts + b * stride_db + offs_k, mask=m_k, other=0)  # [K_PAD]
        p_d = tl.load(P + b * stride_pb + offs_k * stride_pt + d, mask=m_k, other=0.0)
        if HAS_Q:
            q_d = tl.load(Q + b * stride_qb + offs_k * stride_qt + d, mask=m_k, other=1.0)
        else:
            q_d = tl.full([K_PAD], 1.0, dtype=tl.float32)
        u_k = tl.load(U + b * stride_ub + offs_k, mask=m_k, other=1.0)  # float64
        passed = u_k * q_d.to(tl.float64) < p_d.to(tl.float64)
        live = passed & (offs_k < n) & m_k
        accepted = tl.minimum(tl.min(tl.where(live, K_PAD, offs_k), 0), n).to(tl.int64)
        d_at = tl.sum(tl.where(offs_k == accepted, d, 0), 0)
        return accepted, n, d_at

    @triton.jit
    def _residual_chunk(p_row, q_row, cols, V, q_cols, d_at, HAS_Q: tl.constexpr):
        """p and max(0, p - q) (float64) at `cols` of the emitting row."""
        m = cols < V
        p = tl.load(p_row + cols, mask=m, other=0.0).to(tl.float64)
        if HAS_Q:
            q = tl.load(q_row + cols, mask=cols < q_cols, other=0.0).to(tl.float64)
        else:
            q = tl.where((cols == d_at) & (cols < q_cols), 1.0, 0.0).to(tl.float64)
        return p, tl.maximum(p - q, 0.0)

    @triton.jit
    def _verify_sums_kernel(
        P, Q, Drafts, NumDrafts, U, Accepted, SumR, SumP, V, chunk,
        stride_pb, stride_pt, stride_qb, stride_qt, stride_db, stride_ub,
        K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr, HAS_Q: tl.constexpr,
        CHUNKS: tl.constexpr,
    ):  # fmt: skip
        # Program (b, c): the acceptance of row b's drafts, then the residual's and p's mass
        # over the c-th chunk of the emitting row's vocabulary.
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        accepted, n, d_at = _accepted_stochastic(
            P, Q, Drafts, NumDrafts, U, b, stride_pb, stride_pt, stride_qb, stride_qt,
            stride_db, stride_ub, K, K_PAD, HAS_Q,
        )  # fmt: skip
        if c == 0:
            tl.store(Accepted + b, accepted)
        q_cols = tl.where(accepted < n, V, 0)  # none for the bonus token
        p_row = P + b * stride_pb + accepted * stride_pt
        q_row = Q + b * stride_qb + accepted * stride_qt
        offs_v = tl.arange(0, BLOCK_V)
        total_r = tl.zeros([BLOCK_V], dtype=tl.float64)
        total_p = tl.zeros([BLOCK_V], dtype=tl.float64)
        lo = c * chunk
        for v0 in range(lo, tl.minimum(lo + chunk, V), BLOCK_V):
            cols = v0 + offs_v
            p, r = _residual_chunk(
                p_row, q_row, cols, tl.minimum(lo + chunk, V), q_cols, d_at, HAS_Q
            )
            total_r += r
            total_p += p
        tl.store(SumR + b * CHUNKS + c, tl.sum(total_r, 0))
        tl.store(SumP + b * CHUNKS + c, tl.sum(total_p, 0))

    @triton.jit
    def _verify_draw_kernel(
        P, Q, Drafts, NumDrafts, U, Accepted, SumR, SumP, Token, V, chunk,
        stride_pb, stride_pt, stride_qb, stride_qt, stride_db, stride_ub,
        K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_Q: tl.constexpr, CHUNKS: tl.constexpr,
    ):  # fmt: skip
        # Program (b, c): from the chunks' masses, the chunk where u times the total falls
        # (the first c with goal < the mass of chunks 0..c; the last one when rounding leaves
        # the goal past them all) draws the token: the first of its columns whose running sum
        # exceeds the goal (its last column if rounding leaves none).
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        accepted = tl.load(Accepted + b)
        n = tl.load(NumDrafts + b)
        d_at = 0
        if K > 0:
            d_at = tl.load(Drafts + b * stride_db + tl.minimum(accepted, K - 1))
        offs_c = tl.arange(0, CHUNKS)
        sum_r = tl.load(SumR + b * CHUNKS + offs_c)
        sum_p = tl.load(SumP + b * CHUNKS + offs_c)
        use_r = tl.sum(sum_r, 0) > 0.0  # else rounding left the residual no mass: p
        sums = tl.where(use_r, sum_r, sum_p)
        goal = tl.load(U + b * stride_ub + K) * tl.sum(sums, 0)
        before = tl.sum(tl.where(offs_c < c, sums, 0.0), 0)
        through = before + tl.sum(tl.where(offs_c == c, sums, 0.0), 0)
        owner = (before <= goal) & ((goal < through) | (c == CHUNKS - 1))
        q_cols = tl.where((accepted < n) & use_r, V, 0)
        p_row = P + b * stride_pb + accepted * stride_pt
        q_row = Q + b * stride_qb + accepted * stride_qt
        offs_v = tl.arange(0, BLOCK_V)
        lo = c * chunk
        hi = tl.minimum(lo + chunk, V)
        running = before
        token = (hi - 1).to(tl.int64)
        found = tl.zeros([], tl.int32)
        for v0 in range(lo, tl.where(owner, hi, lo), BLOCK_V):
            cols = v0 + offs_v
            p, r = _residual_chunk(p_row, q_row, cols, hi, q_cols, d_at, HAS_Q)
            r = tl.where(use_r, r, p)
            cdf = running + tl.cumsum(r, 0)
            hit = (cdf > goal) & (cols < hi)
            first = tl.min(tl.where(hit, cols, hi), 0)
            take = (first < hi) & (found == 0)
            token = tl.where(take, first.to(tl.int64), token)
            found = found | take.to(tl.int32)
            running += tl.sum(r, 0)
        if owner:
            tl.store(Token + b, token)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def verify_drafts_triton(
    target: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    greedy: bool = False,
    *,
    block_v: int = 1024,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels (contract in the module docstring). Greedy: one program per
    sequence. Else `chunks` programs per sequence (a power of two; None: up to 16, two blocks
    of `block_v` a chunk or more), in two launches: each program tests the row's drafts and
    sums the residual over its chunk of the vocabulary, then the one chunk where the draw
    falls finds its token. One program a row (`chunks` = 1) left most of a GPU idle at a
    verify step's few rows: 77-108 us a step on the H200 at 1-64 rows, 8-12 us in 16 chunks
    (2026-11-30)."""
    if chunks is not None and (chunks < 1 or chunks & (chunks - 1)):
        raise ValueError(f"chunks must be a power of two >= 1, got {chunks}")
    if not HAS_TRITON:
        raise RuntimeError("verify_drafts_triton needs triton, which is not importable")
    B, k, V = _check(target, draft_tokens, num_drafts, draft_probs, uniforms, greedy)
    accepted = torch.empty(B, dtype=torch.int64, device=target.device)
    token = torch.empty(B, dtype=torch.int64, device=target.device)
    if B == 0:
        return accepted, token
    if target.stride(-1) != 1:
        target = target.contiguous()
    drafts = draft_tokens.contiguous()
    if k == 0:  # no draft slot at all: a [B, 1] dummy keeps the pointer arithmetic valid
        drafts = torch.zeros((B, 1), dtype=torch.int64, device=target.device)
    q = target if draft_probs is None else draft_probs
    if q.stride(-1) != 1:
        q = q.contiguous()
    # float64, as the reference compares them: the same decisions bit for bit.
    u = target if uniforms is None else uniforms.to(torch.float64).contiguous()
    if greedy:
        _verify_greedy_kernel[(B,)](
            target, drafts, num_drafts.contiguous(), accepted, token, V, target.stride(0),
            target.stride(1), drafts.stride(0), K=k, K_PAD=_next_pow2(k + 1), BLOCK_V=block_v,
            num_warps=4,
        )  # fmt: skip
        return accepted, token
    if chunks is None:
        chunks = min(16, _next_pow2(max(1, V // (2 * block_v))))
    chunk = -(-V // chunks)
    sums = torch.empty((2, B, chunks), dtype=torch.float64, device=target.device)
    args = (target, q, drafts, num_drafts.contiguous(), u, accepted, sums[0], sums[1])
    strides = (
        target.stride(0), target.stride(1), q.stride(0), q.stride(1), drafts.stride(0),
        u.stride(0),
    )  # fmt: skip
    meta = dict(K=k, BLOCK_V=block_v, HAS_Q=draft_probs is not None, CHUNKS=chunks)
    _verify_sums_kernel[(B, chunks)](
        *args, V, chunk, *strides, K_PAD=_next_pow2(k + 1), **meta, num_warps=4
    )
    _verify_draw_kernel[(B, chunks)](*args, token, V, chunk, *strides, **meta, num_warps=4)
    return accepted, token


def verify_drafts(
    target: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    greedy: bool = False,
    log: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted drafts [B] and the next token [B] (module docstring): the Triton kernel for
    CUDA tensors when Triton is importable (log: on probabilities exponentiated first), else
    the PyTorch reference."""
    if target.is_cuda and HAS_TRITON:
        probs = target.exp() if log and not greedy else target
        return verify_drafts_triton(probs, draft_tokens, num_drafts, draft_probs, uniforms, greedy)
    return verify_drafts_reference(
        target, draft_tokens, num_drafts, draft_probs, uniforms, greedy, log
    )


def verify_chains(
    target: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chains: torch.Tensor,
    num: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several deterministic draft chains a sequence verified at once (module docstring):
    (accepted [B], tokens [B, k + 1], node [B, k + 1], their log-probs [B, k + 1]).

    target: the tree's log-probabilities [B, 1 + C * k, V] (on CUDA with Triton: the kernel
    `verify_chains_triton`, one launch), or a function (node [B], need [B] bool) -> [B, V] of
    each row's at one position, called once a depth (k + 1 times) for the nodes the path
    reaches: the caller computes only those rows; rows not in need are never read.

    A depth reads p at the candidates (the next drafts of the chains still on the path, each
    token once) and compares its uniform with their running sum in chain order: below it, that
    candidate; past all of them, the step ends there and the final token is the residual's draw
    (p without the candidates) with the same uniform rescaled, one float64 inverse-CDF pass a
    step. (p sums to 1 up to rounding: where rounding leaves the residual no mass, the
    candidate most likely at that node.)"""
    if chains.dim() != 3:
        raise ValueError(f"chains must be [B, C, k], got shape {tuple(chains.shape)}")
    B, C, k = chains.shape
    if isinstance(target, torch.Tensor):
        if target.dim() != 3 or target.shape[:2] != (B, 1 + C * k):
            raise ValueError(
                f"target must be [{B}, 1 + C * k = {1 + C * k}, V], got {tuple(target.shape)}"
            )
    if num.shape != (B, C):
        raise ValueError(f"num must be [{B}, {C}], got {tuple(num.shape)}")
    if not greedy and (uniforms is None or uniforms.shape != (B, k + 1)):
        got = None if uniforms is None else tuple(uniforms.shape)
        raise ValueError(f"uniforms must be [{B}, {k + 1}] for stochastic verification, got {got}")
    if isinstance(target, torch.Tensor) and target.is_cuda and HAS_TRITON:
        return verify_chains_triton(target, chains, num, uniforms, greedy)
    return verify_chains_reference(target, chains, num, uniforms, greedy)


def verify_chains_reference(
    target: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chains: torch.Tensor,
    num: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`verify_chains` in PyTorch (checked arguments), a loop of k + 1 depths."""
    B, C, k = chains.shape
    dist: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if isinstance(target, torch.Tensor):
        tree, at = target, torch.arange(B, device=target.device)
        dist = lambda node, need: tree[at, node]  # noqa: E731
    else:
        dist = target
    dev = chains.device
    rows = torch.arange(B, device=dev)
    alive = torch.ones(B, C, dtype=torch.bool, device=dev)
    going = torch.ones(B, dtype=torch.bool, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)  # the node the next token is drawn at
    accepted = torch.zeros(B, dtype=torch.long, device=dev)
    tokens = torch.zeros(B, k + 1, dtype=torch.long, device=dev)
    logp = torch.zeros(B, k + 1, dtype=torch.float32, device=dev)
    node = torch.zeros(B, k + 1, dtype=torch.long, device=dev)
    order = torch.arange(C, device=dev)
    first = C - order  # argmax of match * first: the first chain
    earlier = order[None, :] < order[:, None]  # [C, C]: c' < c
    final_row: torch.Tensor | None = None
    final_w = torch.zeros(B, dtype=torch.float64, device=dev)
    fallback = torch.zeros(B, dtype=torch.long, device=dev)
    fallback_lp = torch.zeros(B, dtype=torch.float32, device=dev)
    for i in range(k + 1):
        row = dist(cur, going).float()  # [B, V] log-probabilities at the path's nodes
        node[:, i] = cur
        if i < k:
            t = chains[:, :, i]  # [B, C]
            valid = alive & (i < num)
        else:
            t = torch.zeros(B, C, dtype=torch.long, device=dev)
            valid = torch.zeros(B, C, dtype=torch.bool, device=dev)
        if greedy:
            x = row.argmax(-1)
            match = valid & (t == x[:, None])
        else:
            assert uniforms is not None
            same = t[:, :, None] == t[:, None, :]  # [B, C, C]
            # Each candidate token once: at its first valid chain.
            fresh = valid & ~(same & earlier & valid[:, None, :]).any(2)
            # Exponentiated in float32 (as the kernel: no float64 transcendental), summed in
            # float64.
            pc = row.gather(1, t).exp().double() * fresh  # [B, C]
            cum = pc.cumsum(1)
            u = uniforms[:, i].double()
            pick = fresh & (u[:, None] < cum)
            c0 = (pick.long() * first).argmax(1)
            x = torch.where(pick.any(1), t[rows, c0], 0)
            match = valid & (t == x[:, None]) & pick.any(1, keepdim=True)
            stop = going & ~pick.any(1)
            total = cum[:, -1]
            # The rescaled uniform, used where the step stops (total <= u < 1): in [0, u].
            w = torch.minimum(((u - total) / (1.0 - total)).clamp(min=0.0), u)
            taken = (same & valid[:, None, :]).any(2)  # a candidate's token, chain by chain
            masked = row.scatter(1, t, torch.where(taken, float("-inf"), row.gather(1, t)))
            best = t[rows, pc.argmax(1)]
            if final_row is None:
                final_row = masked
            else:
                final_row = torch.where(stop[:, None], masked, final_row)
            final_w = torch.where(stop, w, final_w)
            fallback = torch.where(stop, best, fallback)
            fallback_lp = torch.where(stop, row.gather(1, best[:, None])[:, 0], fallback_lp)
        tokens[:, i] = x
        logp[:, i] = row.gather(1, x[:, None])[:, 0]
        go = match.any(1)
        c = (match.long() * first).argmax(1)
        cur = torch.where(go, 1 + c * k + i, cur)
        accepted += go.long()
        going &= go
        alive = match  # once no chain matches, none is alive: the later depths are scratch
    if not greedy:
        # The final token: the residual's draw at the node where the path stopped.
        assert final_row is not None
        cdf = final_row.exp().cumsum(dim=-1, dtype=torch.float64)
        x = torch.searchsorted(cdf, final_w[:, None] * cdf[:, -1:], right=True)[:, 0]
        # Past the total only by rounding: the last token with mass.
        x = torch.minimum(x, (cdf < cdf[:, -1:]).sum(-1))
        x = torch.where(cdf[:, -1] > 0, x, fallback)
        tokens[rows, accepted] = x
        # The policy's log-prob: a residual token is not a candidate (masked is row there).
        lp = final_row.gather(1, x[:, None])[:, 0]
        logp[rows, accepted] = torch.where(cdf[:, -1] > 0, lp, fallback_lp)
    return accepted, tokens, node, logp


if HAS_TRITON:

    @triton.jit
    def _residual(row, cols, V, stop_t, stop_valid):
        """The residual's mass at columns cols of a row of log-probabilities, float64: p,
        zero at the stop node's candidates (stop_t where stop_valid) and past V."""
        p = tl.exp(tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32))
        taken = (cols[:, None] == stop_t[None, :]) & stop_valid[None, :]
        keep = (cols < V) & (tl.sum(taken.to(tl.int32), 1) == 0)
        return tl.where(keep, p.to(tl.float64), 0.0)

    @triton.jit
    def _verify_chains_kernel(
        P,
        Chains,
        Num,
        U,
        Accepted,
        Tokens,
        Node,
        Logp,
        V,
        stride_pb,
        stride_pt,
        stride_cb,
        stride_cc,
        stride_nb,
        stride_ub,
        stride_tb,
        C: tl.constexpr,
        C_PAD: tl.constexpr,
        K: tl.constexpr,
        BLOCK_V: tl.constexpr,
        GREEDY: tl.constexpr,
    ):
        # One program per row: the path through its tree, depth by depth (unrolled), then the
        # residual's draw at the node where it stopped (two passes over the vocabulary).
        b = tl.program_id(0).to(tl.int64)
        offs_c = tl.arange(0, C_PAD)
        m_c = offs_c < C
        nc = tl.load(Num + b * stride_nb + offs_c, mask=m_c, other=0)
        offs_v = tl.arange(0, BLOCK_V)
        zero = b * 0  # an int64 scalar
        cur = zero
        acc = zero
        going = zero == 0
        alive = m_c
        final_node = zero
        final_w = zero.to(tl.float64)
        fallback = zero
        stop_t = offs_c.to(tl.int64) * 0
        stop_valid = offs_c < 0
        earlier = offs_c[None, :] < offs_c[:, None]  # [C_PAD, C_PAD]: c' < c
        for i in tl.static_range(K + 1):
            tl.store(Node + b * stride_tb + i, cur)
            row = P + b * stride_pb + cur * stride_pt
            if i < K:
                t = tl.load(Chains + b * stride_cb + offs_c * stride_cc + i, mask=m_c, other=0)
                valid = alive & (nc > i) & going
            else:
                t = offs_c.to(tl.int64) * 0
                valid = offs_c < 0
            if GREEDY:
                best_val = zero.to(tl.float32) + float("-inf")
                x = zero
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs_v
                    s_ = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    blk = tl.max(s_, 0)
                    idx = tl.min(tl.where((s_ == blk) & (cols < V), cols, V), 0).to(tl.int64)
                    better = blk > best_val
                    x = tl.where(better, idx, x)
                    best_val = tl.where(better, blk, best_val)
                match = valid & (t == x)
            else:
                # (t holds token ids, 0 in padded lanes: every lane's load is in bounds.)
                lp = tl.where(valid, tl.load(row + t).to(tl.float32), float("-inf"))
                same = t[:, None] == t[None, :]
                dup = tl.sum((same & earlier & valid[None, :]).to(tl.int32), 1) > 0
                fresh = valid & (dup == 0)
                pc = tl.where(fresh, tl.exp(lp).to(tl.float64), 0.0)
                cum = tl.cumsum(pc, 0)
                u = tl.load(U + b * stride_ub + i)
                pick = fresh & (u < cum)
                has = tl.sum(pick.to(tl.int32), 0) > 0
                c0 = tl.min(tl.where(pick, offs_c, C_PAD), 0)
                x = tl.sum(tl.where(offs_c == c0, t, 0), 0).to(tl.int64)
                match = valid & (t == x) & has
                stop = going & (has == 0)
                total = tl.sum(pc, 0)
                # Used where the step stops (total <= u < 1): in [0, u].
                w = tl.minimum(tl.maximum((u - total) / (1.0 - total), 0.0), u)
                top = tl.max(pc, 0)
                bc = tl.min(tl.where(pc == top, offs_c, C_PAD), 0)
                best = tl.sum(tl.where(offs_c == bc, t, 0), 0).to(tl.int64)
                final_node = tl.where(stop, cur, final_node)
                final_w = tl.where(stop, w, final_w)
                fallback = tl.where(stop, best, fallback)
                stop_t = tl.where(stop, t, stop_t)
                stop_valid = tl.where(stop, valid, stop_valid)
            tl.store(Tokens + b * stride_tb + i, x)
            tl.store(Logp + b * stride_tb + i, tl.load(row + x).to(tl.float32))
            go = tl.sum(match.to(tl.int32), 0) > 0
            c = tl.min(tl.where(match, offs_c, C_PAD), 0).to(tl.int64)
            cur = tl.where(go, 1 + c * K + i, cur)
            acc += go.to(tl.int64)
            going = going & go
            alive = match
        tl.store(Accepted + b, acc)
        if not GREEDY:
            row = P + b * stride_pb + final_node * stride_pt
            # Pass 1: the residual's mass (p without the stop node's candidates).
            mass = zero.to(tl.float64)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs_v
                mass += tl.sum(_residual(row, cols, V, stop_t, stop_valid), 0)
            goal = final_w * mass
            # Pass 2: the first token whose running sum exceeds goal.
            running = zero.to(tl.float64)
            token = zero
            last = zero  # the last token with mass (past the total only by rounding)
            found = zero != 0
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs_v
                r = _residual(row, cols, V, stop_t, stop_valid)
                cdf = running + tl.cumsum(r, 0)
                hit = (cdf > goal) & (cols < V)
                first = tl.min(tl.where(hit, cols, V), 0).to(tl.int64)
                take = (first < V) & (found == 0)
                token = tl.where(take, first, token)
                found = found | take
                last = tl.maximum(last, tl.max(tl.where(r > 0.0, cols, 0), 0).to(tl.int64))
                running += tl.sum(r, 0)
            token = tl.where(found, token, last)
            # Rounding can leave the residual no mass: the node's most likely candidate.
            token = tl.where(mass > 0.0, token, fallback)
            tl.store(Tokens + b * stride_tb + acc, token)
            tl.store(Logp + b * stride_tb + acc, tl.load(row + token).to(tl.float32))


def verify_chains_triton(
    target: torch.Tensor,
    chains: torch.Tensor,
    num: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    greedy: bool = False,
    *,
    block_v: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`verify_chains` for a tree tensor target [B, 1 + C * k, V] in one launch: one program
    per row walks its path (the candidates' probabilities a depth, unrolled over k + 1), then
    draws the final token from the residual in two passes over the vocabulary."""
    if not HAS_TRITON:
        raise RuntimeError("verify_chains_triton needs triton, which is not importable")
    B, C, k = chains.shape
    V = target.shape[-1]
    dev = target.device
    accepted = torch.zeros(B, dtype=torch.int64, device=dev)
    tokens = torch.zeros(B, k + 1, dtype=torch.int64, device=dev)
    node = torch.zeros(B, k + 1, dtype=torch.int64, device=dev)
    logp = torch.zeros(B, k + 1, dtype=torch.float32, device=dev)
    if B == 0:
        return accepted, tokens, node, logp
    if target.stride(-1) != 1:
        target = target.contiguous()
    ch, n = chains.contiguous(), num.contiguous()
    u = target if uniforms is None or greedy else uniforms.to(torch.float64).contiguous()
    _verify_chains_kernel[(B,)](
        target, ch, n, u, accepted, tokens, node, logp, V,
        target.stride(0), target.stride(1), ch.stride(0), ch.stride(1), n.stride(0),
        0 if u is target else u.stride(0), tokens.stride(0),
        C=C, C_PAD=max(2, _next_pow2(C)), K=k, BLOCK_V=block_v, GREEDY=greedy,
    )  # fmt: skip
    return accepted, tokens, node, logp
