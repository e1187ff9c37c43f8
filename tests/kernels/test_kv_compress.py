"""rlkit.kernels.kv_compress: the Triton scoring, selection and compaction kernels against
their PyTorch references.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
in test_sparse_decode_attention.py: the variable must be set before Triton decorates a kernel.
On a CUDA machine the `gpu` tests run the compiled kernels.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import kv_compress as kc

# name: (R, H, KVH, w, D, L, dtype, strided); the kernels run with blocks of 16 entries, so
# L is never a multiple of the block; rows have lengths from w to L (score_inputs).
SCORE_CASES: dict[str, tuple] = {
    "R3-H4-KVH2-w3-D16-L40-fp32": (3, 4, 2, 3, 16, 40, torch.float32, False),
    "R2-H6-KVH2-w8-D32-L70-bf16-strided": (2, 6, 2, 8, 32, 70, torch.bfloat16, True),
    "R4-H2-KVH2-w1-D24-L19-fp32-strided": (4, 2, 2, 1, 24, 19, torch.float32, True),
    "R3-H4-KVH4-w8-D16-L37-bf16-G1": (3, 4, 4, 8, 16, 37, torch.bfloat16, False),
    "R3-H8-KVH2-w16-D32-L53-bf16-G4-strided": (3, 8, 2, 16, 32, 53, torch.bfloat16, True),
    "R2-H4-KVH2-w16-D16-L45-fp16-G2": (2, 4, 2, 16, 16, 45, torch.float16, False),
    # 66 blocks of 16: the per-row combine walks its block statistics in two chunks of 64.
    "R2-H2-KVH1-w8-D16-L1050-bf16-G2": (2, 2, 1, 8, 16, 1050, torch.bfloat16, False),
}
# name: (R, X, L, budget, window, plateaus)
KEEP_CASES: dict[str, tuple] = {
    "R3-X2-L40-b10-w3": (3, 2, 40, 10, 3, False),
    "R2-X1-L150-b70-w8-ties": (2, 1, 150, 70, 8, True),
    "R4-X3-L17-b16-w1-ties": (4, 3, 17, 16, 1, True),
    # Signed scores (negative floats' bit order), all kept but one, and a row of ties only.
    "R3-X2-L64-b63-w2-signed": (3, 2, 64, 63, 2, "signed"),
    "R2-X2-L33-b20-w4-flat": (2, 2, 33, 20, 4, "flat"),
}
# name: (S, KVH, L, D (0: no trailing dim), budget, dtype)
COMPACT_CASES: dict[str, tuple] = {
    "S5-KVH2-L40-D16-b10-bf16": (5, 2, 40, 16, 10, torch.bfloat16),
    "S4-KVH3-L90-D24-b70-fp32": (4, 3, 90, 24, 70, torch.float32),
    "S3-KVH2-L33-acc-b20-fp32": (3, 2, 33, 0, 20, torch.float32),
}

# name: (R, KVH, budget, length, strided): fill plans of budgets that are and are not powers
# of two, one move at most (length = budget + 1), a view of a wider tensor.
PLAN_CASES: dict[str, tuple] = {
    "R3-KVH2-b10-L14": (3, 2, 10, 14, False),
    "R4-KVH3-b64-L90": (4, 3, 64, 90, True),
    "R2-KVH2-b37-L50": (2, 2, 37, 50, False),
    "R3-KVH1-b16-L17": (3, 1, 16, 17, True),
}


def plan_inputs(case: tuple, seed: int, device: str = "cpu"):
    """Kept places in their tokens' order, as a filled row has them (`fill_plan`'s contract),
    and each place's token position: the head's places 0..budget-1 in a random order of
    positions, the places past it newer and in order; m of those kept (m from 0 to all)."""
    R, KVH, budget, length, strided = case
    g = torch.Generator().manual_seed(seed)
    kept = torch.empty(R, KVH, budget, dtype=torch.long)
    pos = torch.empty(R, KVH, length, dtype=torch.long)
    for r in range(R):
        for h in range(KVH):
            order = torch.randperm(budget, generator=g)  # places by position
            pos[r, h, order] = torch.arange(budget)
            pos[r, h, budget:] = torch.arange(budget, length)
            m = [0, min(budget, length - budget), 1][(r + h) % 3] if r < 2 else None
            if m is None:
                m = int(torch.randint(0, min(budget, length - budget) + 1, (1,), generator=g))
            tail = budget + torch.randperm(length - budget, generator=g)[:m].sort().values
            head = order[torch.randperm(budget, generator=g)[: budget - m].sort().values]
            kept[r, h] = torch.cat([head, tail])
    if strided:  # a view: every other column of a wider tensor
        wide = torch.zeros(R, KVH, 2 * budget, dtype=torch.long)
        wide[..., ::2] = kept
        kept = wide[..., ::2]
    return kept.to(device), pos, budget, length


def score_inputs(case: tuple, seed: int, device: str = "cpu"):
    R, H, KVH, w, D, L, dtype, strided = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, H, w, D, generator=g).to(dtype)
    if strided:  # a view of a bigger cache [layers, slots, KVH, max_len, D]
        keys = torch.randn(2, R + 2, KVH, L + 9, D, generator=g).to(dtype)[1, 1 : R + 1, :, :L]
    else:
        keys = torch.randn(R, KVH, L, D, generator=g).to(dtype)
    lengths = torch.randint(w, L + 1, (R,), generator=g)
    lengths[0] = L
    lengths[-1] = w
    return q.to(device), keys.to(device), lengths.to(device)


def keep_inputs(case: tuple, seed: int, device: str = "cpu"):
    R, X, L, budget, window, plateaus = case
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(R, X, L, generator=g)
    if plateaus is True:  # max-pooling makes runs of equal scores: ties go to the earlier entry
        scores = (scores * 4).floor() / 4
    elif plateaus == "signed":
        scores = torch.randn(R, X, L, generator=g) * 1e3
        scores[0, 0, 5] = -0.0
        scores[0, 0, 6] = 0.0
    elif plateaus == "flat":
        scores = torch.full((R, X, L), 0.25)
    lengths = torch.randint(budget + 1, L + 1, (R,), generator=g)
    lengths[0] = L
    return scores.to(device), lengths.to(device), budget, window


def _store_rows_scores(case: tuple, seed: int):
    """A random cache store, the slots compacted (not in order) and random entry scores."""
    S, KVH, L, D, _, dtype = case
    g = torch.Generator().manual_seed(seed)
    shape = (S, KVH, L, D) if D else (S, KVH, L)
    store = torch.randn(*shape, generator=g).to(dtype)
    rows = torch.tensor([S - 1, 0, 2][: S - 1], dtype=torch.int64)
    return store, rows, torch.rand(len(rows), KVH, L, generator=g)


def compact_inputs(case: tuple, seed: int, device: str = "cpu"):
    store, rows, scores = _store_rows_scores(case, seed)
    indices = scores.topk(case[4], dim=-1).indices.sort(dim=-1).values
    return store.to(device), rows.to(device), indices.to(device)


def fill_inputs(case: tuple, seed: int, device: str = "cpu"):
    """A store, rows, and the fill moves of a random kept set of `budget` of each row's first
    L - 3 entries (so some rows' last entries are padding)."""
    _, _, L, _, budget, _ = case
    store, rows, scores = _store_rows_scores(case, seed)
    scores[..., L - 3 :] = -1.0
    chosen = scores.topk(budget, dim=-1).indices  # any order
    src, dst = kc.fill_moves(chosen, budget, L)
    return store.to(device), rows.to(device), src.to(device), dst.to(device), chosen


def run_cases(device: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for i, (name, case) in enumerate(SCORE_CASES.items()):
        q, k, lengths = score_inputs(case, seed=i, device=device)
        try:
            got = kc.window_scores_triton(q, k, lengths, block_n=16)
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        want = kc.window_scores_reference(q, k, lengths)
        results[name] = {
            "max_err": (got - want).abs().max().item(),
            "shape_ok": got.shape == want.shape,
        }
    for i, (name, case) in enumerate(KEEP_CASES.items()):
        scores, lengths, budget, window = keep_inputs(case, seed=i, device=device)
        want = kc.keep_top_reference(scores, lengths, budget, window)
        for select in (True, False):  # the bisection kernel and the rank kernel
            key = name if select else name + "-rank"
            try:
                got = kc.keep_top_triton(
                    scores, lengths, budget, window, block_i=16, block_j=32, block_c=16,
                    select=select,
                )  # fmt: skip
            except Exception as e:
                results[key] = {"error": f"{type(e).__name__}: {e}"}
                continue
            results[key] = {"equal": bool(torch.equal(got, want))}
    for i, (name, case) in enumerate(COMPACT_CASES.items()):
        store, rows, indices = compact_inputs(case, seed=i, device=device)
        want = store.clone()
        kc.compact_rows_reference(want, rows, indices)
        try:
            kc.compact_rows_triton(store, rows, indices, block_p=8)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results[name] = {"equal": bool(torch.equal(store, want))}
    for i, (name, case) in enumerate(COMPACT_CASES.items()):
        store, rows, src, dst, _ = fill_inputs(case, seed=i, device=device)
        want = store.clone()
        kc.fill_rows_reference(want, rows, src, dst)
        try:
            kc.fill_rows_triton(store, rows, src, dst, block_p=4)
        except Exception as e:
            results["fill-" + name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results["fill-" + name] = {"equal": bool(torch.equal(store, want))}
    for i, (name, case) in enumerate(PLAN_CASES.items()):
        kept, _, budget, length = plan_inputs(case, seed=i, device=device)
        want = kc.fill_plan_reference(kept, budget, length)
        try:
            got = kc.fill_plan_triton(kept, budget, length)
        except Exception as e:
            results["plan-" + name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        results["plan-" + name] = {"equal": same}
    return results


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_triton_interpreted_window_scores_match_reference(name, interpreted_results):
    res = interpreted_results[name]
    assert "error" not in res, res.get("error")
    assert res["shape_ok"] and res["max_err"] <= 2e-5, res


@pytest.mark.parametrize(
    "name",
    list(KEEP_CASES)
    + [n + "-rank" for n in KEEP_CASES]
    + list(COMPACT_CASES)
    + ["fill-" + n for n in COMPACT_CASES]
    + ["plan-" + n for n in PLAN_CASES],
)
def test_triton_interpreted_keep_top_and_compaction_match_reference(name, interpreted_results):
    res = interpreted_results[name]
    assert "error" not in res, res.get("error")
    assert res["equal"], f"{name}: differs from the reference"


def test_references_agree_with_naive_loops():
    """keep_top keeps the window and the best others (earlier entry on ties); window_scores
    rows sum to 1 over the visible entries; compact_rows gathers in place."""
    scores, lengths, budget, window = keep_inputs(KEEP_CASES["R2-X1-L150-b70-w8-ties"], seed=4)
    got = kc.keep_top_reference(scores, lengths, budget, window)
    for r in range(scores.shape[0]):
        n = int(lengths[r])
        ranked = sorted(range(n - window), key=lambda i: (-float(scores[r, 0, i]), i))
        want = sorted(ranked[: budget - window] + list(range(n - window, n)))
        assert got[r, 0].tolist() == want
    q, k, lengths = score_inputs(SCORE_CASES["R3-H4-KVH2-w3-D16-L40-fp32"], seed=5)
    s = kc.window_scores_reference(q, k, lengths)
    for r in range(3):
        n = int(lengths[r])
        assert torch.allclose(s[r].sum(-1), torch.ones(2), atol=1e-5)
        assert (s[r, :, n:] == 0).all()
    store, rows, indices = compact_inputs(COMPACT_CASES["S4-KVH3-L90-D24-b70-fp32"], seed=6)
    before = store.clone()
    kc.compact_rows_reference(store, rows, indices)
    for j, slot in enumerate(rows.tolist()):
        for h in range(3):
            assert torch.equal(store[slot, h, :70], before[slot, h, indices[j, h]])
    untouched = [s for s in range(4) if s not in rows.tolist()]
    assert torch.equal(store[untouched], before[untouched])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kc.window_scores(torch.zeros(2, 4, 3), torch.zeros(2, 2, 5, 3), torch.ones(2)), "queries must be"),
        (lambda: kc.window_scores(torch.zeros(2, 3, 1, 4), torch.zeros(2, 2, 5, 4), torch.ones(2)), "multiple of kv heads"),
        (lambda: kc.keep_top(torch.zeros(2, 1, 5), torch.ones(2), 6, 1), "budget <= L"),
        (lambda: kc.compact_rows(torch.zeros(3, 2, 5, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 3, dtype=torch.long)), "indices must be"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fill_moves_put_every_kept_entry_below_the_budget():
    """Against a brute force: after the moves, places 0..budget-1 of each row hold exactly the
    kept entries; only kept entries past the budget move, each into an evicted place below it,
    in order; nothing else is touched."""
    for i, case in enumerate(COMPACT_CASES.values()):
        store, rows, src, dst, chosen = fill_inputs(case, seed=10 + i)
        budget = case[4]
        before = store.clone()
        kc.fill_rows(store, rows, src, dst)
        for r, slot in enumerate(rows.tolist()):
            for h in range(store.shape[1]):
                kept = sorted(chosen[r, h].tolist())
                up = [e for e in kept if e >= budget]
                holes = [p for p in range(budget) if p not in kept]
                n = len(up)
                assert src[r, h, :n].tolist() == up and dst[r, h, :n].tolist() == holes
                assert (src[r, h, n:] == -1).all() and (dst[r, h, n:] == -1).all()
                want = before[slot, h].clone()
                want[holes] = before[slot, h, up]
                assert torch.equal(store[slot, h], want)
                got = {tuple(x.reshape(-1).tolist()) for x in store[slot, h, :budget]}
                assert got == {tuple(x.reshape(-1).tolist()) for x in before[slot, h, kept]}
    with pytest.raises(ValueError, match="chosen must be"):
        kc.fill_moves(torch.zeros(2, 1, 3, dtype=torch.long), 4, 10)
    with pytest.raises(ValueError, match="src must be"):
        kc.fill_rows(
            torch.zeros(3, 2, 5), torch.zeros(2, dtype=torch.long),
            torch.zeros(2, 1, 3, dtype=torch.long), torch.zeros(2, 1, 3, dtype=torch.long),
        )  # fmt: skip


def test_fill_plan_leaves_the_head_in_token_order():
    """After the plan's moves the places `head` names hold the kept tokens in position order:
    the entries' positions, moved with them, read through `head`, are the kept positions
    sorted; and its src, dst are `fill_moves`'."""
    for i, case in enumerate(PLAN_CASES.values()):
        kept, pos, budget, length = plan_inputs(case, seed=20 + i)
        src, dst, head = kc.fill_plan(kept, budget, length)
        want_src, want_dst = kc.fill_moves(kept, budget, length)
        assert torch.equal(src, want_src) and torch.equal(dst, want_dst)
        after = pos.clone()
        kc.fill_rows(after, torch.arange(kept.shape[0]), src, dst)
        for r in range(kept.shape[0]):
            for h in range(kept.shape[1]):
                got = after[r, h, head[r, h]].tolist()
                assert got == sorted(pos[r, h, kept[r, h]].tolist()), (i, r, h)
                assert sorted(head[r, h].tolist()) == list(range(budget))
    with pytest.raises(ValueError, match="kept must be"):
        kc.fill_plan(torch.zeros(2, 1, 3, dtype=torch.long), 4, 10)


# ------------------------------------------------------------------ compiled kernels on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and kc.HAS_TRITON), reason="needs CUDA")
def test_triton_cuda_matches_reference():
    results = run_cases("cuda")
    for name, res in results.items():
        assert "error" not in res, (name, res)
        assert res.get("equal", True) and res.get("max_err", 0.0) <= 2e-5, (name, res)
    # The engine's shapes: 64 rows of 8 kv heads at budget 512 + interval 64 (and + 576),
    # bf16, groups of 2 (the 1.5B model) and 4, windows 8 and 16; SnapKV's selection from
    # the kernel's scores keeps the reference's entries but at near-ties.
    for i, (H, w, L) in enumerate([(16, 8, 576), (16, 8, 1088), (32, 16, 576)]):
        q, k, lengths = score_inputs((64, H, 8, w, 128, L, torch.bfloat16, True), 9 + i, "cuda")
        got = kc.window_scores(q, k, lengths)
        want = kc.window_scores_reference(q, k, lengths)
        assert (got - want).abs().max() <= 2e-5, (H, w, L)
        assert kc.selection_gap(got, want, lengths, 512, w) <= 1e-5, (H, w, L)
    scores, lengths, budget, window = keep_inputs((64, 8, 576, 512, 8, True), 9, "cuda")
    assert torch.equal(
        kc.keep_top(scores, lengths, budget, window),
        kc.keep_top_reference(scores, lengths, budget, window),
    )
    # The fill compaction at the memory wall's shape: 455 rows, 8 kv heads, 512 + 64 entries.
    store, rows, src, dst, _ = fill_inputs((456, 8, 576, 128, 512, torch.bfloat16), 9, "cuda")
    rows = torch.arange(455, device="cuda").flip(0)
    src, dst = kc.fill_moves(
        torch.rand(455, 8, 576, device="cuda").topk(512, dim=-1).indices, 512, 576
    )
    want = store.clone()
    kc.fill_rows_reference(want, rows, src, dst)
    kc.fill_rows(store, rows, src, dst)
    assert torch.equal(store, want)
    kept, _, budget, length = plan_inputs((455, 8, 512, 576, False), 9, "cuda")
    got = kc.fill_plan(kept, budget, length)
    want = kc.fill_plan_reference(kept, budget, length)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_selection_gap_is_zero_for_equal_scores_and_small_for_near_ties():
    scores, lengths, budget, window = keep_inputs(KEEP_CASES["R3-X2-L40-b10-w3"], seed=1)
    assert kc.selection_gap(scores, scores, lengths, budget, window) == 0.0
    # Nudge the weakest kept entry of row 0 just under the strongest dropped one: they swap.
    keep = kc.keep_top_reference(scores, lengths, budget, window)[0, 0]
    free = keep[keep < lengths[0] - window]
    weakest = free[scores[0, 0, free].argmin()]
    dropped = torch.tensor([i for i in range(int(lengths[0]) - window) if i not in keep.tolist()])
    best = dropped[scores[0, 0, dropped].argmax()]
    got = scores.clone()
    got[0, 0, weakest] = scores[0, 0, best] - 1e-7
    gap = kc.selection_gap(got, scores, lengths, budget, window)
    assert 0.0 < gap <= float(scores[0, 0, weakest] - scores[0, 0, best]) + 1e-6


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_cases("cpu")))
