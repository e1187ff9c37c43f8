"""rlkit.kernels.cpu: the C kernels (bf16: AVX-512 BF16; float32: AVX2 + FMA) against the
PyTorch code they replace, their argument checks, the choice of build by instruction set, and
the fallbacks when they cannot be built. Tests taking `kernel_dtype` (tests/conftest.py) run
once per build and skip only where this machine lacks what that build needs."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from rlkit.kernels import cpu as cpu_kernel
from rlkit.kernels import sparse_decode_attention as sda

from rlkit.models.decoder import RMSNorm, rotate


def test_kernels_build_where_the_machine_has_what_they_need(kernel_dtype):
    assert cpu_kernel.available(kernel_dtype), cpu_kernel.unavailable_reason(kernel_dtype)


def _close(got: torch.Tensor, want: torch.Tensor, bf16_steps: float, rtol: float = 2e-5) -> None:
    """bf16 outputs within `bf16_steps` bf16 spacings of the reference; float32 ones within
    float32 rounding (summation order, fused multiply-adds) of it."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16:
        spacing = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp(min=1e-30)
        assert ((got.float() - want.float()).abs() / spacing).max() <= bf16_steps
    else:
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)


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


def make(case, seed, dtype=torch.bfloat16):
    B, H, KVH, D, L, spec, strided = case
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (2 * torch.randn(*shape, generator=g)).to(dtype)

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


@pytest.mark.parametrize("name", list(CASES))
def test_c_kernel_matches_float32_reference(name, kernel_dtype):
    q, k, v, lengths = make(CASES[name], seed=len(name), dtype=kernel_dtype)
    assert cpu_kernel.supports(q, k, v)
    D = q.shape[-1]
    got = cpu_kernel.decode_attention(q, k, v, lengths, 1 / math.sqrt(D))
    want = sda.sparse_decode_attention_reference(q, k, v, lengths.clamp(max=k.shape[2]))
    assert got.dtype == kernel_dtype and got.shape == q.shape
    assert torch.isfinite(got.float()).all()
    zero = lengths == 0
    assert (got[zero] == 0).all()
    err = (got.float() - want.float()).abs()
    if kernel_dtype == torch.bfloat16:
        # Both round one float32 result to bf16: at most one bf16 step apart (outputs are
        # O(1)), and mostly identical.
        assert err.max() <= 2**-7 * want.float().abs().clamp(min=1).max()
        assert (err == 0).float().mean() > 0.9
    else:  # float32 throughout: summation order only
        assert err.max() <= 1e-5 * want.abs().clamp(min=1).max()


def test_c_kernel_scale_argument(kernel_dtype):
    q, k, v, lengths = make(CASES["smollm2_g3_d64"], seed=1, dtype=kernel_dtype)
    got = cpu_kernel.decode_attention(q, k, v, lengths, 0.3)
    want = sda.sparse_decode_attention_reference(q, k, v, lengths, scale=0.3)
    # float32: summation order only (1.2e-5 seen on a Xeon, whose OpenMP splits differ).
    tol = 2**-6 if kernel_dtype == torch.bfloat16 else 3e-5
    assert (got.float() - want.float()).abs().max() <= tol


def test_supports_rejects_what_the_kernel_cannot_take(kernel_dtype):
    q, k, v, _ = make(CASES["smollm2_g3_d64"], seed=2, dtype=kernel_dtype)
    assert cpu_kernel.supports(q, k, v)
    assert not cpu_kernel.supports(q.double(), k.double(), v.double())  # no float64 build
    assert not cpu_kernel.supports(q, k.half(), v)  # one dtype for all
    odd = 48 if kernel_dtype == torch.bfloat16 else 60  # not a multiple of 32 (bf16) / 8 (f32)
    assert not cpu_kernel.supports(q[..., :odd], k[..., :odd], v[..., :odd])
    assert not cpu_kernel.supports(
        q.transpose(0, 1).contiguous().transpose(0, 1)[..., ::2], k[..., ::2], v[..., ::2]
    )  # stride along D
    q17 = torch.zeros(1, 17, 64, dtype=kernel_dtype)
    k1 = torch.zeros(1, 1, 4, 64, dtype=kernel_dtype)
    assert not cpu_kernel.supports(q17, k1, k1)  # G = 17 > 16


def _fresh_module(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("RLKIT_KERNEL_CACHE", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return importlib.reload(cpu_kernel)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """fresh(**env): the kernel module reloaded under `env` with an empty build cache; the
    real module state comes back after the test."""
    try:
        yield lambda **env: _fresh_module(monkeypatch, tmp_path, **env)
    finally:
        monkeypatch.undo()
        importlib.reload(cpu_kernel)


def test_unbuildable_kernel_falls_back_with_a_reason(fresh, tmp_path):
    mod = fresh(CC="/nonexistent/cc")
    for dtype in (torch.bfloat16, torch.float32):
        assert not mod.available(dtype)
        assert "no C compiler" in (mod.unavailable_reason(dtype) or "")
        q, k, v, lengths = make(CASES["smollm2_g3_d64"], seed=3, dtype=dtype)
        assert not mod.supports(q, k, v)
        # The dispatcher still answers, through the reference.
        got = sda.sparse_decode_attention(q, k, v, lengths)
        want = sda.sparse_decode_attention_reference(q, k, v, lengths)
        assert (got.float() - want.float()).abs().max() <= 2**-5
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_a_failing_build_says_why(fresh, tmp_path, kernel_dtype):
    """A compiler that runs but fails: the reason names the build and the compiler's output."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'error: no such instruction' >&2\nexit 1\n")
    cc.chmod(0o755)
    mod = fresh(CC=str(cc))
    assert not mod.available(kernel_dtype)
    why = mod.unavailable_reason(kernel_dtype) or ""
    assert "could not build" in why and "no such instruction" in why
    assert mod.missing_prerequisite(kernel_dtype) is None  # a broken build, not the machine


def test_disabled_by_environment(fresh):
    mod = fresh(RLKIT_CPU_KERNELS="0")
    for dtype in (torch.bfloat16, torch.float32):
        assert not mod.available(dtype)
        assert mod.unavailable_reason(dtype) == "disabled by RLKIT_CPU_KERNELS=0"
    assert mod.describe().startswith("PyTorch ops")


def test_builds_into_the_cache_dir_once(fresh, tmp_path, kernel_dtype):
    mod = fresh()
    assert mod.available(kernel_dtype)
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    mod = importlib.reload(mod)
    assert mod.available(kernel_dtype)
    assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_no_kernels_for_other_dtypes():
    assert not cpu_kernel.available(torch.float16)
    assert cpu_kernel.unavailable_reason(torch.float16) == "no CPU kernels for torch.float16"
    with pytest.raises(ValueError, match="no CPU kernel for torch.float16"):
        cpu_kernel.silu_mul(torch.zeros(2, 8, dtype=torch.float16))


# -- instruction sets ----------------------------------------------------------------------

AVX512_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16".split()
AVX2_FLAGS = "fpu sse2 avx avx2 fma f16c".split()


@pytest.mark.parametrize(
    "flags, want",
    [(AVX512_FLAGS, "avx512_bf16"), (AVX2_FLAGS, "avx2"), (["fpu", "sse2", "avx"], "generic")],
    ids=["avx512_bf16", "avx2", "sse_only"],
)
def test_machine_isa_reads_the_cpu_flags(fresh, monkeypatch, flags, want):
    mod = fresh()
    monkeypatch.setattr(mod, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(mod.platform, "machine", lambda: "x86_64")
    assert mod.machine_isa() == want
    monkeypatch.setattr(mod.platform, "machine", lambda: "aarch64")
    assert mod.machine_isa() == "generic"  # an ARM CPU runs the PyTorch references


@pytest.mark.parametrize("forced", ["avx2", "generic"])
def test_RLKIT_CPU_ISA_lowers_the_instruction_set(fresh, forced):
    mod = fresh(RLKIT_CPU_ISA=forced)
    have = mod.machine_isa()
    assert mod.isa() == min(forced, have, key=mod.ISAS.index)
    # The bf16 (AVX-512) build is left out under either setting, whatever the machine.
    assert not mod.available(torch.bfloat16)
    if have == "avx512_bf16":
        assert mod.missing_prerequisite(torch.bfloat16) == (
            f"RLKIT_CPU_ISA={forced} leaves out the avx512_bf16 kernels"
        )
    if forced == "generic" and have != "generic":
        assert not mod.available(torch.float32)
        assert "RLKIT_CPU_ISA=generic" in (mod.missing_prerequisite(torch.float32) or "")
        assert mod.describe().startswith("PyTorch ops")


def test_RLKIT_CPU_ISA_cannot_raise_the_instruction_set(fresh):
    mod = fresh(RLKIT_CPU_ISA="avx512_bf16")
    assert mod.isa() == mod.machine_isa()


def test_RLKIT_CPU_ISA_rejects_an_unknown_name(fresh):
    mod = fresh(RLKIT_CPU_ISA="avx1024")
    with pytest.raises(ValueError, match=r"RLKIT_CPU_ISA='avx1024': expected one of generic, avx2"):
        mod.isa()


# -- row-wise ops --------------------------------------------------------------------------


@pytest.mark.parametrize("dim, rows", [(576, 32), (72, 5), (2048, 3), (13, 4)])
def test_add_rms_norm_matches_rmsnorm(dim, rows, kernel_dtype):
    if kernel_dtype == torch.bfloat16 and dim % 16:
        pytest.skip("bf16 rows here are multiples of 16 (dim 13 is a float32 tail case)")
    g = torch.Generator().manual_seed(dim)
    base = (3 * torch.randn(rows, 2 * dim, generator=g)).to(kernel_dtype)
    x = base[:, :dim]  # a strided view: the residual stream is updated in place
    delta = torch.randn(rows, dim, generator=g).to(kernel_dtype)
    norm = RMSNorm(dim, 1e-5).to(kernel_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    want_x = x + delta
    want = norm(want_x)
    got = cpu_kernel.add_rms_norm(x, delta, norm.weight.detach(), 1e-5)
    assert torch.equal(x, want_x)  # the add rounds once, as PyTorch's
    # Sums of squares in another order: at most one bf16 step, and rarely.
    _close(got, want, bf16_steps=1)
    if kernel_dtype == torch.bfloat16:
        assert (_ulps_apart(got, want) == 0).float().mean() > 0.98
    # Without delta: a plain RMSNorm; x untouched.
    before = x.clone()
    plain = cpu_kernel.add_rms_norm(x, None, norm.weight.detach(), 1e-5)
    assert torch.equal(x, before) and torch.equal(plain, got)


@pytest.mark.parametrize("inter, rows", [(1536, 32), (40, 3), (13, 2)])
def test_silu_mul_matches_pytorch(inter, rows, kernel_dtype):
    g = torch.Generator().manual_seed(inter)
    gate_up = (4 * torch.randn(rows, 2 * inter, generator=g)).to(kernel_dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturation and zeros
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_kernel.silu_mul(gate_up)
    assert torch.isfinite(got.float()).all()
    _close(got, want, bf16_steps=1, rtol=1e-5)
    if kernel_dtype == torch.bfloat16:
        assert (_ulps_apart(got, want) == 0).float().mean() > 0.99


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's bf16 spacing (0 where equal)."""
    spacing = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp(min=1e-30)
    return (a.float() - b.float()).abs() / spacing


def _rope(B, D, g, dtype):
    pos = torch.randint(0, 4000, (B, 1), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize(
    "H, KVH, D, ring", [(9, 3, 64, False), (4, 2, 128, True), (2, 2, 32, True), (6, 3, 24, False)]
)
def test_rope_append_attend_matches_pytorch(H, KVH, D, ring, kernel_dtype):
    if not cpu_kernel.supports_heads(H, KVH, D, kernel_dtype):
        pytest.skip(f"head_dim {D} is a float32 case (bf16 takes multiples of 32)")
    g = torch.Generator().manual_seed(H * D)
    B, cap, W = 5, 40, 4
    qkv = torch.randn(B, (H + 2 * KVH) * D, generator=g).to(kernel_dtype)
    cos, sin = _rope(B, D, g, kernel_dtype)
    k_store = torch.randn(B + 1, KVH, cap, D, generator=g).to(kernel_dtype)
    v_store = torch.randn(B + 1, KVH, cap, D, generator=g).to(kernel_dtype)
    lengths = torch.tensor([1, 7, 16, 33, cap])
    q_ring = torch.zeros(B, H, W, D, dtype=kernel_dtype) if ring else None
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
    assert torch.equal(v_store[:B], want_v)  # entries land in place
    if kernel_dtype == torch.bfloat16:
        assert torch.equal(k_store[:B], want_k)  # RoPE rounds as PyTorch's
    else:
        _close(k_store[:B], want_k, bf16_steps=0, rtol=1e-6)
    _close(got, want, bf16_steps=2, rtol=1e-5)
    if ring:
        _close(q_ring[rows, :, ring_pos], q_rot, bf16_steps=0, rtol=1e-6)
        assert (q_ring.float().abs().sum((1, 3)) > 0).sum() == B  # only those slots written


@pytest.mark.parametrize("H, KVH, D, ring", [(9, 3, 64, True), (4, 2, 32, False)])
def test_rope_append_attend_takes_several_tokens_per_sequence(H, KVH, D, ring, kernel_dtype):
    """A verify step's T tokens per sequence: token t's k/v land at lengths - T + t and its
    query attends to the entries up to its own (causal among the new tokens)."""
    if not cpu_kernel.supports_heads(H, KVH, D, kernel_dtype):
        pytest.skip(f"head_dim {D} is a float32 case (bf16 takes multiples of 32)")
    g = torch.Generator().manual_seed(7 * H + D)
    B, T, cap, W = 3, 4, 24, 9
    qkv = torch.randn(B * T, (H + 2 * KVH) * D, generator=g).to(kernel_dtype)
    cos, sin = _rope(B * T, D, g, kernel_dtype)
    k_store = torch.randn(B, KVH, cap, D, generator=g).to(kernel_dtype)
    v_store = torch.randn(B, KVH, cap, D, generator=g).to(kernel_dtype)
    lengths = torch.tensor([T, 11, cap])
    q_ring = torch.zeros(B, H, W, D, dtype=kernel_dtype) if ring else None
    ring_pos = torch.randint(0, W, (B * T,), generator=g) if ring else None
    q, k, v = qkv.view(B * T, -1, D).split([H, KVH, KVH], dim=1)
    q_rot = rotate(q[:, :, None], cos[:, None, None], sin[:, None, None])[:, :, 0]
    k_rot = rotate(k[:, :, None], cos[:, None, None], sin[:, None, None])[:, :, 0]
    want_k, want_v = k_store.clone(), v_store.clone()
    seq = torch.arange(B).repeat_interleave(T)  # [B * T]
    at = (lengths[:, None] - T + torch.arange(T)).reshape(-1)  # [B * T]
    want_k[seq, :, at] = k_rot
    want_v[seq, :, at] = v
    want = sda.sparse_decode_attention_reference(q_rot, want_k[seq], want_v[seq], at + 1).reshape(
        B * T, -1
    )

    got = cpu_kernel.rope_append_attend(
        qkv, cos, sin, k_store, v_store, lengths, H, D**-0.5, q_ring, ring_pos, T
    )
    assert torch.equal(v_store, want_v)
    _close(k_store, want_k, bf16_steps=0, rtol=1e-6)
    _close(got, want, bf16_steps=2, rtol=1e-5)
    if ring:
        # A later token of the same sequence may reuse a ring slot: the last write wins.
        for r in range(B * T):
            later = [j for j in range(r + 1, (r // T + 1) * T) if ring_pos[j] == ring_pos[r]]
            if not later:
                _close(q_ring[r // T, :, ring_pos[r]], q_rot[r], bf16_steps=0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"lengths must be in \[4, 24\]"):
        cpu_kernel.rope_append_attend(
            qkv, cos, sin, k_store, v_store, torch.tensor([3, 11, 24]), H, 0.1, None, None, T
        )


def test_rope_append_attend_rejects_bad_arguments(kernel_dtype):
    B, H, KVH, D, cap = 2, 4, 2, 64, 8
    qkv = torch.zeros(B, (H + 2 * KVH) * D, dtype=kernel_dtype)
    cs = torch.zeros(B, D, dtype=kernel_dtype)
    k = torch.zeros(B, KVH, cap, D, dtype=kernel_dtype)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]"):
        cpu_kernel.rope_append_attend(qkv, cs, cs, k, k.clone(), torch.tensor([0, 3]), H, 0.1)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]"):
        cpu_kernel.rope_append_attend(qkv, cs, cs, k, k.clone(), torch.tensor([9, 3]), H, 0.1)
    with pytest.raises(ValueError, match="shapes: qkv"):
        cpu_kernel.rope_append_attend(
            qkv[:, :-64], cs, cs, k, k.clone(), torch.tensor([1, 1]), H, 0.1
        )
    with pytest.raises(ValueError, match="cos must be a 2-D"):
        cpu_kernel.rope_append_attend(
            qkv, cs.double(), cs, k, k.clone(), torch.tensor([1, 1]), H, 0.1
        )
    with pytest.raises(ValueError, match="store must be"):
        cpu_kernel.rope_append_attend(
            qkv, cs, cs, k.double(), k.clone(), torch.tensor([1, 1]), H, 0.1
        )
    with pytest.raises(ValueError, match="unsupported heads"):
        cpu_kernel.rope_append_attend(qkv, cs, cs, k, k.clone(), torch.tensor([1, 1]), 3, 0.1)


@pytest.mark.parametrize("temperature, vocab", [(1.0, 49152), (0.7, 1000), (1.3, 37)])
def test_sample_rows_draws_what_the_pytorch_sampler_draws(
    monkeypatch, temperature, vocab, kernel_dtype
):
    from rlkit.rollout import sampling

    g = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(64, vocab, generator=g)).to(kernel_dtype)
    logits[0, 5] = 40.0  # a near one-hot row
    params = sampling.SamplingParams(temperature=temperature)
    calls = []
    real = cpu_kernel.sample_rows
    monkeypatch.setattr(cpu_kernel, "sample_rows", lambda *a: calls.append(1) or real(*a))
    tokens, logp = sampling.sample(logits, params, torch.Generator().manual_seed(3))
    assert calls, "temperature sampling on CPU must take the kernel"
    monkeypatch.setattr(cpu_kernel, "available", lambda dtype=None: False)
    want_tokens, want_logp = sampling.sample(logits, params, torch.Generator().manual_seed(3))
    # Same uniform per row, same inverse-CDF rule: the same tokens (a boundary case would need
    # a uniform within ~1e-7 of a CDF step) and their log-probs to float32 rounding.
    assert torch.equal(tokens, want_tokens)
    assert (logp - want_logp).abs().max() <= 1e-4
    assert tokens[0] == 5


def test_sampler_keeps_pytorch_for_top_k_top_p_greedy_and_float64(monkeypatch):
    from rlkit.rollout import sampling

    monkeypatch.setattr(
        cpu_kernel, "sample_rows", lambda *a: (_ for _ in ()).throw(AssertionError("kernel"))
    )
    logits = torch.randn(4, 50)
    for params, x in [
        (sampling.SamplingParams(temperature=1.0, top_k=5), logits.bfloat16()),
        (sampling.SamplingParams(temperature=1.0, top_p=0.9), logits),
        (sampling.SamplingParams(temperature=0.0), logits.bfloat16()),
        (sampling.SamplingParams(temperature=1.0), logits.double()),
    ]:
        tokens, _ = sampling.sample(x, params, torch.Generator().manual_seed(0))
        assert tokens.shape == (4,)


def test_missing_prerequisite_names_what_the_machine_lacks(monkeypatch):
    monkeypatch.setenv("RLKIT_CPU_KERNELS", "0")
    assert cpu_kernel.missing_prerequisite(torch.float32) == "disabled by RLKIT_CPU_KERNELS=0"
    monkeypatch.setenv("RLKIT_CPU_KERNELS", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert (
        cpu_kernel.missing_prerequisite(torch.float32)
        == "no C compiler: '/nonexistent/cc' is not on PATH"
    )
    assert cpu_kernel.missing_prerequisite(torch.float64) == "no CPU kernels for torch.float64"


# -- KV compression kernels -----------------------------------------------------------------


@pytest.mark.parametrize(
    "H, KVH, W, D, strided", [(9, 3, 8, 64, True), (4, 4, 1, 32, False), (16, 1, 5, 128, True)]
)
def test_window_scores_match_window_attention(H, KVH, W, D, strided, kernel_dtype):
    from rlkit.rollout.compression import window_attention

    g = torch.Generator().manual_seed(H + W)
    R, L = 5, 70
    if strided:  # a view of a [slots, KVH, max_len, D] store, queries from a ring transposed
        keys = (2 * torch.randn(R + 2, KVH, L + 9, D, generator=g)).to(kernel_dtype)
        keys = keys[1 : R + 1, :, :L]
        queries = torch.randn(R, W, H, D, generator=g).to(kernel_dtype).transpose(1, 2)
    else:
        keys = (2 * torch.randn(R, KVH, L, D, generator=g)).to(kernel_dtype)
        queries = torch.randn(R, H, W, D, generator=g).to(kernel_dtype)
    lengths = torch.tensor([L, W, 33, W + 1, 64])  # the shortest a window allows, and full rows
    ref = window_attention(queries, keys, lengths)
    got = cpu_kernel.window_scores(queries, keys, lengths)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert (got[1, :, W:] == 0).all()  # nothing past a row's length
    torch.testing.assert_close(got.sum(-1), torch.ones(R, KVH), atol=1e-5, rtol=0)
    # The policy path picks the kernel only when asked.
    torch.testing.assert_close(window_attention(queries, keys, lengths, kernels=True), got)


def test_window_scores_reject_lengths_outside_the_window_and_keys(kernel_dtype):
    q = torch.zeros(2, 4, 3, 32, dtype=kernel_dtype)
    k = torch.zeros(2, 2, 10, 32, dtype=kernel_dtype)
    with pytest.raises(ValueError, match=r"lengths must be in \[3, 10\]"):
        cpu_kernel.window_scores(q, k, torch.tensor([2, 10]))
    with pytest.raises(ValueError, match=r"lengths must be in \[3, 10\]"):
        cpu_kernel.window_scores(q, k, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="queries must be"):
        cpu_kernel.window_scores(q.double(), k, torch.tensor([3, 3]))


@pytest.mark.parametrize("budget, window", [(12, 3), (40, 1), (64, 8), (9, 8)])
def test_keep_top_matches_the_stable_sort(budget, window, kernel_dtype):
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


def test_keep_top_rejects_a_budget_over_the_entries(kernel_dtype):
    with pytest.raises(ValueError, match=r"budget must be in \[1, 8\]"):
        cpu_kernel.keep_top(torch.zeros(1, 1, 8), torch.tensor([8]), 9, 2)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.keep_top(torch.zeros(1, 1, 8, dtype=torch.float64), torch.tensor([8]), 4, 2)


@pytest.mark.parametrize("dtype, entry", [(torch.bfloat16, (64,)), (torch.float32, ())])
def test_compact_rows_matches_gather(dtype, entry, kernel_dtype):
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


def test_compact_rows_rejects_indices_out_of_order_and_moves_nothing(kernel_dtype):
    store = torch.randn(2, 1, 10, 32).to(kernel_dtype)
    before = store.clone()
    for bad in ([0, 2, 2], [3, 1, 5], [0, 1, 10], [-1, 1, 2]):
        with pytest.raises(ValueError, match="strictly ascending"):
            cpu_kernel.compact_rows(store, torch.tensor([1]), torch.tensor([[bad]]))
        assert torch.equal(store, before)
    with pytest.raises(ValueError, match="rows must be in"):
        cpu_kernel.compact_rows(store, torch.tensor([2]), torch.tensor([[[0, 1]]]))


@pytest.mark.parametrize("D, threshold", [(64, 0.5), (32, 0.0), (128, -0.2), (24, 0.3)])
def test_redundancy_matches_pytorch(D, threshold, kernel_dtype):
    from rlkit.rollout.compression import redundancy

    if D % 16 and kernel_dtype == torch.bfloat16:
        pytest.skip(f"head_dim {D} is a float32 case (bf16 takes multiples of 16)")
    g = torch.Generator().manual_seed(D)
    R, KVH, L = 6, 2, 45
    keys = torch.randn(R, KVH, L + 3, D, generator=g).to(kernel_dtype)[:, :, :L]
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
