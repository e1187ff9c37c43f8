"""rlkit.kernels.top_p: the nucleus floor by bisection (Triton) against the sort.

The kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script, as the
other kernel tests); on a CUDA machine the `gpu` test runs it compiled.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import top_p as tp

# name: (N, V, kind, top_p, block)
CASES: dict[str, tuple] = {
    "peaked-V4099-p0.7": (12, 4099, "peaked", 0.7, 1024),
    "flat-V1000-p0.9": (6, 1000, "flat", 0.9, 256),
    "ties-V777-p0.5": (10, 777, "ties", 0.5, 256),
    "topk-masked-V2048-p0.95": (8, 2048, "masked", 0.95, 512),
    "one-token-V300-p0.3": (4, 300, "one", 0.3, 128),
    "negative-V513-p0.8": (5, 513, "negative", 0.8, 128),
    "ulps-V600-p0.6": (6, 600, "ulps", 0.6, 256),
    "wide-V3000-p0.99": (6, 3000, "wide", 0.99, 1024),
}


def make_rows(case: tuple, seed: int, device: str = "cpu") -> torch.Tensor:
    N, V, kind, _, _ = case
    g = torch.Generator().manual_seed(seed)
    if kind == "peaked":  # a language model's: a few likely tokens, a long tail
        x = torch.randn(N, V, generator=g) * 4
    elif kind == "flat":  # a wide nucleus: most of the row
        x = torch.randn(N, V, generator=g) * 0.05
        x[0] = 1.5  # every token tied
    elif kind == "ties":  # few distinct values: tie groups straddle the nucleus' edge
        x = torch.randint(0, 4, (N, V), generator=g).float() * 0.9
    elif kind == "masked":  # top-k applied first: -inf outside 40 tokens
        x = torch.randn(N, V, generator=g) * 2
        keep = torch.rand(N, V, generator=g).argsort(dim=1)[:, :40]
        x = torch.full_like(x, float("-inf")).scatter(1, keep, x.gather(1, keep))
    elif kind == "one":  # one finite token a row
        x = torch.full((N, V), float("-inf"))
        x[torch.arange(N), torch.randint(0, V, (N,), generator=g)] = 3.0
    elif kind == "ulps":  # adjacent floats: the value search ends on its bracket's width
        x = 1.0 + torch.randint(0, 6, (N, V), generator=g).float() * 2.0**-23
    elif kind == "wide":  # logits over a range far wider than the value search's start span
        x = torch.randn(N, V, generator=g) * 25
    else:  # all negative, far from zero
        x = torch.randn(N, V, generator=g) * 3 - 50
    return x.to(device)


# The two searches: over logit values (the GPU path's) and over float32 keys.
SEARCHES = tp.SEARCHES


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for i, (case_name, case) in enumerate(CASES.items()):
        for search in SEARCHES:
            name = f"{case_name}-{search}"
            x = make_rows(case, seed=i, device=device)
            try:
                got = tp.top_p_floor_triton(x, case[3], block=case[4], search=search)
            except Exception as e:  # reported per case by the parent
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            want = tp.top_p_floor_reference(x, case[3])
            kept = (x >= got).sum(dim=1)
            results[name] = {
                "got": got[:, 0].tolist(),
                "want": want[:, 0].tolist(),
                "kept_min": int(kept.min()),
                "shape_ok": tuple(got.shape) == (x.shape[0], 1),
            }
        # Rows not needed: -inf, the needed ones as before (every other row, the first kept).
        x = make_rows(case, seed=i, device=device)
        need = torch.arange(x.shape[0], device=device) % 2 == 0
        got = tp.top_p_floor_triton(x, case[3], need, block=case[4])
        want = tp.top_p_floor_reference(x, case[3], need)
        results[f"{case_name}-need"] = {
            "got": got[:, 0].tolist(),
            "want": want[:, 0].tolist(),
            "kept_min": int((x >= got)[need].sum(dim=1).min()),
            "shape_ok": tuple(got.shape) == (x.shape[0], 1),
        }
    return results


def _check_result(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["shape_ok"]
    assert res["got"] == res["want"], name
    assert res["kept_min"] >= 1


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [f"{c}-{s}" for c in CASES for s in [*SEARCHES, "need"]])
def test_triton_interpreted_matches_the_sort(name, interpreted_results):
    _check_result(name, interpreted_results[name])


def test_rows_not_needed_keep_every_token():
    x = make_rows(CASES["peaked-V4099-p0.7"], seed=4)
    need = torch.tensor([True, False] * 6)
    got = tp.top_p_floor(x, 0.7, need)
    assert torch.equal(got[need], tp.top_p_floor_reference(x, 0.7)[need])
    assert bool((got[~need] == float("-inf")).all())
    with pytest.raises(ValueError, match="need must be a bool"):
        tp.top_p_floor(x, 0.7, need.long())


def test_reference_keeps_the_nucleus_and_its_ties():
    """By hand: probabilities 0.4, 0.2, 0.2, 0.1, 0.1 at top_p 0.5 keep 0.4 and both 0.2s
    (the mass before the first 0.2 is 0.4 < 0.5; its tie comes with it); at 0.4 only the
    first token (the mass before a 0.2 is already 0.4)."""
    x = torch.tensor([[0.4, 0.2, 0.1, 0.2, 0.1]]).log()
    assert (x >= tp.top_p_floor_reference(x, 0.5)).tolist() == [[True, True, False, True, False]]
    assert (x >= tp.top_p_floor_reference(x, 0.4)).tolist() == [[True, False, False, False, False]]


def test_dispatcher_on_cpu_is_the_sort():
    x = make_rows(CASES["peaked-V4099-p0.7"], seed=3)
    assert torch.equal(tp.top_p_floor(x, 0.7), tp.top_p_floor_reference(x, 0.7))


@pytest.mark.parametrize(
    "x, top_p, match",
    [
        (torch.zeros(3), 0.5, r"\[N, V\]"),
        (torch.zeros(2, 3, dtype=torch.float64), 0.5, "float32"),
        (torch.zeros(3, 2).t(), 0.5, "unit column stride"),
        (torch.zeros(2, 3), 1.0, r"top_p must be in \(0, 1\)"),
    ],
)
def test_bad_arguments_raise_value_error(x, top_p, match):
    with pytest.raises(ValueError, match=match):
        tp.top_p_floor(x, top_p)


def test_search_must_be_known():
    # Checked before anything needs triton.
    with pytest.raises(ValueError, match="search must be one of"):
        tp.top_p_floor_triton(torch.zeros(2, 3), 0.5, search="sort")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and tp.HAS_TRITON), reason="needs CUDA")
def test_triton_on_gpu_matches_the_sort():
    results = run_cases("cuda")
    for name, res in results.items():
        _check_result(name, res)
    # SmolLM2's vocabulary, a verify step's rows.
    x = make_rows((256, 49152, "peaked", 0.7, 2048), seed=9, device="cuda")
    want = tp.top_p_floor_reference(x, 0.7)
    assert torch.equal(tp.top_p_floor(x, 0.7), want)
    for search in SEARCHES:
        assert torch.equal(tp.top_p_floor_triton(x, 0.7, search=search), want), search
    need = torch.rand(256, device="cuda") < 0.3
    assert torch.equal(tp.top_p_floor(x, 0.7, need), tp.top_p_floor_reference(x, 0.7, need))


if __name__ == "__main__":
    print(json.dumps(run_cases("cpu")))
