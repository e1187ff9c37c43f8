"""rlkit.kernels.cpu's float32 GEMM (`pack_linear`, `linear`; cpu_avx2.c) against F.linear:
the shapes of a decode step and of a prefill, ragged ones (rows not a multiple of the
micro-kernel's 4, columns not a multiple of a panel's 24, K odd and split into uneven blocks),
the layouts x may come in, and the argument checks. Skips only where the float32 build cannot
run (no compiler, no AVX2 + FMA, RLKIT_CPU_ISA or RLKIT_CPU_KERNELS)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rlkit.kernels import cpu as cpu_kernel


@pytest.fixture
def gemm():
    why = cpu_kernel.missing_prerequisite(torch.float32)
    if why is not None:
        pytest.skip(f"machine lacks a kernel prerequisite: {why}")


def _layer(N: int, K: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    return w, b


def _assert_matches(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> None:
    """Within float32 summation-order error of the exact product: the classical bound
    K u (|x| |w|^T + |b|) per element (u = 2^-24) against a float64 reference; and as close
    to it as F.linear's own float32 result is, give or take a few roundings."""
    K = w.shape[1]
    x64, w64 = x.double(), w.double()
    exact = F.linear(x64, w64, None if b is None else b.double())
    scale = F.linear(x64.abs(), w64.abs(), None if b is None else b.double().abs())
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    assert (err <= (K + 1) * 2**-24 * scale + 1e-30).all(), err.max()
    ref_err = (F.linear(x, w, b).double() - exact).abs().max()
    assert err.max() <= 4 * ref_err + 8 * 2**-24 * exact.abs().max()


# (M rows, N out features, K in features, bias): a decode step's GEMMs (SmolLM2's fused
# qkv, o, gate/up, down at batch 1, 5, 32, 64), ragged shapes, and a prefill of 2050 rows.
CASES = {
    "M1-N960-K576": (1, 960, 576, False),
    "M3-N50-K7-bias": (3, 50, 7, True),
    "M5-N576-K576": (5, 576, 576, False),
    "M32-N3072-K576-bias": (32, 3072, 576, True),
    "M32-N576-K1536": (32, 576, 1536, False),
    "M33-N100-K577-bias": (33, 100, 577, True),
    "M64-N960-K576-bias": (64, 960, 576, True),
    "M100-N577-K1537": (100, 577, 1537, False),
    "M2050-N130-K97-bias": (2050, 130, 97, True),
    "M2048-N576-K576": (2048, 576, 576, False),
    "M7-N1-K1-bias": (7, 1, 1, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_linear_matches_f_linear(name, gemm):
    M, N, K, bias = CASES[name]
    w, b = _layer(N, K, bias, seed=M + N + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    packed = cpu_kernel.pack_linear(w, b)
    assert packed.panels.shape == (-(-N // 24), K, 24)
    assert (packed.in_features, packed.out_features) == (K, N)
    _assert_matches(cpu_kernel.linear(x, packed), x, w, b)


def test_packed_panels_hold_the_weight_zero_padded(gemm):
    w, _ = _layer(50, 7, False, seed=0)
    panels = cpu_kernel.pack_linear(w).panels  # [3, 7, 24]
    assert torch.equal(panels[1, :, 5], w[29])
    assert torch.equal(panels.transpose(1, 2).reshape(72, 7)[:50], w)
    assert (panels[2, :, 2:] == 0).all()


def test_x_in_any_layout(gemm):
    """Rows with a stride of their own are read in place; a stride along K, a transposed x,
    rows that are one row repeated (stride 0) and extra leading dims all give F.linear's
    result."""
    w, b = _layer(70, 33, True, seed=2)
    packed = cpu_kernel.pack_linear(w, b)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 50, generator=g)
    layouts = {
        "row_stride": wide[:, 5:38],
        "k_stride": torch.randn(9, 66, generator=g)[:, ::2],
        "transposed": torch.randn(33, 9, generator=g).t(),
        "repeated_row": torch.randn(1, 33, generator=g).expand(9, 33),
        "3d": torch.randn(2, 4, 33, generator=g),
        "1d": torch.randn(33, generator=g),
        "no_rows": torch.randn(0, 33, generator=g),
    }
    for name, x in layouts.items():
        got = cpu_kernel.linear(x, packed)
        assert got.shape == (*x.shape[:-1], 70), name
        want = F.linear(x, w, b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_bias_is_shared_not_copied(gemm):
    """A contiguous bias stays the caller's tensor: updated in place (a weight sync into the
    model's bias parameters), the packed layer adds the new values."""
    w, b = _layer(30, 16, True, seed=4)
    packed = cpu_kernel.pack_linear(w, b)
    x = torch.randn(4, 16)
    before = cpu_kernel.linear(x, packed)
    b.add_(1.0)
    torch.testing.assert_close(cpu_kernel.linear(x, packed), before + 1.0)


def test_linear_rejects_bad_arguments(gemm):
    w, b = _layer(40, 12, True, seed=5)
    packed = cpu_kernel.pack_linear(w, b)
    with pytest.raises(ValueError, match="weight must be a 2-D float32"):
        cpu_kernel.pack_linear(w.double())
    with pytest.raises(ValueError, match="weight must be a 2-D float32"):
        cpu_kernel.pack_linear(w[0])
    with pytest.raises(ValueError, match="weight must not be empty"):
        cpu_kernel.pack_linear(w[:0])
    with pytest.raises(ValueError, match=r"bias must be a float32 CPU tensor \[40\]"):
        cpu_kernel.pack_linear(w, b[:39])
    with pytest.raises(ValueError, match=r"x must be a float32 CPU tensor \[\.\.\., 12\]"):
        cpu_kernel.linear(torch.randn(3, 13), packed)
    with pytest.raises(ValueError, match="x must be a float32"):
        cpu_kernel.linear(torch.randn(3, 12, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="x must be a float32"):
        cpu_kernel.linear(torch.tensor(1.0), packed)
    with pytest.raises(ValueError, match="packed must be a PackedLinear"):
        cpu_kernel.linear(torch.randn(3, 12), w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no backward"):
        cpu_kernel.linear(torch.randn(3, 12, requires_grad=True), packed)
    with torch.no_grad():
        cpu_kernel.linear(torch.randn(3, 12, requires_grad=True), packed)
