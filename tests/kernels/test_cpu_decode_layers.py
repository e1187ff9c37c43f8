"""rlkit.kernels.cpu's `decode_layers` (cpu_avx2.c's rlkit_decode_layers_f32: every layer of a
float32 decode step in one call) against a PyTorch reference of the layers (F.linear, RMSNorm,
rotate, causal softmax attention over the cache), against the same kernels called one by one
(identical bits: the same code in the same order), and its argument checks. Skips only where
the float32 build cannot run (no compiler, no AVX2 + FMA, RLKIT_CPU_ISA or
RLKIT_CPU_KERNELS)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rlkit.kernels import cpu as cpu_kernel

from rlkit.models.decoder import rotate

EPS = 1e-5


def _model(layers: int, hidden: int, H: int, KVH: int, D: int, inter: int, bias: bool, g):
    """Per layer (input norm, qkv (w, b), o (w, b), post norm, gate_up (w, b), down (w, b))."""

    def lin(n, k, with_bias):
        w = torch.randn(n, k, generator=g) / k**0.5
        return w, (torch.randn(n, generator=g) * 0.1 if with_bias else None)

    out = []
    for _ in range(layers):
        out.append(
            (
                1 + 0.1 * torch.randn(hidden, generator=g),
                lin((H + 2 * KVH) * D, hidden, bias),
                lin(hidden, H * D, bias),
                1 + 0.1 * torch.randn(hidden, generator=g),
                lin(2 * inter, hidden, bias),
                lin(hidden, inter, bias),
            )
        )
    return out


def _rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _reference(layers, final, x, cos, sin, k_stores, v_stores, lengths, H, KVH, D, T):
    """PyTorch: the layers of the step, the caches written in place; the final-norm states."""
    B = lengths.shape[0]
    G, scale = H // KVH, D**-0.5
    h = _rms(x, layers[0][0])
    for i, (_, qkv_wb, o_wb, post, gu_wb, down_wb) in enumerate(layers):
        q, k, v = F.linear(h, *qkv_wb).view(B, T, -1, D).split([H, KVH, KVH], dim=2)
        c, s = cos.view(B, 1, T, D), sin.view(B, 1, T, D)
        q = rotate(q.transpose(1, 2), c, s)  # [B, H, T, D]
        k = rotate(k.transpose(1, 2), c, s)  # [B, KVH, T, D]
        v = v.transpose(1, 2)
        att = torch.empty(B, T, H, D)
        for b in range(B):
            start = int(lengths[b]) - T
            k_stores[i][b, :, start : start + T] = k[b]
            v_stores[i][b, :, start : start + T] = v[b]
            for t in range(T):
                n = start + t + 1
                keys = k_stores[i][b, :, :n].repeat_interleave(G, dim=0)  # [H, n, D]
                vals = v_stores[i][b, :, :n].repeat_interleave(G, dim=0)
                p = torch.softmax((keys @ q[b, :, t, :, None])[..., 0] * scale, dim=-1)
                att[b, t] = (p[:, None, :] @ vals)[:, 0]
        x = x + F.linear(att.reshape(B * T, -1), *o_wb)
        h = _rms(x, post)
        gate, up = F.linear(h, *gu_wb).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, *down_wb)
        h = _rms(x, layers[i + 1][0] if i + 1 < len(layers) else final)
    return h, x


def _setup(B, T, H, KVH, D, bias, ring, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, inter, n_layers, cap = 40, 56, 3, 24
    layers = _model(n_layers, hidden, H, KVH, D, inter, bias, g)
    final = 1 + 0.1 * torch.randn(hidden, generator=g)
    x = torch.randn(B * T, hidden, generator=g)
    pos = torch.randint(0, 500, (B * T, 1), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    # Each layer's stores: a slice of slots 0..B-1 of a larger store (strided rows).
    k_stores = [torch.randn(B + 2, KVH, cap, D, generator=g) for _ in range(n_layers)]
    v_stores = [torch.randn(B + 2, KVH, cap, D, generator=g) for _ in range(n_layers)]
    lengths = torch.tensor([T, 7, cap, 13, 5][:B])
    rings = [torch.zeros(B, H, 4, D) if ring and i != 1 else None for i in range(n_layers)]
    ring_pos = torch.randint(0, 4, (B * T,), generator=g) if ring else None
    return layers, final, x, cos, sin, k_stores, v_stores, lengths, rings, ring_pos


def _prepare(layers, final):
    packed = [
        (n_in, cpu_kernel.pack_linear(*qkv), cpu_kernel.pack_linear(*o), post,
         cpu_kernel.pack_linear(*gu), cpu_kernel.pack_linear(*down))
        for n_in, qkv, o, post, gu, down in layers
    ]  # fmt: skip
    return packed, cpu_kernel.prepare_decode_layers(packed, final)


def _targets(k_stores, v_stores, lengths, rings, ring_pos, B):
    return [
        (k[:B], v[:B], lengths, r, None if r is None else ring_pos)
        for k, v, r in zip(k_stores, v_stores, rings, strict=True)
    ]


@pytest.mark.parametrize(
    "B, T, H, KVH, D, bias, ring",
    [(5, 1, 9, 3, 16, False, False), (4, 3, 4, 2, 8, True, True), (1, 1, 2, 2, 24, True, False)],
)
def test_decode_layers_match_pytorch_and_the_kernels_one_by_one(
    B, T, H, KVH, D, bias, ring, f32_kernels
):
    layers, final, x, cos, sin, k_stores, v_stores, lengths, rings, ring_pos = _setup(
        B, T, H, KVH, D, bias, ring, seed=B * 10 + T
    )
    packed, prepared = _prepare(layers, final)
    ref_k = [k.clone() for k in k_stores]
    ref_v = [v.clone() for v in v_stores]
    want_h, want_x = _reference(layers, final, x, cos, sin, ref_k, ref_v, lengths, H, KVH, D, T)

    # The kernels one by one (Decoder.forward_decode_fused's per-layer loop).
    k1 = [k.clone() for k in k_stores]
    v1 = [v.clone() for v in v_stores]
    r1 = [None if r is None else r.clone() for r in rings]
    x1 = x.clone()
    h1 = cpu_kernel.add_rms_norm(x1, None, packed[0][0], EPS)
    for i, (_, qkv, o, post, gu, down) in enumerate(packed):
        att = cpu_kernel.rope_append_attend(
            cpu_kernel.linear(h1, qkv), cos, sin, k1[i][:B], v1[i][:B], lengths, H, D**-0.5,
            r1[i], None if r1[i] is None else ring_pos, T,
        )  # fmt: skip
        h1 = cpu_kernel.add_rms_norm(x1, cpu_kernel.linear(att, o), post, EPS)
        act = cpu_kernel.silu_mul(cpu_kernel.linear(h1, gu))
        norm = packed[i + 1][0] if i + 1 < len(packed) else final
        h1 = cpu_kernel.add_rms_norm(x1, cpu_kernel.linear(act, down), norm, EPS)

    x2 = x.clone()
    targets = _targets(k_stores, v_stores, lengths, rings, ring_pos, B)
    h2 = cpu_kernel.decode_layers(x2, cos, sin, prepared, targets, H, EPS, D**-0.5, T)

    assert torch.equal(h2, h1) and torch.equal(x2, x1)
    for i in range(len(layers)):
        assert torch.equal(k_stores[i], k1[i]) and torch.equal(v_stores[i], v1[i])
        if rings[i] is not None:
            assert torch.equal(rings[i], r1[i]) and rings[i].abs().sum() > 0
    assert (h2 - want_h).abs().max() <= 2e-5 * want_h.abs().max()
    assert (x2 - want_x).abs().max() <= 2e-5 * want_x.abs().max()
    for i in range(len(layers)):
        for got, ref in ((k_stores[i], ref_k[i]), (v_stores[i], ref_v[i])):
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_decode_layers_reject_bad_arguments(f32_kernels):
    B, T, H, KVH, D = 3, 1, 4, 2, 8
    layers, final, x, cos, sin, k_stores, v_stores, lengths, rings, ring_pos = _setup(
        B, T, H, KVH, D, False, False, seed=1
    )
    packed, prepared = _prepare(layers, final)
    targets = _targets(k_stores, v_stores, lengths, rings, ring_pos, B)
    # A length past layer 1's capacity: the layer is named, nothing is written.
    short = list(targets)
    k, v = targets[1][0][:, :, :6], targets[1][1][:, :, :6]
    short[1] = (k, v, lengths, None, None)
    before = [s.clone() for s in k_stores]
    with pytest.raises(ValueError, match=r"layer 1: lengths must be in \[1, 6\]"):
        cpu_kernel.decode_layers(x.clone(), cos, sin, prepared, short, H, EPS, D**-0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, k_stores, strict=True))
    with pytest.raises(ValueError, match="do not fit the layers"):
        cpu_kernel.decode_layers(x.clone(), cos, sin, prepared, targets, 2 * H, EPS, D**-0.5)
    with pytest.raises(ValueError, match="2 cache targets for 3 layers"):
        cpu_kernel.decode_layers(x.clone(), cos, sin, prepared, targets[:2], H, EPS, D**-0.5)
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        cpu_kernel.decode_layers(x.t().contiguous().t(), cos, sin, prepared, targets, H, EPS, 1.0)
    # Layers of different shapes, or a norm of the wrong width.
    odd = list(packed)
    odd[2] = (*odd[2][:5], cpu_kernel.pack_linear(torch.randn(40, 50)))
    with pytest.raises(ValueError, match=r"layer 2: down is \[40, 50\], expected \[40, 56\]"):
        cpu_kernel.prepare_decode_layers(odd, final)
    with pytest.raises(ValueError, match="layer 2: final norm weight must be"):
        cpu_kernel.prepare_decode_layers(packed, final[:-1])
