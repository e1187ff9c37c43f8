"""rlkit.kernels.sam_device: the device SAM drafter against the host one (`TextMatcher`,
`TextMatchers`) and M against its definition, on random texts appended in random chunks.

The Triton kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script, as
the other kernel tests); on a CUDA machine the `gpu` tests run it compiled, eagerly and
captured in a CUDA graph.
"""

from __future__ import annotations

import json
import random
from functools import partial

import numpy as np
import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import sam_device as sd

from rlkit.rollout.sam import TextMatcher, TextMatchers

K = 5  # the drafts' width
MIN_MATCHES = (0, 1, 2, 4)

# name: (B, L, T, alphabet, block); the reference runs in-process.
CASES: dict[str, tuple] = {
    "B6-L200-T6-a3": (6, 200, 6, 3, 64),
    "B5-L160-T3-a2": (5, 160, 3, 2, 64),
    "B4-L120-T8-a5": (4, 120, 8, 5, 64),
}
# Small, for Triton's interpreter: several blocks a row, a partial last block, one block a row.
INTERPRETED_CASES: dict[str, tuple] = {
    "B3-L40-T3-a3-block16": (3, 40, 3, 3, 16),
    "B3-L32-T4-a2-block16": (3, 32, 4, 2, 16),
    "B2-L24-T5-a4-block32": (2, 24, 5, 4, 32),
}


def make_text(L: int, alphabet: int, rng: random.Random) -> list[int]:
    """L tokens over `alphabet` symbols, with copies of earlier stretches (long matches)."""
    x: list[int] = []
    while len(x) < L:
        if x and rng.random() < 0.4:
            s = rng.randrange(len(x))
            for i in range(rng.randint(1, 20)):
                x.append(x[s + i])  # may overlap what it copies
        else:
            x.append(rng.randrange(alphabet))
    return x[:L]


def brute_M(x: list[int], L: int) -> list[int]:
    """M from its definition: M[o] = the longest m with x[e-o-m+1..e-o] == x[e-m+1..e]."""
    out = np.zeros(L, dtype=np.int64)
    n = len(x)
    r = np.array(x[::-1], dtype=np.int64)  # r[i] = x[e - i]
    for o in range(1, n):
        eq = r[: n - o] == r[o:]
        out[o] = n - o if eq.all() else int(np.argmin(eq))
    return out.tolist()


def new_state(B: int, L: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hist = torch.full((B, L), -7, dtype=torch.int64, device=device)  # scratch: anything
    M = torch.zeros(B, L, dtype=torch.int32, device=device)
    return hist, M, torch.zeros(B, dtype=torch.int64, device=device)


def run_case(case: tuple, seed: int, device: str, impl: str) -> dict:
    """Extend random texts chunk by chunk (per-row counts, 0 included, until every row is full
    and two steps past) and check everything after every step; the first mismatches found."""
    B, L, T, alphabet, block = case
    rng = random.Random(seed)
    texts = [make_text(L, alphabet, rng) for _ in range(B)]
    if impl == "reference":
        extend_fn = sd.extend_reference
    else:
        extend_fn = partial(sd.extend_triton, block=block)
    state = new_state(B, L, device)
    hist, M, hlen = state
    ref = new_state(B, L, device)  # the reference alongside, for the kernel's exact state
    matchers, latest = TextMatchers(), TextMatchers(latest=True)
    for b in range(B):
        matchers.add(b, [])
        latest.add(b, [])
    lengths = [0] * B
    mismatches: list[str] = []
    checks = 0

    def expect(ok: bool, what: str) -> None:
        nonlocal checks
        checks += 1
        if not ok and len(mismatches) < 10:
            mismatches.append(f"step {step}: {what}")

    step = full_steps = 0
    while full_steps < 2:
        if step == 0:  # the prompts: 0, 1 and longer tokens
            nums = [min(b, 1) if b < 2 else rng.randint(2, L // 2) for b in range(B)]
            width = max(nums)
        else:
            nums = [min(rng.randint(0, T), L - lengths[b]) for b in range(B)]
            width = T
        rows = [
            [texts[b][lengths[b] + i] if i < nums[b] else rng.randrange(100) for i in range(width)]
            for b in range(B)
        ]
        tokens = torch.tensor(rows, dtype=torch.int64, device=device)
        num = torch.tensor(nums, dtype=torch.int64, device=device)
        before = (hist.clone(), M.clone())
        extend_fn(hist, M, hlen, tokens, num)
        if impl != "reference":
            sd.extend_reference(*ref, tokens, num)
            expect(all(torch.equal(a, r) for a, r in zip(state, ref)), "state != reference's")
        matchers.extend(list(range(B)), np.array(rows, dtype=np.int64), np.array(nums))
        latest.extend(list(range(B)), np.array(rows, dtype=np.int64), np.array(nums))
        lengths = [lengths[b] + nums[b] for b in range(B)]

        expect(hlen.tolist() == lengths, f"hlen {hlen.tolist()} != {lengths}")
        length, offset = sd.longest_match(M, hlen)
        h, m = hist.tolist(), M.tolist()
        for b in range(B):
            n = lengths[b]
            x = texts[b][:n]
            expect(h[b][:n] == x, f"row {b}: hist != text")
            expect(h[b][n:] == before[0][b, n:].tolist(), f"row {b}: scratch written")
            if nums[b] == 0:
                expect(m[b] == before[1][b].tolist(), f"row {b}: num 0 changed M")
            expect(m[b] == brute_M(x, L), f"row {b}: M != brute force")
            tm = TextMatcher(x)
            expect(int(length[b]) == tm.match, f"row {b}: length {int(length[b])} != {tm.match}")
            if tm.match:
                first_end = tm.sam.first_end[tm.state]
                expect(int(offset[b]) == n - 1 - first_end, f"row {b}: offset != first end's")
                last = sd.longest_match(M[b : b + 1], hlen[b : b + 1], latest=True)[1]
                end = latest.text[b].end
                expect(int(last[0]) == n - 1 - end, f"row {b}: latest offset != last end's")
            for min_match in MIN_MATCHES:
                for room in (0, 1, 3, K, K + 2):
                    want = tm.draft(min(room, K), min_match)
                    got_t, got_n = sd.draft(
                        hist[b : b + 1], M[b : b + 1], hlen[b : b + 1],
                        torch.tensor([room], device=device), min_match, K,
                    )  # fmt: skip
                    got = got_t[0, : int(got_n[0])].tolist()
                    expect(got == want, f"row {b} room {room} min {min_match}: {got} != {want}")
                    expect(not got_t[0, len(want) :].any(), f"row {b}: padding not zeros")
        for min_match in MIN_MATCHES:  # the whole batch, as TextMatchers (room <= K there)
            rooms = [rng.randint(0, K) for _ in range(B)]
            got_t, got_n = sd.draft(hist, M, hlen, torch.tensor(rooms, device=device), min_match, K)
            want_t, want_n = matchers.draft(list(range(B)), np.array(rooms), min_match, K)
            expect(got_t.tolist() == want_t.tolist(), f"batch tokens, min {min_match}")
            expect(got_n.tolist() == want_n.tolist(), f"batch num, min {min_match}")
            room_t = torch.tensor(rooms, device=device)
            got_t, got_n = sd.draft(hist, M, hlen, room_t, min_match, K, latest=True)
            want_t, want_n = latest.draft(list(range(B)), np.array(rooms), min_match, K)
            expect(got_t.tolist() == want_t.tolist(), f"latest batch tokens, min {min_match}")
            expect(got_n.tolist() == want_n.tolist(), f"latest batch num, min {min_match}")
        full_steps += all(n == L for n in lengths)
        step += 1
    return {"mismatches": mismatches, "checks": checks, "steps": step, "full": lengths == [L] * B}


def run_cases(cases: dict[str, tuple], device: str, impl: str) -> dict[str, dict]:
    results = {}
    for i, (name, case) in enumerate(cases.items()):
        try:
            results[name] = run_case(case, seed=i, device=device, impl=impl)
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def _check_result(name: str, res: dict) -> None:
    assert "error" not in res, f"{name}: {res.get('error')}"
    assert res["mismatches"] == [], name
    assert res["full"] and res["checks"] > 100, name


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_triton_interpreted_matches_text_matcher(name, interpreted_results):
    _check_result(name, interpreted_results[name])


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_text_matcher(name):
    seed = 10 + list(CASES).index(name)
    _check_result(name, run_case(CASES[name], seed=seed, device="cpu", impl="reference"))


def state_of(texts: list[list[int]], L: int):
    """A state holding `texts` (one extend of their lengths)."""
    B = len(texts)
    hist, M, hlen = new_state(B, L, "cpu")
    width = max(1, max(map(len, texts)))
    rows = [t + [0] * (width - len(t)) for t in texts]
    sd.extend(hist, M, hlen, torch.tensor(rows), torch.tensor([len(t) for t in texts]))
    return hist, M, hlen


def test_empty_and_one_token_texts_do_not_draft():
    hist, M, hlen = state_of([[], [3]], 6)
    assert M.tolist() == [[0] * 6, [0] * 6]
    assert [t.tolist() for t in sd.longest_match(M, hlen)] == [[0, 0], [0, 0]]
    for min_match in (0, 1):
        tokens, num = sd.draft(hist, M, hlen, torch.tensor([4, 4]), min_match, 4)
        assert num.tolist() == [0, 0] and tokens.tolist() == [[0] * 4] * 2


def test_room_zero_and_room_past_k():
    text = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # l = 6, first occurrence ends at 5: 3, 4, 1, 2
    hist, M, hlen = state_of([text, text], 10)
    tokens, num = sd.draft(hist, M, hlen, torch.tensor([0, 9]), 2, 3)
    assert num.tolist() == [0, 3]
    assert tokens.tolist() == [[0, 0, 0], [3, 4, 1]]
    assert TextMatcher(text).draft(3, 2) == [3, 4, 1] and TextMatcher(text).draft(0, 2) == []


def test_text_without_a_repeat_does_not_draft():
    hist, M, hlen = state_of([list(range(50))], 64)
    assert not M.any()
    for min_match in (0, 1):
        _, num = sd.draft(hist, M, hlen, torch.tensor([5]), min_match, 5)
        assert num.tolist() == [0]


def test_full_rows_draft_to_the_text_end_and_stay_put():
    """hlen = L exactly; a draft truncated at the text's end; num 0 leaves full rows alone."""
    text = [0, 1, 2, 0, 1, 2, 0, 1]  # l = 5, first occurrence ends at 4: 2, 0, 1 follow
    hist, M, hlen = state_of([text, text[:7]], 8)
    sd.extend(hist, M, hlen, torch.tensor([[9, 9], [1, 9]]), torch.tensor([0, 1]))
    assert hlen.tolist() == [8, 8] and hist.tolist() == [text, text]
    assert M[0].tolist() == M[1].tolist() == brute_M(text, 8)
    tokens, num = sd.draft(hist, M, hlen, torch.tensor([5, 2]), 4, 5)
    assert num.tolist() == [3, 2] and tokens.tolist() == [[2, 0, 1, 0, 0], [2, 0, 0, 0, 0]]
    assert TextMatcher(text).draft(5, 4) == [2, 0, 1]
    before = [x.clone() for x in (hist, M, hlen)]
    sd.extend(hist, M, hlen, torch.tensor([[5, 6, 7]] * 2), torch.tensor([0, 0]))
    assert all(torch.equal(a, b) for a, b in zip((hist, M, hlen), before))


def test_no_host_reads_runs_on_meta_tensors():
    """Shapes only: a data-dependent read (.item(), a boolean mask) fails on meta tensors."""
    hist, M, hlen = new_state(3, 16, "meta")
    tokens = torch.empty(3, 4, dtype=torch.int64, device="meta")
    num = torch.empty(3, dtype=torch.int64, device="meta")
    sd.extend_reference(hist, M, hlen, tokens, num)
    out, n = sd.draft(hist, M, hlen, num, 2, 4)
    assert out.shape == (3, 4) and n.shape == (3,)


def test_dispatcher_on_cpu_is_the_reference():
    texts = [make_text(40, 2, random.Random(b)) for b in range(3)]
    a, b = state_of(texts, 48), new_state(3, 48, "cpu")
    sd.extend_reference(*b, torch.tensor(texts), torch.tensor([40] * 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(4, dtype=torch.long), None, None), r"hist must be \[B, L\]"),
        ((torch.zeros(2, 4, dtype=torch.int32), None, None), "hist must be int64"),
        ((None, torch.zeros(2, 4, dtype=torch.int64), None), "M must be int32"),
        ((None, torch.zeros(2, 5, dtype=torch.int32), None), r"M must be \[B, L\]"),
        ((None, None, torch.zeros(3, dtype=torch.int64)), r"hlen must be \[B\]"),
    ],
)
def test_bad_state_raises_value_error(args, match):
    hist, M, hlen = new_state(2, 4, "cpu")
    hist, M, hlen = (a if a is not None else d for a, d in zip(args, (hist, M, hlen)))
    tokens, num = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        sd.extend(hist, M, hlen, tokens, num)
    with pytest.raises(ValueError, match=match):
        sd.draft(hist, M, hlen, num, 1, 2)


def test_bad_extend_and_draft_arguments_raise_value_error():
    state = new_state(2, 4, "cpu")
    with pytest.raises(ValueError, match="tokens must be int64"):
        sd.extend(*state, torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num must be \[B\]"):
        sd.extend(*state, torch.zeros(2, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"room must be \[B\]"):
        sd.draft(*state, torch.zeros(3, dtype=torch.long), 1, 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        sd.draft(*state, torch.zeros(2, dtype=torch.long), -1, 2)


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and sd.HAS_TRITON), reason="needs CUDA and triton"
)


@pytest.mark.gpu
@needs_cuda
def test_triton_on_gpu_matches_text_matcher_and_the_reference():
    for name, res in run_cases({**CASES, **INTERPRETED_CASES}, "cuda", "triton").items():
        _check_result(name, res)
    # Larger: the default block, many blocks a row; state compared with the reference's.
    B, L, T = 16, 3000, 8
    rng = random.Random(7)
    texts = [make_text(L, 4, rng) for _ in range(B)]
    a, r = new_state(B, L, "cuda"), new_state(B, L, "cuda")
    lengths = [0] * B
    while min(lengths) < L:
        nums = [min(rng.randint(0, T if lengths[b] else 500), L - lengths[b]) for b in range(B)]
        width = max(max(nums), 1)
        rows = [texts[b][lengths[b] : lengths[b] + nums[b]] for b in range(B)]
        tokens = torch.tensor([x + [0] * (width - len(x)) for x in rows], device="cuda")
        num = torch.tensor(nums, device="cuda")
        sd.extend_triton(*a, tokens, num)
        sd.extend_reference(*r, tokens, num)
        assert all(torch.equal(x, y) for x, y in zip(a, r))
        lengths = [lengths[b] + nums[b] for b in range(B)]
    assert a[1].tolist() == [brute_M(t, L) for t in texts]


@pytest.mark.gpu
@needs_cuda
def test_extend_and_draft_captured_in_a_cuda_graph_match_eager():
    B, L, T, k, min_match = 8, 512, 4, 4, 2
    rng = random.Random(11)
    texts = [make_text(L, 3, rng) for _ in range(B)]
    lengths = [rng.randint(0, 100) for _ in range(B)]
    prompts = torch.tensor([t[:100] for t in texts], device="cuda")
    eager, graphed = new_state(B, L, "cuda"), new_state(B, L, "cuda")
    for state in (eager, graphed):
        sd.extend(*state, prompts, torch.tensor(lengths, device="cuda"))
    tok_s = torch.zeros(B, T, dtype=torch.int64, device="cuda")
    num_s = torch.zeros(B, dtype=torch.int64, device="cuda")
    room_s = torch.zeros(B, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (the kernel's compile) on a copy
        scratch = [x.clone() for x in graphed]
        sd.extend(*scratch, tok_s, num_s)
        sd.draft(*scratch, room_s, min_match, k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sd.extend(*graphed, tok_s, num_s)
        out_tokens, out_num = sd.draft(*graphed, room_s, min_match, k)
    matchers = TextMatchers()
    for b in range(B):
        matchers.add(b, texts[b][: lengths[b]])
    while min(lengths) < L:
        nums = [min(rng.randint(0, T), L - lengths[b]) for b in range(B)]
        rows = [
            [texts[b][lengths[b] + i] if i < nums[b] else 0 for i in range(T)] for b in range(B)
        ]
        room = [rng.randint(0, k) for _ in range(B)]
        tokens, num = torch.tensor(rows, device="cuda"), torch.tensor(nums, device="cuda")
        room_t = torch.tensor(room, device="cuda")
        tok_s.copy_(tokens)
        num_s.copy_(num)
        room_s.copy_(room_t)
        graph.replay()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sd.extend(*eager, tokens, num)
            want_tokens, want_num = sd.draft(*eager, room_t, min_match, k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.equal(x, y) for x, y in zip(graphed, eager))
        assert torch.equal(out_tokens, want_tokens) and torch.equal(out_num, want_num)
        matchers.extend(list(range(B)), np.array(rows), np.array(nums))
        host_tokens, host_num = matchers.draft(list(range(B)), np.array(room), min_match, k)
        assert out_tokens.tolist() == host_tokens.tolist()
        assert out_num.tolist() == host_num.tolist()
        lengths = [lengths[b] + nums[b] for b in range(B)]


if __name__ == "__main__":
    print(json.dumps(run_cases(INTERPRETED_CASES, "cpu", "triton")))
