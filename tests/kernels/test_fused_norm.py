"""rlkit.kernels.fused_norm: the Triton kernels (residual add + RMSNorm, SiLU * up) match their
references (the decoder layer's former ops) on rows of the model's widths, bf16 and fp32,
strided rows, widths that are not a power of two, and a split-K GEMM's partial sums as the
residual's addend (2 or 4 partials, summed in float32).

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs the
compiled kernels.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import fused_norm as fn

# name: (N, C, dtype, partials: 0 for a plain addend y [N, C], else y [S, N, C])
CASES: dict[str, tuple] = {
    "N5-C576-fp32": (5, 576, torch.float32, 0),
    "N3-C2048-bf16": (3, 2048, torch.bfloat16, 0),
    "N2-C100-bf16": (2, 100, torch.bfloat16, 0),
    "N4-C576-fp32-S4": (4, 576, torch.float32, 4),
    "N3-C2048-bf16-S2": (3, 2048, torch.bfloat16, 2),
}


def make_inputs(case: tuple, seed: int, device: str = "cpu") -> dict:
    n, c, dtype, parts = case
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, c + 8, generator=g) * 3  # a strided view of wider rows
    y = torch.randn(parts, n, c, generator=g) if parts else torch.randn(n, c, generator=g)
    return {
        "x": wide[:, :c].to(dtype).to(device),
        "y": y.to(dtype).to(device),
        "w": (1 + torch.randn(c, generator=g) / 4).to(dtype).to(device),
        "gate_up": (torch.randn(n, 2 * c, generator=g) * 2).to(dtype).to(device),
    }


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        inp = make_inputs(case, seed=i, device=device)
        x_tri, x_ref = inp["x"].clone(), inp["x"].clone()
        try:
            h_tri = fn.add_rms_norm_triton(x_tri, inp["y"], inp["w"], 1e-5)
            a_tri = fn.silu_mul_triton(inp["gate_up"], block=128)
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        h_ref = fn.add_rms_norm_reference(x_ref, inp["y"], inp["w"], 1e-5)
        a_ref = fn.silu_mul_reference(inp["gate_up"])
        results[name] = {
            k: {"got": got.float().cpu().tolist(), "want": want.float().cpu().tolist()}
            for k, got, want in (("x", x_tri, x_ref), ("h", h_tri, h_ref), ("a", a_tri, a_ref))
        }
    return results


def _check_result(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    tol = 1e-5 if CASES[name][2] == torch.float32 else 2e-2
    for key, pair in res.items():
        got, want = torch.tensor(pair["got"]), torch.tensor(pair["want"])
        if key == "x" and tol < 1e-3 and not CASES[name][3]:  # one rounding either way
            assert torch.equal(got, want), name
        elif key == "x" and tol < 1e-3:  # partials: float32 sums of the same order
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
        elif key == "x":  # one bf16 unit (Triton's interpreter truncates where CUDA rounds)
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0, msg=name)
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check_result(name, interpreted_results[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    for name, res in run_cases("cuda").items():
        _check_result(name, res)


def test_reference_is_the_layers_ops():
    inp = make_inputs(CASES["N3-C2048-bf16"], seed=1)
    x = inp["x"].clone()
    h = fn.add_rms_norm_reference(x, inp["y"], inp["w"], 1e-6)
    s = inp["x"] + inp["y"]
    assert torch.equal(x, s)
    assert torch.equal(h, torch.nn.functional.rms_norm(s, (s.shape[1],), inp["w"], 1e-6))
    gate, up = inp["gate_up"].chunk(2, dim=-1)
    assert torch.equal(fn.silu_mul_reference(inp["gate_up"]), torch.nn.functional.silu(gate) * up)


def test_reference_sums_partials_in_float32():
    """The partials' addend: x + (p0 + p1) in float32, one rounding to x's dtype; not the
    bf16 sum of the partials (which rounds twice), not x + p0 then + p1 in bf16."""
    inp = make_inputs(CASES["N3-C2048-bf16-S2"], seed=2)
    x = inp["x"].clone()
    h = fn.add_rms_norm_reference(x, inp["y"], inp["w"], 1e-6)
    want = (inp["x"].double() + inp["y"].double().sum(0)).to(torch.bfloat16)
    assert torch.equal(x, want)
    twice = (inp["x"] + inp["y"][0]) + inp["y"][1]
    assert not torch.equal(x, twice)  # the case tells the two apart
    assert torch.equal(h, torch.nn.functional.rms_norm(want, (want.shape[1],), inp["w"], 1e-6))


def test_bad_arguments_name_what_is_wrong():
    inp = make_inputs(CASES["N5-C576-fp32"], seed=0)
    with pytest.raises(ValueError, match="add_rms_norm"):
        fn.add_rms_norm(inp["x"], inp["y"][:, :10], inp["w"], 1e-6)
    with pytest.raises(ValueError, match="add_rms_norm"):  # partials of another width
        fn.add_rms_norm(inp["x"], torch.zeros(2, 5, 570), inp["w"], 1e-6)
    with pytest.raises(ValueError, match="even width"):
        fn.silu_mul(inp["gate_up"][:, :7])


if __name__ == "__main__":
    print(json.dumps(run_cases("cpu")))
