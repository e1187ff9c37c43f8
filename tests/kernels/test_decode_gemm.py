"""rlkit.kernels.decode_gemm: the small-batch linear kernel (with and without bias) and the
gate/up kernel with SiLU * up on its accumulators, against the model's ops, for ragged shapes
(M, N, K not multiples of the tiles) and strided inputs.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs
the compiled kernels.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import decode_gemm as dg

# name: (op, M, N, K, dtype, bias, block_n, block_k)
CASES: dict[str, tuple] = {
    "linear-m5-n70-k96-fp32-bias": ("linear", 5, 70, 96, torch.float32, True, 32, 64),
    "linear-m16-n64-k200-bf16": ("linear", 16, 64, 200, torch.bfloat16, False, 16, 64),
    "linear-m33-n48-k64-bf16-bias": ("linear", 33, 48, 64, torch.bfloat16, True, 32, 32),
    "gate-up-m7-i40-k80-fp32": ("gate_up", 7, 40, 80, torch.float32, False, 16, 32),
    "gate-up-m64-i32-k128-bf16": ("gate_up", 64, 32, 128, torch.bfloat16, False, 32, 64),
}
ATOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def make_inputs(case: tuple, seed: int, device: str = "cpu"):
    op, M, N, K, dtype, bias, _, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 2 * K, generator=g)[:, ::2]  # a strided view
    rows = 2 * N if op == "gate_up" else N
    w = torch.randn(rows, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w), cast(b)


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        x, w, b = make_inputs(case, seed=i, device=device)
        knobs = {"block_n": case[6], "block_k": case[7]}
        try:
            if case[0] == "linear":
                got = dg.decode_linear_triton(x, w, b, **knobs)
                want = dg.decode_linear_reference(
                    x.float(), w.float(), None if b is None else b.float()
                )
            else:
                got = dg.decode_gate_up_silu_triton(x, w, **knobs)
                want = dg.decode_gate_up_silu_reference(x.float(), w.float())
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results[name] = {
            "max_err": (got.float() - want).abs().max().item(),
            "shape_ok": got.shape == want.shape and got.dtype == x.dtype,
        }
    return results


def _check(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["shape_ok"] and res["max_err"] <= ATOL[CASES[name][4]], (name, res)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check(name, interpreted_results[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    for name, res in run_cases("cuda").items():
        _check(name, res)


def test_references_are_the_models_ops():
    x, w, b = make_inputs(CASES["linear-m5-n70-k96-fp32-bias"], 0)
    torch.testing.assert_close(dg.decode_linear_reference(x, w, b), x @ w.T + b)
    x, w, _ = make_inputs(CASES["gate-up-m7-i40-k80-fp32"], 0)
    gate, up = x @ w[:40].T, x @ w[40:].T
    torch.testing.assert_close(
        dg.decode_gate_up_silu_reference(x, w), gate * torch.sigmoid(gate) * up
    )


def test_bad_arguments_name_what_is_wrong():
    x, w, b = make_inputs(CASES["linear-m5-n70-k96-fp32-bias"], 0)
    with pytest.raises(ValueError, match="K mismatch"):
        dg.decode_linear_reference(x[:, :10], w, b)
    with pytest.raises(ValueError, match="bias must be"):
        dg.decode_linear_reference(x, w, b[:3])
    with pytest.raises(ValueError, match="2I rows"):
        dg.decode_gate_up_silu_reference(x, w[:69])
    with pytest.raises(ValueError, match="share a float dtype"):
        dg.decode_linear_reference(x, w.double(), None)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_linear_partials_sum_to_the_product(splits):
    """The split-K partials are the K slices' products (views of x and the weight, strided
    rows included), and they sum to x @ W^T."""
    g = torch.Generator().manual_seed(splits)
    wide = torch.randn(6, 136, generator=g)
    x, w = wide[:, :128], torch.randn(40, 128, generator=g)  # x: rows of stride 136
    p = dg.linear_partials(x, w, splits)
    assert p.shape == (splits, 6, 40)
    c = 128 // splits
    for s in range(splits):
        torch.testing.assert_close(p[s], x[:, s * c : (s + 1) * c] @ w[:, s * c : (s + 1) * c].T)
    torch.testing.assert_close(p.sum(0), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not split"):
        dg.linear_partials(x, w, 3)


def test_split_k_stays_off_where_it_was_not_measured():
    """Off the GPU `split_k` says 0 whatever the shape."""
    x, w = torch.randn(454, 2048), torch.randn(2048, 2048)
    assert dg.split_k(x, w, None) == 0  # a CPU tensor
    assert dg.split_k(x.bfloat16(), w.bfloat16(), None) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_k_on_gpu():
    """The regime on a GPU (2 slices from SPLIT_MIN_ROWS to SPLIT_MAX_ROWS rows; none outside
    it, with a bias, in float32 or with K not in two slices of a multiple of 16), and the
    partials' sum within bf16 rounding of the product at the 1.5B shape's down projection."""
    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(2048, 5632, device=dev, dtype=bf) / 75
    for rows, want in ((1, 0), (64, 0), (383, 0), (384, 2), (454, 2), (512, 2), (513, 0)):
        x = torch.randn(rows, 5632, device=dev, dtype=bf)
        assert dg.split_k(x, w, None) == want, rows
    x = torch.randn(454, 5632, device=dev, dtype=bf)
    assert dg.split_k(x, w, torch.zeros(2048, device=dev, dtype=bf)) == 0
    assert dg.split_k(x.float(), w.float(), None) == 0
    assert dg.split_k(x[:, :48], w[:, :48], None) == 0  # K = 48: slices of 24
    assert dg.split_k(x[:, :96], w[:, :96], None) == 2  # 96 = 2 x 48
    p = dg.linear_partials(x, w, dg.split_k(x, w, None))
    ref = x.float() @ w.float().T
    torch.testing.assert_close(p.float().sum(0), ref, rtol=0.02, atol=0.03)
    p32 = dg.linear_partials(x, w, 2, out_dtype=torch.float32)  # the bench's float32 variant
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.sum(0), ref, rtol=0.01, atol=0.01)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_cases("cpu")))
