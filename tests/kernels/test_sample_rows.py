"""rlkit.kernels.sample_rows: the reference is the sampler's former path, and the Triton kernel
draws the reference's tokens with its log-probabilities on random rows (bf16 and fp32, several
vocabularies and temperatures, rows with masked tails and near-one-hot rows).

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs the
compiled kernel.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import sample_rows as sr

# name: (N, V, dtype, temperature, block_v)
CASES: dict[str, tuple] = {
    "N37-V1000-fp32-T1": (37, 1000, torch.float32, 1.0, 256),
    "N20-V4099-bf16-T0.7": (20, 4099, torch.bfloat16, 0.7, 1024),
    "N9-V300-fp32-T1.5": (9, 300, torch.float32, 1.5, 128),
    "N16-V49152-bf16-T1": (16, 49152, torch.bfloat16, 1.0, 1024),
}


def make_inputs(case: tuple, seed: int, device: str = "cpu"):
    n, v, dtype, temperature, _ = case
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 4
    logits[0, : v // 3] = float("-inf")  # a masked stretch (top-k style holes)
    logits[1] = -30.0
    logits[1, v // 2] = 30.0  # near one-hot: the draw must land on it
    logits[2, -1] = 25.0  # the last column carries the mass
    u = torch.rand(n, generator=g, dtype=torch.float64)
    u[3] = 0.0  # the first token with any mass
    return logits.to(dtype).to(device), temperature, u.to(device)


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        logits, temperature, u = make_inputs(case, seed=i, device=device)
        try:
            tok, logp = sr.sample_rows_triton(logits, temperature, u, block_v=case[4])
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ref_tok, ref_logp = sr.sample_rows_reference(logits, temperature, u)
        results[name] = {
            "token": tok.tolist(),
            "logp": logp.tolist(),
            "ref_token": ref_tok.tolist(),
            "ref_logp": ref_logp.tolist(),
        }
    return results


def _check_result(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    n, v = CASES[name][:2]
    assert res["token"] == res["ref_token"], name
    torch.testing.assert_close(
        torch.tensor(res["logp"]), torch.tensor(res["ref_logp"]), rtol=1e-5, atol=1e-5
    )
    assert res["token"][0] >= v // 3  # never a masked token
    assert res["token"][1] == v // 2 and res["token"][2] == v - 1
    assert len(set(res["token"])) > n // 2  # the draws spread over the vocabulary


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check_result(name, interpreted_results[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    for name, res in run_cases("cuda").items():
        _check_result(name, res)
    # The dispatcher takes the kernel for CUDA tensors.
    logits, temperature, u = make_inputs(CASES["N37-V1000-fp32-T1"], seed=0, device="cuda")
    tok, _ = sr.sample_rows(logits, temperature, u)
    assert torch.equal(tok, sr.sample_rows_reference(logits, temperature, u)[0])


def test_reference_is_the_samplers_rule_and_follows_the_distribution():
    """The reference is the inverse-CDF rule: with uniforms on a fine grid, each token is drawn
    in proportion to its probability under softmax(logits / T)."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, float("-inf")]])
    temperature = 0.8
    p = torch.softmax(logits / temperature, -1)[0]
    grid = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    tok, logp = sr.sample_rows_reference(logits.expand(len(grid), -1), temperature, grid)
    freq = torch.bincount(tok, minlength=5).double() / len(grid)
    torch.testing.assert_close(freq, p.double(), atol=2e-5, rtol=0)
    torch.testing.assert_close(logp, p.log()[tok])


def test_bad_arguments_name_what_is_wrong():
    x, u = torch.zeros(3, 5), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="logits must be"):
        sr.sample_rows(torch.zeros(5), 1.0, u)
    with pytest.raises(ValueError, match="temperature"):
        sr.sample_rows(x, 0.0, u)
    with pytest.raises(ValueError, match="uniforms must be"):
        sr.sample_rows(x, 1.0, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        sr.sample_rows(x.long(), 1.0, u)


if __name__ == "__main__":
    print(json.dumps(run_cases("cpu")))
