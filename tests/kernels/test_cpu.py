"""rlkit.kernels.cpu: the C kernels (AVX-512 BF16) against the PyTorch code they replace,
their argument checks, and the fallbacks when they cannot be built."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from rlkit.kernels import cpu as cpu_kernel
from rlkit.kernels import sparse_decode_attention as sda

from rlkit.models.decoder import RMSNorm, rotate

# Skip only where the machine lacks what the kernels need (no compiler, no AVX-512 BF16, or
# RLKIT_CPU_KERNELS=0); where it has it, a build that fails fails the tests below.
needs_kernel = pytest.mark.skipif(
    cpu_kernel.missing_prerequisite() is not None,
    reason=f"machine lacks a kernel prerequisite: {cpu_kernel.missing_prerequisite()}",
)


@needs_kernel
def test_kernels_build_where_the_machine_has_what_they_need():
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


# (B, H, KVH, D, L, lengths spec, strided)
CASES = {
    "smollm2_g3_d64": (4, 9, 3, 64, 200, "ragged", True),
    "g1_d32_tail": (3, 2, 2, 32, 17, "ragged", False),
    "g4_d128": (2, 8, 2, 128, 77, "ragged", True),
    "g8_d256_full": (2, 8, 1, 256, 40, "full", False),
    "g16_d64_long": (1, 16, 1, 64, 1031, "full", True),
    "zero_and_past_end": (4, 4, 2, 64, 33, "edge", False),
    "int32_lengths": (3, 6, 2, 64, 48, "int32", True),
}


def make(case, seed):
    B, H, KVH, D, L, spec, strided = case
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (2 * torch.randn(*shape, generator=g)).bfloat16()

    if strided:  # views of a [layers, slots, KVH, max_len, D] cache, q every other head
        k = randn(2, B + 1, KVH, L + 5, D)[1, :B, :, :L]
        v = randn(2, B + 1, KVH, L + 5, D)[0, 1:, :, :L]
        q = randn(B, 2 * H, D)[:, ::2]
    else:
        k, v, q = randn(B, KVH, L, D), randn(B, KVH, L, D), randn(B, H, D)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    if spec == "full":
        lengths[:] = L
    if spec == "edge":  # a sequence with nothing, and lengths past L (clamped to L)
        lengths = torch.tensor([0, L + 7, 1, L])
    lengths = lengths.to(torch.int32 if spec == "int32" else torch.int64)
    for b in range(B):  # stale entries past a length must not leak into the output
        k[b, :, int(lengths[b]) :] = 1e4
        v[b, :, int(lengths[b]) :] = -1e4
    return q, k, v, lengths


@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_c_kernel_matches_float32_reference(name):
    q, k, v, lengths = make(CASES[name], seed=len(name))
    assert cpu_kernel.supports(q, k, v)
    D = q.shape[-1]
    got = cpu_kernel.decode_attention(q, k, v, lengths, 1 / math.sqrt(D))
    want = sda.sparse_decode_attention_reference(q, k, v, lengths.clamp(max=k.shape[2]))
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert torch.isfinite(got.float()).all()
    zero = lengths == 0
    assert (got[zero] == 0).all()
    # Both round one float32 result to bf16: at most one bf16 step apart (outputs are O(1)).
    err = (got.float() - want.float()).abs()
    assert err.max() <= 2**-7 * want.float().abs().clamp(min=1).max()
    # ...and mostly identical.
    assert (err == 0).float().mean() > 0.9


@needs_kernel
def test_c_kernel_scale_argument():
    q, k, v, lengths = make(CASES["smollm2_g3_d64"], seed=1)
    got = cpu_kernel.decode_attention(q, k, v, lengths, 0.3)
    want = sda.sparse_decode_attention_reference(q, k, v, lengths, scale=0.3)
    assert (got.float() - want.float()).abs().max() <= 2**-6


@needs_kernel
def test_supports_rejects_what_the_kernel_cannot_take():
    q, k, v, _ = make(CASES["smollm2_g3_d64"], seed=2)
    assert cpu_kernel.supports(q, k, v)
    assert not cpu_kernel.supports(q.float(), k.float(), v.float())  # bf16 only
    q48, k48 = q[..., :48], k[..., :48]
    assert not cpu_kernel.supports(q48, k48, v[..., :48])  # D not a multiple of 32
    assert not cpu_kernel.supports(
        q.transpose(0, 1).contiguous().transpose(0, 1)[..., ::2], k[..., ::2], v[..., ::2]
    )  # stride along D
    q17 = torch.zeros(1, 17, 64, dtype=torch.bfloat16)
    k1 = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    assert not cpu_kernel.supports(q17, k1, k1)  # G = 17 > 16


def _fresh_module(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("RLKIT_KERNEL_CACHE", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return importlib.reload(cpu_kernel)


def test_unbuildable_kernel_falls_back_with_a_reason(monkeypatch, tmp_path):
    try:
        mod = _fresh_module(monkeypatch, tmp_path, CC="/nonexistent/cc")
        assert not mod.available()
        assert "could not build" in (mod.unavailable_reason() or "")
        q, k, v, lengths = make(CASES["smollm2_g3_d64"], seed=3)
        assert not mod.supports(q, k, v)
        # The dispatcher still answers, through the reference.
        got = sda.sparse_decode_attention(q, k, v, lengths)
        want = sda.sparse_decode_attention_reference(q, k, v, lengths)
        assert (got.float() - want.float()).abs().max() <= 2**-5
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    finally:
        monkeypatch.undo()
        importlib.reload(cpu_kernel)


def test_disabled_by_environment(monkeypatch, tmp_path):
    try:
        mod = _fresh_module(monkeypatch, tmp_path, RLKIT_CPU_KERNELS="0")
        assert not mod.available()
        assert mod.unavailable_reason() == "disabled by RLKIT_CPU_KERNELS=0"
    finally:
        monkeypatch.undo()
        importlib.reload(cpu_kernel)


@needs_kernel
def test_builds_into_the_cache_dir_once(monkeypatch, tmp_path):
    try:
        mod = _fresh_module(monkeypatch, tmp_path)
        assert mod.available()
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        mod = importlib.reload(mod)
        assert mod.available()
        assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    finally:
        monkeypatch.undo()
        importlib.reload(cpu_kernel)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's bf16 spacing (0 where equal)."""
    spacing = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp(min=1e-30)
    return (a.float() - b.float()).abs() / spacing


@needs_kernel
@pytest.mark.parametrize("dim, rows", [(576, 32), (72, 5), (2048, 3)])
def test_add_rms_norm_matches_rmsnorm(dim, rows):
    g = torch.Generator().manual_seed(dim)
    base = (3 * torch.randn(rows, 2 * dim, generator=g)).bfloat16()
    x = base[:, :dim]  # a strided view: the residual stream is updated in place
    delta = torch.randn(rows, dim, generator=g).bfloat16()
    norm = RMSNorm(dim, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    want_x = x + delta
    want = norm(want_x)
    got = cpu_kernel.add_rms_norm(x, delta, norm.weight.detach(), 1e-5)
    assert torch.equal(x, want_x)  # the add rounds once to bf16, as PyTorch's
    # Sums of squares in another order: at most one bf16 step, and rarely.
    ulps = _ulps_apart(got, want)
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.98
    # Without delta: a plain RMSNorm; x untouched.
    before = x.clone()
    plain = cpu_kernel.add_rms_norm(x, None, norm.weight.detach(), 1e-5)
    assert torch.equal(x, before) and torch.equal(plain, got)


@needs_kernel
@pytest.mark.parametrize("inter, rows", [(1536, 32), (40, 3)])
def test_silu_mul_matches_pytorch(inter, rows):
    g = torch.Generator().manual_seed(inter)
    gate_up = (4 * torch.randn(rows, 2 * inter, generator=g)).bfloat16()
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturation and zeros
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_kernel.silu_mul(gate_up)
    ulps = _ulps_apart(got, want)
    assert torch.isfinite(got.float()).all()
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99


def _rope(B, D, g):
    pos = torch.randint(0, 4000, (B, 1), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().bfloat16(), emb.sin().bfloat16()


@needs_kernel
@pytest.mark.parametrize(
    "H, KVH, D, ring", [(9, 3, 64, False), (4, 2, 128, True), (2, 2, 32, True)]
)
def test_rope_append_attend_matches_pytorch(H, KVH, D, ring):
    g = torch.Generator().manual_seed(H * D)
    B, cap, W = 5, 40, 4
    qkv = torch.randn(B, (H + 2 * KVH) * D, generator=g).bfloat16()
    cos, sin = _rope(B, D, g)
    k_store = torch.randn(B + 1, KVH, cap, D, generator=g).bfloat16()
    v_store = torch.randn(B + 1, KVH, cap, D, generator=g).bfloat16()
    lengths = torch.tensor([1, 7, 16, 33, cap])
    q_ring = torch.zeros(B, H, W, D, dtype=torch.bfloat16) if ring else None
    ring_pos = torch.tensor([0, 3, 1, 2, 3]) if ring else None
    # PyTorch: split, rotate, write at lengths - 1, attend over lengths.
    q, k, v = qkv.view(B, -1, D).split([H, KVH, KVH], dim=1)
    q_rot = rotate(q[:, :, None], cos[:, None, None], sin[:, None, None])[:, :, 0]
    k_rot = rotate(k[:, :, None], cos[:, None, None], sin[:, None, None])[:, :, 0]
    want_k, want_v = k_store[:B].clone(), v_store[:B].clone()
    rows = torch.arange(B)
    want_k[rows, :, lengths - 1] = k_rot
    want_v[rows, :, lengths - 1] = v
    want = sda.sparse_decode_attention_reference(q_rot, want_k, want_v, lengths).reshape(B, -1)

    got = cpu_kernel.rope_append_attend(
        qkv, cos, sin, k_store[:B], v_store[:B], lengths, H, D**-0.5, q_ring, ring_pos
    )
    assert torch.equal(k_store[:B], want_k)  # RoPE rounds as PyTorch's, entries land in place
    assert torch.equal(v_store[:B], want_v)
    assert _ulps_apart(got, want).max() <= 2
    if ring:
        assert torch.equal(q_ring[rows, :, ring_pos], q_rot)
        assert (q_ring.float().abs().sum((1, 3)) > 0).sum() == B  # only those slots written


@needs_kernel
def test_rope_append_attend_rejects_bad_arguments():
    B, H, KVH, D, cap = 2, 4, 2, 64, 8
    qkv = torch.zeros(B, (H + 2 * KVH) * D, dtype=torch.bfloat16)
    cs = torch.zeros(B, D, dtype=torch.bfloat16)
    k = torch.zeros(B, KVH, cap, D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]"):
        cpu_kernel.rope_append_attend(qkv, cs, cs, k, k.clone(), torch.tensor([0, 3]), H, 0.1)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]"):
        cpu_kernel.rope_append_attend(qkv, cs, cs, k, k.clone(), torch.tensor([9, 3]), H, 0.1)
    with pytest.raises(ValueError, match="shapes: qkv"):
        cpu_kernel.rope_append_attend(
            qkv[:, :-64], cs, cs, k, k.clone(), torch.tensor([1, 1]), H, 0.1
        )
    with pytest.raises(ValueError, match="qkv must be a 2-D bf16"):
        cpu_kernel.rope_append_attend(
            qkv.float(), cs, cs, k, k.clone(), torch.tensor([1, 1]), H, 0.1
        )
    with pytest.raises(ValueError, match="unsupported heads"):
        cpu_kernel.rope_append_attend(qkv, cs, cs, k, k.clone(), torch.tensor([1, 1]), 3, 0.1)


@needs_kernel
@pytest.mark.parametrize("temperature, vocab", [(1.0, 49152), (0.7, 1000), (1.3, 37)])
def test_sample_rows_draws_what_the_pytorch_sampler_draws(monkeypatch, temperature, vocab):
    from rlkit.rollout import sampling

    g = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(64, vocab, generator=g)).bfloat16()
    logits[0, 5] = 40.0  # a near one-hot row
    params = sampling.SamplingParams(temperature=temperature)
    calls = []
    real = cpu_kernel.sample_rows
    monkeypatch.setattr(cpu_kernel, "sample_rows", lambda *a: calls.append(1) or real(*a))
    tokens, logp = sampling.sample(logits, params, torch.Generator().manual_seed(3))
    assert calls, "bf16 temperature sampling on CPU must take the kernel"
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    want_tokens, want_logp = sampling.sample(logits, params, torch.Generator().manual_seed(3))
    # Same uniform per row, same inverse-CDF rule: the same tokens (a boundary case would need
    # a uniform within ~1e-7 of a CDF step) and their log-probs to float32 rounding.
    assert torch.equal(tokens, want_tokens)
    assert (logp - want_logp).abs().max() <= 1e-4
    assert tokens[0] == 5


def test_sampler_keeps_pytorch_for_top_k_top_p_and_float32(monkeypatch):
    from rlkit.rollout import sampling

    monkeypatch.setattr(
        cpu_kernel, "sample_rows", lambda *a: (_ for _ in ()).throw(AssertionError("kernel"))
    )
    logits = torch.randn(4, 50)
    for params, x in [
        (sampling.SamplingParams(temperature=1.0, top_k=5), logits.bfloat16()),
        (sampling.SamplingParams(temperature=1.0, top_p=0.9), logits.bfloat16()),
        (sampling.SamplingParams(temperature=0.0), logits.bfloat16()),
        (sampling.SamplingParams(temperature=1.0), logits),
    ]:
        tokens, _ = sampling.sample(x, params, torch.Generator().manual_seed(0))
        assert tokens.shape == (4,)


def test_missing_prerequisite_names_what_the_machine_lacks(monkeypatch):
    monkeypatch.setenv("RLKIT_CPU_KERNELS", "0")
    assert cpu_kernel.missing_prerequisite() == "disabled by RLKIT_CPU_KERNELS=0"
    monkeypatch.setenv("RLKIT_CPU_KERNELS", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cpu_kernel.missing_prerequisite() == "no C compiler: '/nonexistent/cc' is not on PATH"


# -- KV compression kernels -----------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize(
    "H, KVH, W, D, strided", [(9, 3, 8, 64, True), (4, 4, 1, 32, False), (16, 1, 5, 128, True)]
)
def test_window_scores_match_window_attention(H, KVH, W, D, strided):
    from rlkit.rollout.compression import window_attention

    g = torch.Generator().manual_seed(H + W)
    R, L = 5, 70
    if strided:  # a view of a [slots, KVH, max_len, D] store, queries from a ring transposed
        keys = (2 * torch.randn(R + 2, KVH, L + 9, D, generator=g)).bfloat16()[1 : R + 1, :, :L]
        queries = torch.randn(R, W, H, D, generator=g).bfloat16().transpose(1, 2)
    else:
        keys = (2 * torch.randn(R, KVH, L, D, generator=g)).bfloat16()
        queries = torch.randn(R, H, W, D, generator=g).bfloat16()
    lengths = torch.tensor([L, W, 33, W + 1, 64])  # the shortest a window allows, and full rows
    ref = window_attention(queries, keys, lengths)
    got = cpu_kernel.window_scores(queries, keys, lengths)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert (got[1, :, W:] == 0).all()  # nothing past a row's length
    torch.testing.assert_close(got.sum(-1), torch.ones(R, KVH), atol=1e-5, rtol=0)
    # The policy path picks the kernel only when asked.
    torch.testing.assert_close(window_attention(queries, keys, lengths, kernels=True), got)


@needs_kernel
def test_window_scores_reject_lengths_outside_the_window_and_keys():
    q, k = torch.zeros(2, 4, 3, 32).bfloat16(), torch.zeros(2, 2, 10, 32).bfloat16()
    with pytest.raises(ValueError, match=r"lengths must be in \[3, 10\]"):
        cpu_kernel.window_scores(q, k, torch.tensor([2, 10]))
    with pytest.raises(ValueError, match=r"lengths must be in \[3, 10\]"):
        cpu_kernel.window_scores(q, k, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernel.window_scores(q.float(), k, torch.tensor([3, 3]))


@needs_kernel
@pytest.mark.parametrize("budget, window", [(12, 3), (40, 1), (64, 8), (9, 8)])
def test_keep_top_matches_the_stable_sort(budget, window):
    from rlkit.rollout.compression import keep_top

    g = torch.Generator().manual_seed(budget)
    R, X, L = 6, 3, 64
    # Coarse scores make many ties (max-pooling makes plateaus); infinities, NaN and -0.0.
    scores = (torch.randn(R, X, L, generator=g) * 4).round() / 4
    scores[0, 0, :] = 0.0
    scores[0, 1, ::2] = -0.0
    scores[1, 0, 5:9] = math.inf
    scores[1, 1, 3] = -math.inf
    scores[2, 2, 10] = math.nan
    lengths = torch.tensor([L, budget + 1, 50, L, budget + 3, 40]).clamp(max=L)
    ref = keep_top(scores, lengths, budget, window)
    got = cpu_kernel.keep_top(scores, lengths, budget, window)
    assert torch.equal(got, ref)
    # One row of scores shared by all sequences (a stride-0 expand, as the streaming policy's).
    shared = torch.arange(L, dtype=torch.float32).expand(R, 1, L)
    assert torch.equal(
        cpu_kernel.keep_top(shared, lengths, budget, window),
        keep_top(shared, lengths, budget, window),
    )


@needs_kernel
def test_keep_top_rejects_a_budget_over_the_entries():
    with pytest.raises(ValueError, match=r"budget must be in \[1, 8\]"):
        cpu_kernel.keep_top(torch.zeros(1, 1, 8), torch.tensor([8]), 9, 2)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.keep_top(torch.zeros(1, 1, 8, dtype=torch.float64), torch.tensor([8]), 4, 2)


@needs_kernel
@pytest.mark.parametrize("dtype, entry", [(torch.bfloat16, (64,)), (torch.float32, ())])
def test_compact_rows_matches_gather(dtype, entry):
    from rlkit.rollout.compression import keep_top

    g = torch.Generator().manual_seed(1)
    S, heads, L, budget = 7, 3, 40, 17
    store = torch.randn(S, heads, L + 4, *entry, generator=g).to(dtype)[:, :, :L]
    before = store.clone()
    rows = torch.tensor([5, 0, 3])
    for shared in (False, True):
        idx = keep_top(
            torch.randn(3, 1 if shared else heads, L, generator=g), torch.full((3,), L), budget, 4
        )
        store.copy_(before)
        cpu_kernel.compact_rows(store, rows, idx)
        expect = before.clone()
        full = idx.expand(-1, heads, -1)
        gidx = full.reshape(*full.shape, *([1] * len(entry))).expand(-1, -1, -1, *entry)
        expect[rows, :, :budget] = before[rows].gather(2, gidx)
        assert torch.equal(store, expect)  # other slots and entries past the budget untouched


@needs_kernel
def test_compact_rows_rejects_indices_out_of_order_and_moves_nothing():
    store = torch.randn(2, 1, 10, 32).bfloat16()
    before = store.clone()
    for bad in ([0, 2, 2], [3, 1, 5], [0, 1, 10], [-1, 1, 2]):
        with pytest.raises(ValueError, match="strictly ascending"):
            cpu_kernel.compact_rows(store, torch.tensor([1]), torch.tensor([[bad]]))
        assert torch.equal(store, before)
    with pytest.raises(ValueError, match="rows must be in"):
        cpu_kernel.compact_rows(store, torch.tensor([2]), torch.tensor([[[0, 1]]]))


@needs_kernel
@pytest.mark.parametrize("D, threshold", [(64, 0.5), (32, 0.0), (128, -0.2)])
def test_redundancy_matches_pytorch(D, threshold):
    from rlkit.rollout.compression import redundancy

    g = torch.Generator().manual_seed(D)
    R, KVH, L = 6, 2, 45
    keys = torch.randn(R, KVH, L + 3, D, generator=g).bfloat16()[:, :, :L]
    keys[0, 0, 7] = keys[0, 0, 2]  # a duplicate: similarity 1 with each other
    keys[1, 1, 4] = 0  # a zero key (normalised by eps: similarity 0)
    lengths = torch.tensor([L, 17, 1, 0, 30, L])
    ref = redundancy(keys, lengths, threshold)
    got = cpu_kernel.redundancy(keys, lengths, threshold)
    valid = (torch.arange(L) < lengths[:, None])[:, None].expand_as(ref)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-6, rtol=1e-5)
    assert (got[~valid] == 0).all()
    assert got[0, 0, 2] >= 1 / (L - 1) - 1e-6  # the duplicate counts fully
    torch.testing.assert_close(redundancy(keys, lengths, threshold, kernels=True), got)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 45\]"):
        cpu_kernel.redundancy(keys, torch.tensor([46, 0, 0, 0, 0, 0]), threshold)
