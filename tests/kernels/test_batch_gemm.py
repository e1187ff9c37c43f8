"""rlkit.kernels.batch_gemm: the large-batch tiled linear kernel (with and without bias) and its
gate/up variant with SiLU * up on the accumulators, against the model's ops, for ragged shapes
(M, N, K not multiples of the tiles, several row and column blocks, a partial group of row
blocks) and strided inputs; and the engine's routing (`batch_gemm_config`).

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs
the compiled kernels.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import batch_gemm as bg

# name: (op, M, N, K, dtype, bias, block_m, block_n, block_k, group_m)
CASES: dict[str, tuple] = {
    "linear-m70-n90-k96-fp32-bias": ("linear", 70, 90, 96, torch.float32, True, 32, 32, 32, 2),
    "linear-m129-n64-k200-bf16": ("linear", 129, 64, 200, torch.bfloat16, False, 64, 32, 64, 8),
    "linear-m50-n150-k64-bf16-bias": ("linear", 50, 150, 64, torch.bfloat16, True, 16, 64, 32, 3),
    "gate-up-m45-i40-k80-fp32": ("gate_up", 45, 40, 80, torch.float32, False, 16, 16, 32, 2),
    "gate-up-m100-i48-k128-bf16": ("gate_up", 100, 48, 128, torch.bfloat16, False, 32, 32, 64, 4),
}
ATOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def make_inputs(case: tuple, seed: int, device: str = "cpu"):
    op, M, N, K, dtype, bias = case[:6]
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
        knobs = dict(zip(("block_m", "block_n", "block_k", "group_m"), case[6:], strict=True))
        try:
            if case[0] == "linear":
                got = bg.batch_linear_triton(x, w, b, **knobs)
                want = bg.batch_linear_reference(
                    x.float(), w.float(), None if b is None else b.float()
                )
            else:
                got = bg.batch_gate_up_silu_triton(x, w, **knobs)
                want = bg.batch_gate_up_silu_reference(x.float(), w.float())
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
    x, w, b = make_inputs(CASES["linear-m70-n90-k96-fp32-bias"], 0)
    torch.testing.assert_close(bg.batch_linear_reference(x, w, b), x @ w.T + b)
    x, w, _ = make_inputs(CASES["gate-up-m45-i40-k80-fp32"], 0)
    gate, up = x @ w[:40].T, x @ w[40:].T
    torch.testing.assert_close(
        bg.batch_gate_up_silu_reference(x, w), gate * torch.sigmoid(gate) * up
    )


def test_bad_arguments_name_what_is_wrong():
    x, w, b = make_inputs(CASES["linear-m70-n90-k96-fp32-bias"], 0)
    with pytest.raises(ValueError, match="need x"):
        bg.batch_linear_reference(x[:, :10], w, b)
    with pytest.raises(ValueError, match="bias must be"):
        bg.batch_linear_reference(x, w, b[:3])
    with pytest.raises(ValueError, match="2I rows"):
        bg.batch_gate_up_silu_triton(x, w[:89])
    with pytest.raises(ValueError, match="block_m must be"):
        bg.batch_linear_triton(x, w, b, block_m=48)


def test_routing_takes_only_measured_regimes(monkeypatch):
    """The engine takes the kernel only for an op, row range and shape the bench measured
    faster (`BATCH_GEMM_KNOBS`), bf16 on CUDA; everything else stays on cuBLAS."""
    x = torch.zeros(455, 64, dtype=torch.bfloat16)
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(bg, "BATCH_GEMM_KNOBS", {("linear", 256, 512, 32, 64): {"block_m": 64}})
    assert bg.batch_gemm_config("linear", x, w) is None  # a CPU tensor
    monkeypatch.setattr(bg, "HAS_TRITON", True)
    cuda_x = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16, "shape": (455, 64)})()
    assert bg.batch_gemm_config("linear", cuda_x, w) == {"block_m": 64}
    assert bg.batch_gemm_config("gate_up", cuda_x, w) is None  # another op
    few = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16, "shape": (64, 64)})()
    assert bg.batch_gemm_config("linear", few, w) is None  # rows outside the range
    assert bg.batch_gemm_config("linear", cuda_x, w[:16]) is None  # another shape
    half = type("T", (), {"is_cuda": True, "dtype": torch.float16, "shape": (455, 64)})()
    assert bg.batch_gemm_config("linear", half, w) is None  # not bf16


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_cases("cpu")))
