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

# name: (N, V, dtype, temperature, chunk)
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
            tok, logp = sr.sample_rows_triton(logits, temperature, u, chunk=case[4])
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
    results["emit"] = run_emit(device)
    results["nucleus-draw"] = run_nucleus_draw(device)
    return results


def run_nucleus_draw(device: str) -> dict:
    """`sampling.draw_with` on CUDA is this kernel on log-probabilities at temperature 1: rows
    whose nucleus left most tokens, and whole chunks, at -inf draw the CPU path's tokens."""
    from rlkit.rollout.sampling import draw_with

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5000, generator=g) * 4
    logits[:, ::3] = float("-inf")
    logits[0, 100:] = float("-inf")  # chunks without mass
    logp = logits.log_softmax(-1)
    u = torch.rand(16, generator=g, dtype=torch.float64)
    try:
        tok, _ = sr.sample_rows_triton(logp.to(device), 1.0, u.to(device), chunk=1024)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"token": tok.tolist(), "ref_token": draw_with(logp, u).tolist()}


def make_emit(n: int, device: str) -> sr.Emit:
    """The engine's emission state: 3n sequences of width 9, rows 0..n-1 running sequences
    3b + 1 at counts b % 5, row 2 already done; stop ids 7 and one token sampled below."""
    return sr.Emit(
        out_tokens=torch.full((3 * n, 9), -1, dtype=torch.long, device=device),
        out_logp=torch.zeros(3 * n, 9, device=device),
        seq=torch.arange(1, 3 * n + 1, 3, device=device),
        count=torch.arange(n, device=device) % 5,
        last=torch.zeros(n + 2, dtype=torch.long, device=device),
        done=torch.arange(n + 2, device=device) == 2,
        stop_ids=torch.tensor([7, 0], device=device),
    )


def run_emit(device: str) -> dict:
    """The kernels with the emit epilogue against the reference's sample + emit ops."""
    logits, temperature, u = make_inputs(CASES["N37-V1000-fp32-T1"], seed=5, device=device)
    logits[4] = -30.0
    logits[4, 0] = 30.0  # row 4 samples a stop id
    got, want = make_emit(37, device), make_emit(37, device)
    try:
        tok, logp = sr.sample_rows_triton(logits, temperature, u, chunk=256, emit=got)
    except Exception as e:  # reported by the parent
        return {"error": f"{type(e).__name__}: {e}"}
    ref_tok, ref_logp = sr.sample_rows_reference(logits, temperature, u)
    sr.emit_reference(want, ref_tok, ref_logp)
    out = {"token": tok.tolist(), "ref_token": ref_tok.tolist()}
    for name in ("out_tokens", "out_logp", "count", "last", "done"):
        out[name] = getattr(got, name).tolist()
        out["ref_" + name] = getattr(want, name).tolist()
    return out


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


def _check_emit(res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["token"] == res["ref_token"]
    for name in ("out_tokens", "count", "last", "done"):
        assert res[name] == res["ref_" + name], name
    torch.testing.assert_close(torch.tensor(res["out_logp"]), torch.tensor(res["ref_out_logp"]))
    # What the epilogue wrote, independently of the reference: sequence 3b + 1 got its token
    # at column b % 5, the stop id sampled by row 4 set its flag, row 2's flag stayed set, and
    # the rows past the batch were left alone.
    for b, t in enumerate(res["token"]):
        assert res["out_tokens"][3 * b + 1][b % 5] == t and res["last"][b] == t
    assert res["token"][4] == 0 and res["done"][4] and res["done"][2]
    assert res["done"][37:] == [False, False] and res["last"][37:] == [0, 0]
    stopped = [i for i, t in enumerate(res["token"]) if t in (7, 0)]  # row 3: u = 0, token 0
    assert [i for i, d in enumerate(res["done"]) if d] == sorted({2, *stopped})


def test_triton_interpreted_draws_the_samplers_nucleus_tokens(interpreted_results):
    res = interpreted_results["nucleus-draw"]
    assert "error" not in res, res.get("error")
    assert res["token"] == res["ref_token"]


def test_triton_interpreted_emit_writes_what_emit_one_writes(interpreted_results):
    _check_emit(interpreted_results["emit"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    results = run_cases("cuda")
    _check_emit(results.pop("emit"))
    nucleus = results.pop("nucleus-draw")
    assert "error" not in nucleus and nucleus["token"] == nucleus["ref_token"]
    for name, res in results.items():
        _check_result(name, res)
    # The sampler's draw on CUDA takes this kernel: the CPU path's tokens at SmolLM2's size.
    from rlkit.rollout.sampling import draw_with

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 49152, generator=g) * 4
    logits[:, ::3] = float("-inf")  # a nucleus' holes
    logp = logits.log_softmax(-1)
    u = torch.rand(32, generator=g, dtype=torch.float64)
    assert torch.equal(draw_with(logp.cuda(), u.cuda()).cpu(), draw_with(logp, u))
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


def test_dispatcher_emits_through_the_reference_on_cpu():
    logits, temperature, u = make_inputs(CASES["N9-V300-fp32-T1.5"], seed=1)
    emit = make_emit(9, "cpu")
    tok, logp = sr.sample_rows(logits, temperature, u, emit=emit)
    assert torch.equal(tok, sr.sample_rows_reference(logits, temperature, u)[0])
    assert [emit.out_tokens[3 * b + 1, b % 5].item() for b in range(9)] == tok.tolist()
    assert emit.count.tolist() == [b % 5 + 1 for b in range(9)]


if __name__ == "__main__":
    print(json.dumps(run_cases("cpu")))
