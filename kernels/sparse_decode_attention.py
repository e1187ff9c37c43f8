"""Decode attention over each sequence's retained KV (Sparse-RL rollouts).

One new query token per sequence attends to the entries that sequence kept in its cache row.
A compressed KV cache keeps each sequence's retained entries compacted at the front of its row
with its own length, so a batch reads `k[b, :, :lengths[b]]` for every b; entries at or past a
sequence's length are garbage and never contribute.

    sparse_decode_attention(q, k, v, lengths, scale=None) -> out

    q        [B, H, D]         one query token per sequence, or
             [B, H, T, D]      T new tokens per sequence (a speculative verify step): they are
                               its last T entries, and query t sees the entries before
                               lengths[b] - (T - 1 - t) (causal among the new tokens)
    chain    (keyword) 0, or c > 0 with T = 1 + C * c: the T new tokens are a tree of C
                               draft chains verified together, token 0 the row's last token
                               and tokens 1 + j * c .. (j + 1) * c chain j; token t sees the
                               entries before the step, token 0 and the earlier tokens of its
                               own chain (c = T - 1: causal)
    k, v     [B, KVH, L, D]    any strides (e.g. `cache.k[layer, :B, :, :L]`); H % KVH == 0,
                               query head h reads kv head h // (H // KVH) (GQA)
    lengths  [B] int32/int64   valid entries per sequence; clamped to [0, L]; a sequence of
                               length 0 gets an output of zeros
    scale    default 1/sqrt(D)
    out      [B, H, D] (or [B, H, T, D]), q's dtype

Three functions: `sparse_decode_attention_reference` (plain PyTorch), the Triton kernel
`sparse_decode_attention_triton`, and the dispatcher `sparse_decode_attention`, which runs the
kernel for CUDA tensors when Triton is importable, the C kernel of `cpu.py`
for bf16 CPU tensors when it is built for this CPU, and the reference otherwise. The dense
engine's decode step calls it too (every entry of a sequence counts).

Kernel (flash-decoding): one program per (sequence, kv head, split) handles all G = H // KVH
query heads of the group, so each K/V block is read from memory once for the whole group. It
walks its share of the sequence's first `length` entries in blocks of BLOCK_N with an online
softmax (running max and sum, float32 accumulators). When B * KVH programs would leave the
GPU's multiprocessors idle (small batch, long context), each sequence is also split over its
own length into `num_splits` chunks of whole blocks (cdiv(length, num_splits), so ragged
sequences split evenly); each split writes its normalised partial output and base-2
log-sum-exp, and a second small kernel combines them. With one split the first kernel writes
the output itself. Padded query rows (G < 16, the least tl.dot takes) and padded head-dim
columns (D not a power of two) are masked; fp32 inputs use an exact fp32 dot, not tf32.
With T new tokens a row, a program's query rows are the G x T (head, token) pairs of its
group, each masked to its own causal limit: the whole verify step reads each row's entries
once, where a masked SDPA over the padded step's full capacity read every row to the end.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels import rope_append
from rlkit.kernels.triton_support import HAS_TRITON, pdl, tl, triton, wait_for_inputs

__all__ = [
    "HAS_TRITON",
    "rope_decode_applies",
    "rope_decode_attention",
    "rope_decode_attention_reference",
    "rope_decode_attention_triton",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None,
) -> tuple[int, int, int, int, int, float]:
    """Raise ValueError naming the first thing wrong with the arguments; else return
    (B, H, D, KVH, G, scale), the scale defaulting to 1/sqrt(D)."""
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [B, H, D] or [B, H, T, D], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be [B, KVH, L, D], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if k.shape[0] != B:
        raise ValueError(f"batch mismatch: q has B={B}, k/v have B={k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head_dim mismatch: q has D={D}, k/v have D={k.shape[3]}")
    kvh = k.shape[1]
    if kvh == 0 or H % kvh != 0:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads KVH={kvh}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must be [B]=[{B}], got shape {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {q.device, k.device, v.device, lengths.device}
    if len(devices) != 1:
        raise ValueError(
            f"q, k, v and lengths must be on one device, got {sorted(map(str, devices))}"
        )
    return B, H, D, kvh, H // kvh, (1.0 / math.sqrt(D) if scale is None else scale)


def sparse_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    exact: bool = True,
    chain: int = 0,
) -> torch.Tensor:
    """Plain-PyTorch decode attention with the contract of the module docstring.

    The G query heads that share a kv head become G query rows of that head, and one
    `F.scaled_dot_product_attention` over [B, KVH, G, D] with a boolean mask built from
    `lengths` does the rest (much faster on CPU than SDPA's GQA mode for a single token).

    exact=True (the default): the math runs in float32 and the result is cast to q's dtype
    once. exact=False runs SDPA in the inputs' dtype: the same for float32 inputs; for
    bf16/fp16 it skips upcasting the whole K/V (several times faster on CPU, whose SDPA kernel
    still accumulates in float32) and differs from exact=True by about one bf16/fp16 rounding.
    """
    B, H, D, kvh, G, scale = _check(q, k, v, lengths, scale)
    T = q.shape[2] if q.dim() == 4 else 1
    _check_chain(chain, T)
    L = k.shape[2]
    dtype = torch.float32 if exact else q.dtype
    # Query row g * T + t of kv head h: head h * G + g, token t.
    qg = q.reshape(B, kvh, G * T, D).to(dtype)
    kk, vv = k.to(dtype), v.to(dtype)
    # Token t sees the entries before lengths - (T - 1 - t): [B, T].
    lim = lengths.to(torch.int64)[:, None] - (T - 1) + torch.arange(T, device=q.device)
    mask = torch.arange(L, device=q.device) < lim[:, :, None]  # [B, T, L]
    if chain:
        # Of the step's own entries (index j = entry - (length - T)), only the tree's.
        j = torch.arange(L, device=q.device) - (lengths.to(torch.int64)[:, None] - T)  # [B, L]
        mask &= (j[:, None, :] < 0) | _tree_sees(torch.arange(T, device=q.device), j, chain)
    empty = lim <= 0  # [B, T]
    # A row with no valid entry would be all -inf (NaN); let it attend to everything and zero it.
    mask = (mask | empty[:, :, None]).repeat(1, G, 1)[:, None]  # [B, 1, G * T, L]
    out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=scale)
    out = out.reshape(B, H, T, D)
    out = torch.where(
        empty[:, None, :, None], torch.zeros((), dtype=out.dtype, device=out.device), out
    )
    return out.to(q.dtype) if q.dim() == 4 else out[:, :, 0].to(q.dtype)


def _tree_sees(t: torch.Tensor, j: torch.Tensor, chain: int) -> torch.Tensor:
    """[B, T, L] bool: whether step token t [T] sees step entry j [B, L] (j >= 0) in a tree of
    chains of `chain` tokens: token 0, and j in t's chain at or before t."""
    tt, jj = t[None, :, None], j[:, None, :]
    jc, tc = (jj - 1).clamp(min=0) // chain, (tt - 1).clamp(min=0) // chain
    return (jj == 0) | ((jj >= 1) & (tt >= 1) & (jc == tc) & (jj <= tt))


def _check_chain(chain: int, T: int) -> None:
    if chain < 0 or (chain and (T - 1) % chain):
        raise ValueError(f"chain must be 0 or divide T - 1 = {T - 1} (C chains), got {chain}")


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _decode_partial_kernel(
        Q,
        K,
        V,
        Lens,
        Out,
        MidO,
        MidLse,
        qk_scale,  # scale * log2(e): the softmax runs in base 2
        L,
        num_splits,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_od,
        stride_qt,  # T > 1: q [B, H, T, D] and out [B, H, T, D]'s token strides
        stride_ot,
        stride_lb,  # lengths may be a view (a padded verify step's [slots, T] buffer column)
        # FUSE (`rope_decode_attention`): Q holds the new token's queries before RoPE; its key
        # and value (KN, VN [B, KVH, D]) are rotated / stored at entry lengths[b] - 1 by the
        # program whose share holds it, which also writes the rotated queries into the ring.
        KN,
        VN,
        Cos,
        Sin,
        QR,
        Ring,
        stride_knb,
        stride_knh,
        stride_vnb,
        stride_vnh,
        stride_cb,
        stride_sb,
        stride_qrb,
        stride_qrh,
        stride_qrl,
        stride_rb,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,  # one split: write the output here, no combine step
        IEEE_DOT: tl.constexpr,
        FUSE: tl.constexpr = False,
        HAS_RING: tl.constexpr = False,
        T: tl.constexpr = 1,  # new tokens a row; query row r is head kvh * G + r // T, token r % T
        CHAIN: tl.constexpr = 0,  # > 0: the T tokens are a tree of chains of CHAIN tokens
        PDL: tl.constexpr = False,
    ):
        wait_for_inputs(PDL)
        # 64-bit indices: a view of a large cache easily puts b * stride_kb past 2**31.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        length = tl.load(Lens + b * stride_lb).to(tl.int32)
        length = tl.minimum(tl.maximum(length, 0), L)
        # This split's share of the sequence, a whole number of blocks.
        chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)

        offs_g = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        heads = kvh * G + offs_g // T
        tok = offs_g % T
        mask_g = offs_g < G * T
        mask_d = offs_d < D
        # Each query row's causal limit: token t sees the entries before length - (T - 1 - t).
        lim = length - (T - 1) + tok  # [BLOCK_H]

        mask_q = mask_g[:, None] & mask_d[None, :]
        q_ptr = Q + b * stride_qb + heads[:, None] * stride_qh + tok[:, None] * stride_qt
        q = tl.load(
            q_ptr + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0
        )  # [BLOCK_H, BLOCK_D]
        if FUSE:
            # RoPE in the half-split layout (D a power of two, so BLOCK_D == D): x * cos +
            # rotate_half(x) * sin, in float32, rounded once to the cache's dtype.
            partner = (offs_d + D // 2) % D
            sign = tl.where(offs_d < D // 2, -1.0, 1.0)
            cos = tl.load(Cos + b * stride_cb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            sin = tl.load(Sin + b * stride_sb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            sin = sin * sign
            q_p = tl.load(q_ptr + partner[None, :] * stride_qd, mask=mask_q, other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + q_p.to(tl.float32) * sin[None, :]).to(
                K.dtype.element_ty
            )
            kn_ptr = KN + b * stride_knb + kvh * stride_knh
            k_new = tl.load(kn_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * cos
            k_new += tl.load(kn_ptr + partner).to(tl.float32) * sin
            k_new = k_new.to(K.dtype.element_ty)  # [BLOCK_D]
            v_new = tl.load(VN + b * stride_vnb + kvh * stride_vnh + offs_d, mask=mask_d, other=0.0)
            # The new entry is added from registers by the program whose share holds it; the
            # walk stops before it (another program may be storing it).
            new_at = length - 1
            owner = (new_at >= start) & (new_at < end)
            end = tl.minimum(end, new_at)
        if IEEE_DOT:
            q = q.to(tl.float32)

        k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            mask_n = pos < end
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + pos[:, None] * stride_kl, mask=kv_mask, other=0.0)  # [N, D]
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if T == 1:
                s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, N]
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            else:
                # A row's limit may leave it a block with no entry: its max stays -inf, and
                # the exponents below are taken against 0 instead (exp2(-inf) = 0, no NaN).
                seen = mask_n[None, :] & (pos[None, :] < lim[:, None])
                if CHAIN > 0:
                    # The step's own entries (j >= 0): token 0 and the query's own chain.
                    j = (pos - (length - T)).to(tl.int32)[None, :]  # [1, N]
                    t2 = tok[:, None]  # [BLOCK_H, 1]
                    jc = tl.where(j >= 1, j - 1, 0) // CHAIN
                    tc = tl.where(t2 >= 1, t2 - 1, 0) // CHAIN
                    tree = (j == 0) | ((j >= 1) & (t2 >= 1) & (jc == tc) & (j <= t2))
                    seen = seen & ((j < 0) | tree)
                s = tl.where(seen, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * stride_vl, mask=kv_mask, other=0.0)  # [N, D]
            if IEEE_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if FUSE:
            if owner:
                # (Padded query rows are zeros: a finite score, never stored.)
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp2(m_i - m_new)
                p_new = tl.exp2(s_new - m_new)
                l_i = l_i * alpha + p_new
                if not IEEE_DOT:
                    p_new = p_new.to(v_new.dtype).to(tl.float32)  # as the tiles' bf16 dot
                acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
                m_i = m_new
                new_row = new_at.to(tl.int64)
                tl.store(k_base + new_row * stride_kl, k_new[None, :], mask=mask_d[None, :])
                tl.store(v_base + new_row * stride_vl, v_new[None, :], mask=mask_d[None, :])
                if HAS_RING:
                    r = tl.load(Ring + b * stride_rb).to(tl.int64)
                    tl.store(
                        QR + b * stride_qrb + heads[:, None] * stride_qrh + r * stride_qrl
                        + offs_d[None, :],
                        q.to(QR.dtype.element_ty),
                        mask=mask_q,
                    )  # fmt: skip

        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        if DIRECT:
            tl.store(
                Out + b * stride_ob + heads[:, None] * stride_oh + tok[:, None] * stride_ot
                + offs_d[None, :] * stride_od,
                o.to(Out.dtype.element_ty),
                mask=mask_g[:, None] & mask_d[None, :],
            )  # fmt: skip
        else:
            # MidO [B, H, T, num_splits, BLOCK_D] and MidLse [B, H, T, num_splits], contiguous.
            H = tl.num_programs(1) * G
            row = ((b * H + heads) * T + tok) * num_splits + split  # [BLOCK_H]
            tl.store(
                MidO + row[:, None] * BLOCK_D + offs_d[None, :],
                o,
                mask=mask_g[:, None],
            )
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(MidLse + row, lse, mask=mask_g)

    @triton.jit
    def _decode_combine_kernel(
        MidO,
        MidLse,
        Out,
        stride_ob,
        stride_oh,
        stride_od,
        H,
        num_splits,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        wait_for_inputs(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < num_splits
        row = (b * H + h) * num_splits + offs_s
        lse = tl.load(MidLse + row, mask=mask_s, other=float("-inf"))  # [S]
        o = tl.load(
            MidO + row[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0
        )
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_safe)  # empty splits: exp2(-inf) = 0
        total = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(
            Out + b * stride_ob + h * stride_oh + offs_d * stride_od,
            out.to(Out.dtype.element_ty),
            mask=offs_d < D,
        )


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pick_num_splits(B: int, kvh: int, L: int, block_n: int, device: torch.device) -> int:
    """Split over L only while B * KVH programs leave multiprocessors idle (fewer than two
    per SM), aiming at ~3 per SM, in chunks of at least 4 blocks (so the combine step stays
    cheap next to the reads). H100 measurements (benchmarks/RESULTS.md): splitting 96 or 192
    programs at L >= 4096 cut the time 1.3-2.3x; splitting 256 was neutral, 512 cost ~5%."""
    if device.type != "cuda":
        return 1
    programs = B * kvh
    sms = _sm_count(device)
    if programs >= 2 * sms:
        return 1
    want = -(-3 * sms // programs)
    by_len = max(1, L // (4 * block_n))
    return max(1, min(want, by_len, 64))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sparse_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fused: tuple | None = None,
    chain: int = 0,
) -> torch.Tensor:
    """The Triton kernel (contract in the module docstring). The keyword-only knobs are for
    tests and benchmarks: num_splits (None: chosen from B * KVH, L and the GPU's multiprocessor
    count), block_n (KV entries per block), num_warps, num_stages. `fused`: the new token's
    (k, v, cos, sin, ring_store, ring), from `rope_decode_attention_triton`."""
    if not HAS_TRITON:
        raise RuntimeError("sparse_decode_attention_triton needs triton, which is not importable")
    B, H, D, kvh, G, scale = _check(q, k, v, lengths, scale)
    L = k.shape[2]
    one = q.dim() == 3
    T = 1 if one else q.shape[2]
    if fused is not None and not one:
        raise ValueError("the fused RoPE step takes one new token a row")
    _check_chain(chain, T)
    out4 = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    out = out4[:, :, 0] if one else out4
    if B == 0 or H == 0 or D == 0 or T == 0:
        return out
    q4 = q[:, :, None] if one else q

    BLOCK_D = max(16, _next_pow2(D))
    BLOCK_H = max(16, _next_pow2(G * T))  # tl.dot needs at least 16 rows
    if block_n is None:
        block_n = 64
    if num_splits is None:
        num_splits = _pick_num_splits(B, kvh, L, block_n, q.device)
    num_splits = max(1, int(num_splits))
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 2
    # float32 inputs get an exact float32 dot (not tf32). Off CUDA the kernel only runs under
    # TRITON_INTERPRET=1, whose tl.dot multiplies bf16 bit patterns as integers (triton 3.x):
    # there bf16 operands are upcast to float32 first.
    ieee = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    opts: dict[str, Any] = {"num_warps": num_warps, "num_stages": num_stages}

    if num_splits > 1:
        mid_o = torch.empty((B, H, T, num_splits, BLOCK_D), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((B, H, T, num_splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused

    if fused is None:
        extra: tuple = (q, q, q, q, q, lengths) + (0,) * 10
        flags = {}
    else:
        k_new, v_new, cos, sin, ring_store, ring = fused
        has_ring = ring_store is not None
        qr = ring_store if has_ring else q
        rg = ring if ring is not None else lengths
        extra = (
            k_new, v_new, cos, sin, qr, rg, k_new.stride(0), k_new.stride(1), v_new.stride(0),
            v_new.stride(1), cos.stride(0), sin.stride(0),
            qr.stride(0) if has_ring else 0, qr.stride(1) if has_ring else 0,
            qr.stride(2) if has_ring else 0, rg.stride(0),
        )  # fmt: skip
        flags = {"FUSE": True, "HAS_RING": has_ring}
    qs, os_ = q4.stride(), out4.stride()
    _decode_partial_kernel[(B, kvh, num_splits)](
        q4,
        k,
        v,
        lengths,
        out4,
        mid_o,
        mid_lse,
        scale * 1.4426950408889634,
        L,
        num_splits,
        qs[0],
        qs[1],
        qs[3],
        *k.stride(),
        *v.stride(),
        os_[0],
        os_[1],
        os_[3],
        qs[2],
        os_[2],
        lengths.stride(0),
        *extra,
        **flags,
        T=T,
        CHAIN=chain if T > 1 else 0,
        G=G,
        D=D,
        BLOCK_H=BLOCK_H,
        BLOCK_D=BLOCK_D,
        BLOCK_N=block_n,
        DIRECT=num_splits == 1,
        IEEE_DOT=ieee,
        **opts,
        **pdl(q.device),
    )
    if num_splits > 1:
        # (head, token) pairs as H * T rows: out4 is contiguous, so row h * T + t is at
        # (h * T + t) * D.
        _decode_combine_kernel[(B, H * T)](
            mid_o,
            mid_lse,
            out4,
            os_[0],
            os_[2],
            os_[3],
            H * T,
            num_splits,
            D=D,
            BLOCK_D=BLOCK_D,
            BLOCK_S=max(2, _next_pow2(num_splits)),
            num_warps=4 if BLOCK_D >= 128 else 2,
            **pdl(q.device),
        )
    return out


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    cpu_kernel: bool = True,
    chain: int = 0,
) -> torch.Tensor:
    """Decode attention over each sequence's first `lengths[b]` KV entries (module docstring):
    the Triton kernel for CUDA tensors when Triton is importable; on CPU the C kernel of
    `rlkit.kernels.cpu` for bf16 or float32 when it is built for this CPU; else the PyTorch reference
    (in the inputs' dtype, the fast form; see `sparse_decode_attention_reference`).

    Dense decoding is the case where every sequence's length is all of its entries; a
    speculative verify step feeds q [B, H, T, D] (a plain step's [B, H, 1, D] takes the
    one-token kernels).
    cpu_kernel=False skips the C kernel (to compare against ATen's attention). chain: a tree
    of draft chains (module docstring)."""
    if q.is_cuda and HAS_TRITON:
        return sparse_decode_attention_triton(q, k, v, lengths, scale, chain=chain)
    # The C kernel takes one new token a row: [B, H, 1, D] goes to it as [B, H, D].
    q3 = q[:, :, 0] if q.dim() == 4 and q.shape[2] == 1 else q
    if (
        q3.dim() == 3
        and cpu_kernel
        and q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float32)
    ):
        scale = _check(q3, k, v, lengths, scale)[-1]
        if cpu_kernels.supports(q3, k, v):
            out = cpu_kernels.decode_attention(q3, k, v, lengths, scale)
            return out if q3 is q else out[:, :, None]
    return sparse_decode_attention_reference(q, k, v, lengths, scale, exact=False, chain=chain)


# --------------------------------------------------------------------------------------------
# RoPE, the cache append and the attention of a decode step in one launch
# --------------------------------------------------------------------------------------------


def _check_fused(q, k, v, cos, sin, k_cache, v_cache, lengths, ring_store, ring) -> None:
    """`rope_append`'s checks with one new token a row at entry lengths - 1, then the
    attention's."""
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, H, D] (one new token a row), got {tuple(q.shape)}")
    _check(q[:, 0], k_cache, v_cache, lengths, None)
    # rope_append checks its write indices' shape only: a view of lengths stands in for them.
    # (Computing them, lengths - 1, was a launch a layer in every captured decode step.)
    rope_append._check(q, k, v, cos, sin, lengths[:, None], k_cache, v_cache, ring_store, ring)


# RLKIT_FUSED_ROPE_ATTENTION=0 keeps the decode step on the two-launch path (rope_append, then
# the attention kernel): the A/B switch of the GPU benches and a way around a faulty fused kernel.
FUSED_ROPE_ATTENTION = os.environ.get("RLKIT_FUSED_ROPE_ATTENTION", "1") != "0"
# The fused kernel carries the new token's rotation and store through its loop and streams
# rows slower than the plain kernel; it pays where the launch it saves counts, a small batch
# of short rows. On an H200 (2026-11-30, H16 KVH8 D128 bf16): `bench_rope_attention.py
# --sweep`, each at its best configuration, fused / two launches 37.5 / 39.4 us at 64 rows of
# <= 576 entries, 197.1 / 195.9 at 455 rows, 111.9 / 110.1 at 64 rows of <= 2,048 (a dense
# cache); the engine's 455-sequence compressed rollout (`rlkit bench rollout`, 4,096 tokens)
# made 54,087 tok/s fused against 54,667 with two launches. So it takes rows of at most
# FUSED_MAX_LEN entries (a compressed cache's budget + interval) at most FUSED_MAX_PROGRAMS_PER_SM
# (sequence, kv head) programs per multiprocessor.
FUSED_MAX_LEN = 1024
FUSED_MAX_PROGRAMS_PER_SM = 4
# Its configuration in that regime, from the same sweep.
FUSED_KNOBS: dict[str, Any] = {"num_stages": 3, "block_n": 32}


def rope_decode_applies(q: torch.Tensor, length: int = 0, kv_heads: int = 1) -> bool:
    """Whether `rope_decode_attention` takes the fused kernel for q [B, 1, H, D] over rows of
    `length` entries with `kv_heads` kv heads: CUDA, Triton, a power-of-two D, the regime
    above (and not turned off by RLKIT_FUSED_ROPE_ATTENTION=0)."""
    D = q.shape[-1]
    return (
        FUSED_ROPE_ATTENTION
        and length <= FUSED_MAX_LEN
        and q.is_cuda
        and HAS_TRITON
        and D >= 2
        and not D & (D - 1)
        and q.shape[0] * kv_heads <= FUSED_MAX_PROGRAMS_PER_SM * _sm_count(q.device)
    )


def rope_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    ring_store: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
    *,
    cpu_kernel: bool = True,
) -> torch.Tensor:
    """`rope_append` (the new token at entry lengths[b] - 1), then `sparse_decode_attention`:
    the two calls the fused kernel replaces."""
    args = (q, k, v, cos, sin, k_cache, v_cache, lengths, ring_store, ring)
    return _rope_then_attend(args, rope_append.rope_append_reference, cpu_kernel)


def _rope_then_attend(args: tuple, rope: Any, cpu_kernel: bool) -> torch.Tensor:
    """`rope` (rope_append or its reference) at entry lengths - 1, then the attention."""
    _check_fused(*args)
    q, k, v, cos, sin, k_cache, v_cache, lengths, ring_store, ring = args
    write = (lengths.to(torch.int64) - 1)[:, None]
    q_rot = rope(q, k, v, cos, sin, write, k_cache, v_cache, ring_store, ring)
    return sparse_decode_attention(q_rot[:, :, 0], k_cache, v_cache, lengths, cpu_kernel=cpu_kernel)


def rope_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    ring_store: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
    **knobs: Any,
) -> torch.Tensor:
    """The attention kernel with FUSE: every program rotates its group's queries; the one
    whose share of the row holds entry lengths[b] - 1 rotates the new key, stores it and the
    value there (and the rotated queries into the ring) and adds that entry from registers,
    so the others never read an entry being written. knobs: as
    `sparse_decode_attention_triton`."""
    if not HAS_TRITON:
        raise RuntimeError("rope_decode_attention_triton needs triton, which is not importable")
    _check_fused(q, k, v, cos, sin, k_cache, v_cache, lengths, ring_store, ring)
    D = q.shape[-1]
    if D & (D - 1):
        raise ValueError(f"rope_decode_attention_triton needs a power-of-two head_dim, got {D}")
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                    ("ring_store", ring_store)):  # fmt: skip
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride on its last dim")
    fused = (k[:, 0], v[:, 0], cos[:, 0, 0], sin[:, 0, 0], ring_store,
             None if ring is None else ring[:, 0])  # fmt: skip
    return sparse_decode_attention_triton(q[:, 0], k_cache, v_cache, lengths, fused=fused, **knobs)


def rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    ring_store: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
    *,
    cpu_kernel: bool = True,
) -> torch.Tensor:
    """A decode step's attention with its RoPE and cache append, out [B, H, D]:

        q           [B, 1, H, D]     the new token's queries before RoPE (unit stride on D)
        k, v        [B, 1, KVH, D]   its key (before RoPE) and value
        cos, sin    [B, 1, 1, D]     RoPE in the half-split layout
        k_cache     [B, KVH, L, D]   row b: sequence b's entries (views of the cache), the new
        v_cache                      one stored at entry lengths[b] - 1
        lengths     [B]              entries each row attends to, the new one included
        ring_store  [S, H, W, D]     optional: SnapKV's query ring; ring [B, 1] its entry

    The fused kernel where `rope_decode_applies` (one launch where rope_append and the
    attention take two), else those two dispatchers in turn (kernels on CUDA; the references,
    or the C attention kernel by `cpu_kernel`, elsewhere)."""
    args = (q, k, v, cos, sin, k_cache, v_cache, lengths, ring_store, ring)
    if rope_decode_applies(q, k_cache.shape[2], k.shape[2]):
        return rope_decode_attention_triton(*args, **FUSED_KNOBS)
    return _rope_then_attend(args, rope_append.rope_append, cpu_kernel)
