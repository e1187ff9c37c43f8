"""rlkit.kernels.sparse_decode_attention: the Triton kernel against the PyTorch reference.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script):
the variable must be set before Triton decorates the kernel, and setting it in this process
would change how every other Triton kernel imported by the same pytest run behaves. On a CUDA
machine the `gpu` tests run the compiled kernel.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import cpu as cpu_kernel
from rlkit.kernels import sparse_decode_attention as sda

# name: (B, H, KVH, D, L, dtype, num_splits, lengths spec, strided views[, T[, chain]])
# lengths spec: "ragged" (random, first = L, last 1), "ragged32" (the same as int32), "full"
# (all == L), "zero" (last row 0). T > 1: q [B, H, T, D], a verify step's T new tokens a row
# (a row of length 1 < T leaves its first T - 1 queries nothing to see: zeros). chain c: the
# T = 1 + C * c tokens are a tree of C draft chains (multi-chain verification).
CASES: dict[str, tuple] = {
    "g1_d64_bf16_ragged": (3, 4, 4, 64, 48, torch.bfloat16, 1, "ragged", False),
    "g3_d64_fp32_ragged_strided": (3, 6, 2, 64, 80, torch.float32, 1, "ragged", True),
    "g4_d32_bf16_split3_strided": (3, 8, 2, 32, 64, torch.bfloat16, 3, "ragged", True),
    "g4_d64_fp32_full_split2": (2, 8, 2, 64, 64, torch.float32, 2, "full", False),
    "g3_d64_bf16_full": (2, 3, 1, 64, 40, torch.bfloat16, 1, "full", True),
    "g4_d32_fp16_zero_split2": (3, 4, 1, 32, 48, torch.float16, 2, "zero", False),
    "g1_d48_fp32_ragged_pad_d": (2, 2, 2, 48, 33, torch.float32, 1, "ragged", False),
    "g3_d32_bf16_int32_lengths": (2, 6, 2, 32, 70, torch.bfloat16, 4, "ragged32", True),
    "t4_g3_d64_bf16_ragged_strided": (3, 6, 2, 64, 80, torch.bfloat16, 1, "ragged", True, 4),
    "t4_g3_d64_fp32_split3": (3, 9, 3, 64, 96, torch.float32, 3, "ragged", False, 4),
    "t2_g4_d32_fp16_zero_split2": (3, 8, 2, 32, 48, torch.float16, 2, "zero", False, 2),
    "t4_g6_d64_fp32_rows24": (2, 12, 2, 64, 70, torch.float32, 1, "ragged", True, 4),
    "tree4x3_g3_d64_bf16_split2": (3, 9, 3, 64, 80, torch.bfloat16, 2, "ragged", True, 13, 3),
    "tree2x2_g4_d32_fp32": (3, 8, 2, 32, 48, torch.float32, 1, "ragged", False, 5, 2),
    "tree3x1_g3_d64_fp32_split3": (2, 6, 2, 64, 70, torch.float32, 3, "zero", True, 4, 1),
}

# Largest |triton - exact reference| allowed, by dtype (outputs are O(1)).
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(case: tuple, seed: int, device: str = "cpu"):
    B, H, KVH, D, L, dtype, _, spec, strided = case[:9]
    T = case[9] if len(case) > 9 else 1
    qshape = (B, H, D) if T == 1 else (B, H, T, D)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    if strided:
        # Views of a bigger cache [layers, slots, KVH, max_len, D], as the engine passes them;
        # q is every other head of a [B, 2H, (T,) D] tensor.
        k_cache = randn(2, B + 2, KVH, L + 24, D)
        v_cache = randn(2, B + 2, KVH, L + 24, D)
        k, v = k_cache[1, :B, :, :L], v_cache[1, 1 : B + 1, :, :L]
        q = randn(B, 2 * H, *qshape[2:])[:, ::2]
        assert not k.is_contiguous() and not q.is_contiguous()
    else:
        k, v, q = randn(B, KVH, L, D), randn(B, KVH, L, D), randn(*qshape)
    if spec == "full":
        lengths = torch.full((B,), L)
    else:
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L
        lengths[-1] = 0 if spec == "zero" else 1
        if len(case) > 10:  # a tree's rows hold the step's T entries (or are empty)
            lengths = torch.where(lengths == 0, 0, lengths.clamp(min=T))
    lengths = lengths.to(torch.int32 if spec == "ragged32" else torch.int64).to(device)
    if strided:  # a column of a wider buffer, as a padded verify step's lengths are
        lengths = torch.stack([lengths, torch.full_like(lengths, L + 7)], dim=1)[:, 0]
        assert lengths.stride(0) == 2
    # Poison the entries past each length (finite: stale cache entries are real numbers, and
    # SDPA's mask does not survive NaN); leaked, they would dominate the output.
    for b in range(B):
        k[b, :, int(lengths[b]) :] = 1e4
        v[b, :, int(lengths[b]) :] = -1e4
    return q, k, v, lengths


def run_cases(device: str) -> dict[str, dict]:
    """Run every case through the kernel; max abs error against the exact reference."""
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        q, k, v, lengths = make_inputs(case, seed=i, device=device)
        try:
            out = sda.sparse_decode_attention_triton(
                q, k, v, lengths, num_splits=case[6], chain=_chain(case)
            )
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ref = sda.sparse_decode_attention_reference(q, k, v, lengths, chain=_chain(case))
        zero_rows = lengths == 0
        results[name] = {
            "max_err": (out.float() - ref.float()).abs().max().item(),
            "finite": bool(torch.isfinite(out.float()).all()),
            "zero_rows_zero": bool((out[zero_rows] == 0).all()),
            "dtype_ok": out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape),
        }
    return results


def _check_result(name: str, res: dict) -> None:
    # The dev extras pin triton 3.9.0; older interpreters (3.6) cannot take loop bounds loaded
    # from memory and fail here rather than skip.
    assert "error" not in res, res.get("error")
    assert res["dtype_ok"]
    assert res["finite"], f"{name}: non-finite output (garbage past a length leaked?)"
    assert res["zero_rows_zero"], f"{name}: a length-0 row is not all zeros"
    assert res["max_err"] <= ATOL[CASES[name][5]], f"{name}: max error {res['max_err']}"


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check_result(name, interpreted_results[name])


def _chain(case: tuple) -> int:
    return case[10] if len(case) > 10 else 0


def _naive(q, k, v, lengths, scale=None, chain=0):
    """Loop per sequence, head and new token, float64 (q [B, H, D] or [B, H, T, D]). chain c:
    token t of the step sees the entries before the step, then the path from the step's first
    token to itself (token 0, then t's chain up to t), listed as a sequence would hold them."""
    one = q.dim() == 3
    q = q[:, :, None] if one else q
    B, H, T, D = q.shape
    G = H // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = int(lengths[b]) - (T - 1 - t)  # token t sees the entries before its own end
            seen = list(range(max(n, 0)))
            if chain and t > 0:
                base = int(lengths[b]) - T
                first = base + 1 + (t - 1) // chain * chain  # t's chain starts here
                seen = list(range(base + 1)) + list(range(first, base + t + 1))
            for h in range(H):
                if n <= 0:
                    continue
                kk = k[b, h // G, seen].double()
                w = torch.softmax(kk @ q[b, h, t].double() * scale, 0)
                out[b, h, t] = w @ v[b, h // G, seen].double()
    return out[:, :, 0] if one else out


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_naive_loop(name):
    q, k, v, lengths = make_inputs(CASES[name], seed=100)
    c = _chain(CASES[name])
    want = _naive(q, k, v, lengths, chain=c)
    exact = sda.sparse_decode_attention_reference(q, k, v, lengths, chain=c)
    fast = sda.sparse_decode_attention_reference(q, k, v, lengths, exact=False, chain=c)
    assert exact.dtype == fast.dtype == q.dtype
    tol = ATOL[q.dtype] / 2 if q.dtype != torch.float32 else 1e-5
    assert (exact.double() - want).abs().max() <= tol
    assert (fast.double() - want).abs().max() <= 2 * tol
    assert torch.isfinite(fast.float()).all()


def test_reference_scale_argument():
    q, k, v, lengths = make_inputs(CASES["g4_d64_fp32_full_split2"], seed=3)
    got = sda.sparse_decode_attention_reference(q, k, v, lengths, scale=0.3)
    assert torch.allclose(got.double(), _naive(q, k, v, lengths, scale=0.3), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c_kernel", [True, False])
def test_dispatcher_on_cpu(monkeypatch, dtype, c_kernel):
    """CPU tensors never reach Triton: bf16 and float32 go to the C kernel of their dtype when
    it is built here and takes the arguments, everything else to the reference in the inputs'
    dtype."""
    case = list(CASES["g3_d64_bf16_full"])
    case[5] = dtype
    q, k, v, lengths = make_inputs(tuple(case), seed=5)
    calls: list[str] = []
    real_ref, real_c = sda.sparse_decode_attention_reference, cpu_kernel.decode_attention

    def spy_ref(*args, **kwargs):
        calls.append("reference")
        return real_ref(*args, **kwargs)

    def spy_c(*args, **kwargs):
        calls.append("c")
        return real_c(*args, **kwargs)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors")

    monkeypatch.setattr(sda, "sparse_decode_attention_reference", spy_ref)
    monkeypatch.setattr(sda, "sparse_decode_attention_triton", no_triton)
    monkeypatch.setattr(cpu_kernel, "decode_attention", spy_c)
    if not c_kernel:
        monkeypatch.setattr(cpu_kernel, "supports", lambda *a: False)
    elif cpu_kernel.missing_prerequisite(dtype):
        pytest.skip(
            f"machine lacks a kernel prerequisite: {cpu_kernel.missing_prerequisite(dtype)}"
        )
    got = sda.sparse_decode_attention(q, k, v, lengths)
    want = "c" if c_kernel else "reference"
    assert calls == [want]
    exact = real_ref(q, k, v, lengths)
    if want == "reference":
        assert torch.equal(got, real_ref(q, k, v, lengths, exact=False))
    assert (got.float() - exact.float()).abs().max() <= ATOL[q.dtype]


def _bad(**change):
    q, k, v, lengths = make_inputs(CASES["g4_d64_fp32_full_split2"], seed=7)  # B=2 H=8 KVH=2
    args = {"q": q, "k": k, "v": v, "lengths": lengths}
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        ({"q": torch.randn(2, 1, 8, 2, 64)}, r"q must be \[B, H, D\] or \[B, H, T, D\]"),
        ({"k": torch.randn(2, 2, 64)}, r"k must be \[B, KVH, L, D\]"),
        ({"v": torch.randn(2, 2, 63, 64)}, "v shape"),
        ({"q": torch.randn(3, 8, 64)}, "batch mismatch"),
        ({"q": torch.randn(2, 8, 32)}, "head_dim mismatch"),
        ({"q": torch.randn(2, 7, 64)}, r"H=7 must be a multiple of kv heads KVH=2"),
        ({"lengths": torch.tensor([1, 2, 3])}, r"lengths must be \[B\]"),
        ({"lengths": torch.tensor([1.0, 2.0])}, "int32 or int64"),
        ({"q": torch.randn(2, 8, 64, dtype=torch.float64)}, "q dtype"),
        ({"q": torch.randn(2, 8, 64, dtype=torch.bfloat16)}, "share a dtype"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [sda.sparse_decode_attention, sda.sparse_decode_attention_reference],
    ids=["dispatch", "ref"],
)
def test_bad_arguments_raise_value_error(fn, change, match):
    with pytest.raises(ValueError, match=match):
        fn(**_bad(**change))


# ------------------------------------------------------------------ compiled kernel on CUDA

GPU_CASES = {
    **CASES,
    "smollm_b64_l1000_bf16": (64, 9, 3, 64, 1000, torch.bfloat16, None, "ragged", True),
    "big_b4_l4096_bf16_autosplit": (4, 32, 8, 128, 4096, torch.bfloat16, None, "ragged", True),
    "big_b4_l4096_fp16_autosplit": (4, 32, 8, 128, 4096, torch.float16, None, "full", False),
    "big_b8_l2048_fp32_split7": (8, 32, 8, 128, 2048, torch.float32, 7, "zero", True),
    "g8_d128_b16_l777_bf16": (16, 64, 8, 128, 777, torch.bfloat16, None, "zero", False),
    # A SmolLM2 verify step: 64 rows of k + 1 = 4 new tokens.
    "verify_smollm_b64_t4_bf16": (64, 9, 3, 64, 1000, torch.bfloat16, None, "ragged", True, 4),
    "verify_b4_t4_l4096_bf16": (4, 32, 8, 128, 4096, torch.bfloat16, None, "ragged", True, 4),
    # Four chains of 3 and of 10 (multi-chain verification: 64 rows, and a tail of 4).
    "tree_smollm_b64_4x3_bf16": (64, 9, 3, 64, 1000, torch.bfloat16, None, "ragged", True, 13, 3),
    "tree_smollm_b4_4x10_bf16": (4, 9, 3, 64, 1600, torch.bfloat16, None, "ragged", True, 41, 10),
}


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and sda.HAS_TRITON), reason="needs CUDA")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_cuda_matches_reference(name):
    case = GPU_CASES[name]
    q, k, v, lengths = make_inputs(case, seed=11, device="cuda")
    c = _chain(case)
    ref = sda.sparse_decode_attention_reference(q, k, v, lengths, chain=c)
    for splits in {case[6], 1, 5}:
        out = sda.sparse_decode_attention_triton(q, k, v, lengths, num_splits=splits, chain=c)
        assert out.dtype == q.dtype
        assert torch.isfinite(out.float()).all()
        assert (out[lengths == 0] == 0).all()
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= ATOL[q.dtype], f"{name} splits={splits}: max error {err}"
    disp = sda.sparse_decode_attention(q, k, v, lengths, chain=c)
    assert torch.equal(disp, sda.sparse_decode_attention_triton(q, k, v, lengths, chain=c))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and sda.HAS_TRITON), reason="needs CUDA")
def test_triton_cuda_offsets_past_2_31():
    """A sequence that starts past element 2**31 of its cache: 32-bit offsets would wrap."""
    B, H, KVH, L, D = 2, 8, 2, 64, 64
    seq = 2**31  # the second sequence's first element
    buf = torch.empty(seq + 3 * KVH * L * D, dtype=torch.bfloat16, device="cuda")
    strides = (seq, L * D, D, 1)
    k = buf.as_strided((B, KVH, L, D), strides, storage_offset=0)
    v = buf.as_strided((B, KVH, L, D), strides, storage_offset=2 * KVH * L * D)
    k.copy_(torch.randn(B, KVH, L, D, device="cuda"))
    v.copy_(torch.randn(B, KVH, L, D, device="cuda"))
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([L, 37], device="cuda")
    ref = sda.sparse_decode_attention_reference(q, k, v, lengths)
    for splits in (1, 3):
        out = sda.sparse_decode_attention_triton(q, k, v, lengths, num_splits=splits)
        assert (out.float() - ref.float()).abs().max().item() <= ATOL[q.dtype]


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_cases("cpu")))
