"""RoPE and the KV-cache append of a decode step in one launch: the new tokens' queries rotated,
their rotated keys and their values written into the cache at each row's write index, and
(SnapKV's observation window) the rotated queries into a ring.

    q_rot = rope_append(q, k, v, cos, sin, write, k_store, v_store, ring_store, ring)

    q           [B, T, H, D]     the fused q/k/v projection's views (any strides, unit
    k, v        [B, T, KVH, D]   stride on D)
    cos, sin    [B, 1, T, D]     RoPE in the half-split layout (`rlkit.models.decoder.rotate`)
    write       [B, T] int64     the cache entry each new token goes to (row b is slot b)
    k_store     [S, KVH, L, D]   the layer's cache (S >= B slots, unit stride on D)
    v_store     [S, KVH, L, D]
    ring_store  [S, H, W, D]     optional: the query ring; ring [B, T] int64 its entry per token
    q_rot       [B, H, T, D]     returned, contiguous: the rotated queries

The PyTorch path of a decode step does this in some fifteen launches per layer (the rotation
of q and of k, each a negation, a concatenation, two products and a sum; the index-puts of k,
v and the ring); inside a CUDA-graph step on a GPU each launch costs a few microseconds
whatever its size, ~0.7 ms a step for a 24-layer model at batch 64
(`benchmarks/profile_rollout.py`). Rotation in float32, one rounding to the store's dtype (the
PyTorch path rounds each product: results agree to a unit of bf16's last place).

Three functions, as the other kernel modules: `rope_append_reference` (plain PyTorch: the
decode step's former path), the Triton kernel `rope_append_triton` (one program per token:
its H query heads, KVH key heads and KVH value heads as [heads, D / 2] blocks), and the dispatcher `rope_append` (the
kernel for CUDA tensors when Triton is importable and D is a power of two, else the reference).
"""

from __future__ import annotations

import torch
from rlkit.kernels.triton_support import HAS_TRITON, pdl, tl, triton, wait_for_inputs

__all__ = ["HAS_TRITON", "rope_append", "rope_append_reference", "rope_append_triton"]


def _check(q, k, v, cos, sin, write, k_store, v_store, ring_store, ring) -> None:
    """Raise ValueError naming the first inconsistent argument."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, heads, D], got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k and v must be [{B}, {T}, KVH, {D}], got {k.shape} and {v.shape}")
    if H % k.shape[2]:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({k.shape[2]})")
    if D % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {D}")
    if cos.shape != (B, 1, T, D) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [{B}, 1, {T}, {D}], got {cos.shape}, {sin.shape}")
    if write.shape != (B, T):
        raise ValueError(f"write must be [{B}, {T}], got {tuple(write.shape)}")
    for name, store in (("k_store", k_store), ("v_store", v_store)):
        if store.dim() != 4 or store.shape[0] < B or store.shape[1] != k.shape[2]:
            raise ValueError(
                f"{name} must be [>= {B}, {k.shape[2]}, L, {D}], got {tuple(store.shape)}"
            )
        if store.shape[3] != D:
            raise ValueError(f"{name} must be [>= {B}, {k.shape[2]}, L, {D}], got {store.shape}")
    if (ring_store is None) != (ring is None):
        raise ValueError("ring_store and ring go together")
    if ring_store is not None and (
        ring_store.dim() != 4 or ring_store.shape[0] < B or ring_store.shape[1:4:2] != (H, D)
    ):
        raise ValueError(f"ring_store must be [>= {B}, {H}, W, {D}], got {ring_store.shape}")
    if ring is not None and ring.shape != (B, T):
        raise ValueError(f"ring must be [{B}, {T}], got {tuple(ring.shape)}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_append_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    ring_store: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract of the module docstring in plain PyTorch (the decode step's former ops)."""
    _check(q, k, v, cos, sin, write, k_store, v_store, ring_store, ring)
    B = q.shape[0]
    q_rot = _rotate(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
    k_rot = _rotate(k.transpose(1, 2), cos, sin)
    slots = torch.arange(B, device=q.device)[:, None]  # [B, 1]
    # Advanced indices around a slice: the indexed view is [B, T, KVH, D].
    k_store[slots, :, write] = k_rot.transpose(1, 2)
    v_store[slots, :, write] = v
    if ring_store is not None:
        ring_store[slots, :, ring] = q_rot.transpose(1, 2)
    return q_rot.contiguous()


if HAS_TRITON:

    @triton.jit
    def _rotate_halves(src, offs, mask, c1, c2, s1, s2, HALF: tl.constexpr):
        """RoPE of the rows at src (+ offs: [1, HALF] columns of each half) in float32: the
        first and second halves of x * cos + rotate_half(x) * sin."""
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    @triton.jit
    def _rope_append_kernel(
        Q, K, V, Cos, Sin, Write, QOut, KS, VS, QR, Ring,
        T, H, KVH,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
        sc_b, sc_t, sw_b, sw_t,
        so_b, so_h, so_t,
        sks_b, sks_h, sks_l, svs_b, svs_h, svs_l,
        sqr_b, sqr_h, sqr_l, sr_b, sr_t,
        HAS_RING: tl.constexpr,
        HALF: tl.constexpr,
        HP: tl.constexpr,
        KP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Program (token): every query, key and value head of one token, so that a program
        has work enough (one per (token, head) left the GPU scheduling 14,560 tiny programs
        a layer at 455 sequences) and loads its cos / sin once."""
        wait_for_inputs(PDL)
        bt = tl.program_id(0)
        b = (bt // T).to(tl.int64)
        t = (bt % T).to(tl.int64)
        offs = tl.arange(0, HALF)[None, :]  # [1, HALF]
        c = Cos + b * sc_b + t * sc_t
        s = Sin + b * sc_b + t * sc_t
        c1 = tl.load(c + offs).to(tl.float32)
        c2 = tl.load(c + HALF + offs).to(tl.float32)
        s1 = tl.load(s + offs).to(tl.float32)
        s2 = tl.load(s + HALF + offs).to(tl.float32)
        # Queries: rotated into QOut [B, H, T, D] and, with a ring, into the query ring.
        hq = tl.arange(0, HP)[:, None]  # [HP, 1]
        mq = (hq < H) & (offs < HALF)
        o1, o2 = _rotate_halves(Q + b * sq_b + t * sq_t + hq * sq_h, offs, mq, c1, c2, s1, s2, HALF)
        dst = QOut + b * so_b + hq * so_h + t * so_t
        tl.store(dst + offs, o1.to(QOut.dtype.element_ty), mask=mq)
        tl.store(dst + HALF + offs, o2.to(QOut.dtype.element_ty), mask=mq)
        if HAS_RING:
            r = tl.load(Ring + b * sr_b + t * sr_t)
            dst = QR + b * sqr_b + hq * sqr_h + r * sqr_l
            tl.store(dst + offs, o1.to(QR.dtype.element_ty), mask=mq)
            tl.store(dst + HALF + offs, o2.to(QR.dtype.element_ty), mask=mq)
        # Keys, rotated, and values, as they are, into the token's cache entry.
        w = tl.load(Write + b * sw_b + t * sw_t)
        hk = tl.arange(0, KP)[:, None]
        mk = (hk < KVH) & (offs < HALF)
        o1, o2 = _rotate_halves(K + b * sk_b + t * sk_t + hk * sk_h, offs, mk, c1, c2, s1, s2, HALF)
        dst = KS + b * sks_b + hk * sks_h + w * sks_l
        tl.store(dst + offs, o1.to(KS.dtype.element_ty), mask=mk)
        tl.store(dst + HALF + offs, o2.to(KS.dtype.element_ty), mask=mk)
        src = V + b * sv_b + t * sv_t + hk * sv_h
        dst = VS + b * svs_b + hk * svs_h + w * svs_l
        tl.store(dst + offs, tl.load(src + offs, mask=mk), mask=mk)
        tl.store(dst + HALF + offs, tl.load(src + HALF + offs, mask=mk), mask=mk)


def rope_append_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    ring_store: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel (contract in the module docstring): one program per token."""
    if not HAS_TRITON:
        raise RuntimeError("rope_append_triton needs triton, which is not importable")
    _check(q, k, v, cos, sin, write, k_store, v_store, ring_store, ring)
    B, T, H, D = q.shape
    kvh = k.shape[2]
    if D & (D - 1):
        raise ValueError(f"rope_append_triton needs a power-of-two head_dim, got {D}")
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride on its last dim")
    for name, y in (("k_store", k_store), ("v_store", v_store), ("ring_store", ring_store)):
        if y is not None and y.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride on its last dim")
    q_out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if B * T == 0:
        return q_out
    has_ring = ring_store is not None and ring is not None
    qr = ring_store if ring_store is not None else q_out
    rg = ring if ring is not None else write
    _rope_append_kernel[(B * T,)](
        q, k, v, cos, sin, write, q_out, k_store, v_store, qr, rg,
        T, H, kvh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), cos.stride(2), write.stride(0), write.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_store.stride(0), k_store.stride(1), k_store.stride(2),
        v_store.stride(0), v_store.stride(1), v_store.stride(2),
        qr.stride(0), qr.stride(1), qr.stride(2), rg.stride(0), rg.stride(1),
        HAS_RING=has_ring, HALF=D // 2, HP=triton.next_power_of_2(H),
        KP=triton.next_power_of_2(kvh), num_warps=4, **pdl(q.device),
    )  # fmt: skip
    return q_out


def applies(q: torch.Tensor) -> bool:
    """Whether `rope_append` runs the kernel for q (else the reference)."""
    D = q.shape[-1]
    return q.is_cuda and HAS_TRITON and D >= 2 and not D & (D - 1)


def rope_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    ring_store: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated queries [B, H, T, D], the new keys and values stored (module docstring): the
    Triton kernel for CUDA tensors with a power-of-two head_dim, else the PyTorch reference."""
    fn = rope_append_triton if applies(q) else rope_append_reference
    return fn(q, k, v, cos, sin, write, k_store, v_store, ring_store, ring)
