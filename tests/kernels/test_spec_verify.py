"""rlkit.kernels.spec_verify: the verification rule against hand-computed cases, and the
Triton kernel against the PyTorch reference on random batches.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs
the compiled kernel.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import spec_verify as sv

# name: (B, k, V, with q, greedy, block_v)
CASES: dict[str, tuple] = {
    "B33-k3-V1000-q": (33, 3, 1000, True, False, 256),
    "B33-k3-V1000-onehot": (33, 3, 1000, False, False, 256),
    "B17-k5-V4099-q": (17, 5, 4099, True, False, 1024),
    "B9-k1-V300-q": (9, 1, 300, True, False, 128),
    "B20-k4-V700-greedy": (20, 4, 700, False, True, 256),
    "B8-k0-V300": (8, 0, 300, False, False, 128),
}


# One program a row, and the vocabulary split over 4 programs a row (greedy: one always).
CHUNKS = (1, 4)


def make_inputs(case: tuple, seed: int, device: str = "cpu"):
    B, k, V, with_q, greedy, _ = case
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, k + 1, V, generator=g) * 3
    # Top-k style holes: tokens the processed distribution never draws.
    logits[:, :, : V // 10] = float("-inf")
    target = logits.softmax(-1)
    q = (torch.randn(B, max(k, 1), V, generator=g) * 3).softmax(-1)[:, :k]
    drafts = (
        torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, k)
        if k
        else q.new_zeros(B, 0, dtype=torch.long)
    )
    if k:
        # Some drafts the target likes (accepted often), some it forbids (never accepted).
        drafts[::3, 0] = target[::3, 0].argmax(-1)
        drafts[1::4, -1] = 0
    num = torch.randint(0, k + 1, (B,), generator=g)
    num[0] = k
    u = torch.rand(B, k + 1, generator=g, dtype=torch.float64)
    args = [
        target.log() if greedy else target,
        drafts,
        num,
        q if with_q else None,
        None if greedy else u,
        greedy,
    ]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


# name: (B, C, k, V, greedy, block_v): `verify_chains_triton` against the reference.
CHAIN_CASES: dict[str, tuple] = {
    "chains-B24-C4-k3-V700": (24, 4, 3, 700, False, 256),
    "chains-B16-C2-k5-V1000": (16, 2, 5, 1000, False, 512),
    "chains-B9-C3-k1-V300": (9, 3, 1, 300, False, 128),
    "chains-B20-C4-k3-V700-greedy": (20, 4, 3, 700, True, 256),
}


def make_chain_inputs(case: tuple, seed: int, device: str = "cpu"):
    """A tree per row whose chains often hold its nodes' likely tokens (and share first
    drafts), so that paths move along chains, stop inside them and run to the bonus token."""
    B, C, k, V, greedy, _ = case
    g = torch.Generator().manual_seed(seed)
    T = 1 + C * k
    logits = torch.randn(B, T, V, generator=g) * 3
    logits[:, :, : V // 10] = float("-inf")  # holes the distribution never draws
    target = logits.log_softmax(-1)
    best = target.argmax(-1)  # [B, T]
    chains = torch.randint(V // 10, V, (B, C, k), generator=g)
    for c in range(C):
        for i in range(k):
            node = 0 if i == 0 else 1 + c * k + i - 1
            likely = torch.rand(B, generator=g) < 0.7
            chains[:, c, i] = torch.where(likely, best[:, node], chains[:, c, i])
    chains[1::3, -1, 0] = chains[1::3, 0, 0]  # the last chain shares the first's first draft
    num = torch.randint(0, k + 1, (B, C), generator=g)
    num[0] = k
    u = torch.rand(B, k + 1, generator=g, dtype=torch.float64)
    args = [target, chains, num, None if greedy else u, greedy]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _chain_result(out) -> dict:
    acc, tokens, node, logp = out
    upto = torch.arange(tokens.shape[1], device=acc.device) <= acc[:, None]
    return {
        "accepted": acc.tolist(),
        "tokens": torch.where(upto, tokens, -1).tolist(),
        "node": torch.where(upto, node, -1).tolist(),
        "logp": torch.where(upto, logp, 0.0).tolist(),
    }


EMPTY_RESIDUAL_U = (1 - 1e-16, 1 - 1e-9, 0.9999)


def _empty_residual_inputs(u0: float, device: str = "cpu"):
    """Candidates holding all of p's mass (0.3 and 0.7, whose float32 logs sum to just under
    1 in float64) and a uniform just under 1."""
    p = torch.full((3, 6), float("-inf"))
    p[0, 1], p[0, 2] = torch.tensor(0.3).log(), torch.tensor(0.7).log()
    p[1:, 0] = 0.0
    chains, num = torch.tensor([[[1], [2]]]), torch.tensor([[1, 1]])
    u = torch.tensor([[u0, 0.5]], dtype=torch.float64)
    return [a.to(device) for a in (p[None], chains, num, u)]


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for j, u0 in enumerate(EMPTY_RESIDUAL_U):
        args = _empty_residual_inputs(u0, device)
        try:
            got = sv.verify_chains_triton(*args, block_v=16)
        except Exception as e:
            results[f"chains-empty-residual-{j}"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results[f"chains-empty-residual-{j}"] = {
            "got": _chain_result(got),
            "ref": _chain_result(sv.verify_chains_reference(*args)),
        }
    for i, (name, case) in enumerate(CHAIN_CASES.items()):
        args = make_chain_inputs(case, seed=i, device=device)
        try:
            got = sv.verify_chains_triton(*args, block_v=case[5])
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results[name] = {
            "got": _chain_result(got),
            "ref": _chain_result(sv.verify_chains_reference(*args)),
        }
    for i, (case_name, case) in enumerate(CASES.items()):
        for chunks in CHUNKS:
            name = f"{case_name}-chunks{chunks}"
            args = make_inputs(case, seed=i, device=device)
            try:
                acc, tok = sv.verify_drafts_triton(*args, block_v=case[5], chunks=chunks)
            except Exception as e:  # reported per case by the parent
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            ref_acc, ref_tok = sv.verify_drafts_reference(*args)
            results[name] = {
                "accepted": acc.tolist(),
                "token": tok.tolist(),
                "ref_accepted": ref_acc.tolist(),
                "ref_token": ref_tok.tolist(),
            }
    return results


def _check_result(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["accepted"] == res["ref_accepted"], name
    assert res["token"] == res["ref_token"], name
    # The cases exercise what they should: some rows accept drafts, some reject.
    case = CASES[name.rsplit("-chunks", 1)[0]]
    if case[1]:
        assert 0 < sum(res["accepted"]) < case[0] * case[1], name


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [f"{c}-chunks{n}" for c in CASES for n in CHUNKS])
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check_result(name, interpreted_results[name])


def _check_chain_result(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    got, ref = res["got"], res["ref"]
    assert got["accepted"] == ref["accepted"], name
    assert got["tokens"] == ref["tokens"] and got["node"] == ref["node"], name
    assert torch.allclose(torch.tensor(got["logp"]), torch.tensor(ref["logp"])), name
    # The cases exercise what they should: paths that stop at once, move, and reach the bonus.
    acc = ref["accepted"]
    B, C, k = CHAIN_CASES[name][:3]
    assert 0 in acc and any(0 < a for a in acc), (name, acc)
    assert any(n >= 1 + k for row, a in zip(ref["node"], acc) for n in row[1 : a + 1]), name


@pytest.mark.parametrize("name", list(CHAIN_CASES))
def test_chains_triton_interpreted_matches_reference(name, interpreted_results):
    _check_chain_result(name, interpreted_results[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    for name, res in run_cases("cuda").items():
        if name.startswith("chains-empty-residual"):
            # The candidates' sum sits within an ulp of u here, and the compiled kernel's exp
            # (ex2.approx) may round it to the other side of u than torch's does: both outcomes
            # are the rule's (the draw passes candidate 2, whose chain goes on; or it stops
            # there and, the residual being empty, emits candidate 2 as the final token). What
            # must hold: never a draw from the empty residual.
            got = res["got"]
            assert got["tokens"][0][0] == 2, (name, got)
            if got["accepted"] == [1]:
                assert got == res["ref"], name
            else:
                assert got["accepted"] == [0] and got["node"] == [[0, -1]], (name, got)
            assert all(math.isfinite(x) for x in got["logp"][0]), (name, got)
        else:
            (_check_chain_result if name in CHAIN_CASES else _check_result)(name, res)
    # The dispatcher takes the kernel for CUDA tensors.
    args = make_inputs(CASES["B33-k3-V1000-q"], seed=0, device="cuda")
    acc, tok = sv.verify_drafts(*args)
    ref_acc, ref_tok = sv.verify_drafts_reference(*args)
    assert torch.equal(acc, ref_acc) and torch.equal(tok, ref_tok)
    # SmolLM2's vocabulary at a verify step's rows: 16 chunks a row (the default there).
    for with_q in (False, True):
        args = make_inputs((16, 3, 49152, with_q, False, 1024), seed=5, device="cuda")
        acc, tok = sv.verify_drafts(*args)
        ref_acc, ref_tok = sv.verify_drafts_reference(*args)
        assert torch.equal(acc, ref_acc) and torch.equal(tok, ref_tok), with_q
    # The dispatcher takes the chain kernel for a CUDA tree.
    name = "chains-B24-C4-k3-V700"
    args = make_chain_inputs(CHAIN_CASES[name], seed=0, device="cuda")
    got = {
        "got": _chain_result(sv.verify_chains(*args)),
        "ref": _chain_result(sv.verify_chains_reference(*args)),
    }
    _check_chain_result(name, got)


P = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
Q = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])


@pytest.mark.parametrize(
    "u, accepted, token",
    [
        # Draft 1 (token 0): p/q = 0.5/0.25 = 2, always kept. Draft 2 (token 0): p/q =
        # 0.1/0.4; u = 0.3 fails it; residual max(0, p1 - q2) = [0, 0, .1, .3]: u = 0.2 of
        # its mass (0.08) falls in token 2's share (0, 0.1].
        ([0.9, 0.3, 0.2], 1, 2),
        # u = 0.9 of the residual's mass (0.36) falls in token 3's (0.1, 0.4].
        ([0.9, 0.3, 0.9], 1, 3),
        # u = 0.2 < 0.25 keeps draft 2 too; the bonus token from p2 (uniform): 0.6 -> token 2.
        ([0.9, 0.2, 0.6], 2, 2),
    ],
)
def test_rule_by_hand_with_draft_probabilities(u, accepted, token):
    acc, tok = sv.verify_drafts_reference(
        P[None], torch.tensor([[0, 0]]), torch.tensor([2]), Q[None], torch.tensor([u])
    )
    assert (int(acc), int(tok)) == (accepted, token)


def test_rule_by_hand_with_deterministic_drafts():
    p = torch.tensor([[[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]]])
    drafts, num = torch.tensor([[1]]), torch.tensor([1])
    # Accepted with probability p(1) = 0.5: u = 0.6 rejects; the residual is p without token
    # 1, [0.2, 0, 0.3]: u = 0.5 of its mass (0.25) falls in token 2's share (0.2, 0.5].
    acc, tok = sv.verify_drafts_reference(p, drafts, num, None, torch.tensor([[0.6, 0.5]]))
    assert (int(acc), int(tok)) == (0, 2)
    # u = 0.3 of the residual's mass (0.15) is token 0's.
    acc, tok = sv.verify_drafts_reference(p, drafts, num, None, torch.tensor([[0.6, 0.3]]))
    assert (int(acc), int(tok)) == (0, 0)
    # u = 0.4 keeps the draft; the bonus comes from the next row (all on token 2).
    acc, tok = sv.verify_drafts_reference(p, drafts, num, None, torch.tensor([[0.4, 0.0]]))
    assert (int(acc), int(tok)) == (1, 2)
    # No draft for this row: the token is drawn from p at the first position.
    acc, tok = sv.verify_drafts_reference(
        p, drafts, torch.tensor([0]), None, torch.tensor([[0.0, 0.9]])
    )
    assert (int(acc), int(tok)) == (0, 2)


def test_rule_by_hand_greedy():
    scores = torch.tensor([[[0.1, 0.9, 0.0], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]]]).log()
    # Draft 1 is row 0's argmax (1), draft 2 is not row 1's (0): one kept, then token 0.
    acc, tok = sv.verify_drafts_reference(
        scores, torch.tensor([[1, 2]]), torch.tensor([2]), greedy=True
    )
    assert (int(acc), int(tok)) == (1, 0)
    acc, tok = sv.verify_drafts_reference(
        scores, torch.tensor([[1, 0]]), torch.tensor([2]), greedy=True
    )
    assert (int(acc), int(tok)) == (2, 2)  # both kept, the bonus is row 2's argmax


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c[4]])
def test_log_targets_give_the_rule_on_their_exponentials(name):
    """`log=True` (what the rollout engine passes: log-probabilities, exponentiated only where
    the rule reads them) decides as the rule on the probabilities does, seed for seed."""
    differs = 0
    for seed in range(5):
        target, drafts, num, q, u, greedy = make_inputs(CASES[name], seed)
        logp = target.log()
        want = sv.verify_drafts(logp.exp(), drafts, num, q, u, greedy)
        got = sv.verify_drafts(logp, drafts, num, q, u, greedy, log=True)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), (name, seed)
        # Probabilities read as logarithms decide otherwise: the flag is read.
        wrong = sv.verify_drafts_reference(target, drafts, num, q, u, greedy, log=True)
        differs += any(not torch.equal(a, b) for a, b in zip(wrong, want, strict=True))
    assert differs


def test_a_token_the_target_forbids_is_never_accepted():
    p = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    q = torch.tensor([[[1.0, 0.0]]])
    for u in (0.0, 0.5, 0.999):
        acc, tok = sv.verify_drafts_reference(
            p, torch.tensor([[0]]), torch.tensor([1]), q, torch.tensor([[u, 0.5]])
        )
        assert (int(acc), int(tok)) == (0, 1)


def test_bad_arguments_name_what_is_wrong():
    p = torch.rand(2, 3, 5)
    d = torch.zeros(2, 2, dtype=torch.long)
    n = torch.zeros(2, dtype=torch.long)
    u = torch.rand(2, 3)
    with pytest.raises(ValueError, match="target must be"):
        sv.verify_drafts(p[0], d, n, None, u)
    with pytest.raises(ValueError, match="draft_tokens must be"):
        sv.verify_drafts(p, d[:, :1], n, None, u)
    with pytest.raises(ValueError, match="draft_probs must be"):
        sv.verify_drafts(p, d, n, torch.rand(2, 3, 5), u)
    with pytest.raises(ValueError, match="uniforms must be"):
        sv.verify_drafts(p, d, n, None, None)
    with pytest.raises(ValueError, match="int64"):
        sv.verify_drafts(p, d.int(), n, None, u)


# ------------------------------------------------------------------ several chains a row


def _tree_inputs(B: int, seed: int = 0):
    """A tree of 3 chains of 2 over a vocabulary of 6: chain 0 = (1, 2), chain 1 = (1, 3)
    (the same first draft: its first node's distribution is chain 0's), chain 2 = (4, 0) with
    one real draft. Positions: 0 the root, 1 + c * 2 + i chain c's draft i."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(7, 6, generator=g) * 1.5, -1)
    p[3] = p[1]  # chain 1's first node is chain 0's (the same prefix)
    chains = torch.tensor([[1, 2], [1, 3], [4, 0]])
    num = torch.tensor([2, 2, 1])
    return p, chains, num


def _tree_law(p: torch.Tensor) -> dict[tuple[int, ...], float]:
    """The exact law of the emitted tokens: each drawn from p at the node its prefix reaches."""
    law: dict[tuple[int, ...], float] = {}
    for x0 in range(6):
        if x0 == 1:
            for x1 in range(6):
                node = {2: 2, 3: 4}.get(x1)
                if node is None:
                    law[(1, x1)] = float(p[0, 1] * p[1, x1])
                else:
                    for x2 in range(6):
                        law[(1, x1, x2)] = float(p[0, 1] * p[1, x1] * p[node, x2])
        elif x0 == 4:
            for x1 in range(6):
                law[(4, x1)] = float(p[0, 4] * p[5, x1])
        else:
            law[(x0,)] = float(p[0, x0])
    return law


def test_chains_emit_the_policys_law():
    """200k rows of one tree: the frequency of each emitted sequence matches its exact law
    within 5 standard errors (a rule that always followed chain 0, or never moved to a second
    chain that shares a first draft, fails by far more)."""
    B = 200_000
    p, chains, num = _tree_inputs(B)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(B, 3, generator=g, dtype=torch.float64)
    acc, tokens, node, logp = sv.verify_chains(
        p.log()[None].expand(B, -1, -1), chains[None].expand(B, -1, -1),
        num[None].expand(B, -1), u,
    )  # fmt: skip
    # Each emitted token's log-prob is p's at the node that emitted it.
    want = p.log()[node, tokens]
    upto = torch.arange(3) <= acc[:, None]
    assert torch.allclose(logp[upto], want[upto])
    seen: dict[tuple[int, ...], int] = {}
    for a, row in zip(acc.tolist(), tokens.tolist(), strict=True):
        key = tuple(row[: a + 1])
        seen[key] = seen.get(key, 0) + 1
    law = _tree_law(p)
    assert set(seen) <= set(law)
    for key, q in law.items():
        f = seen.get(key, 0) / B
        assert abs(f - q) <= 5 * (q * (1 - q) / B) ** 0.5 + 1e-6, (key, f, q)
    # The nodes: chain 1's second node after (1, 3), chain 2's after 4.
    rows = (tokens[:, 0] == 1) & (tokens[:, 1] == 3)
    assert (node[rows, 2] == 4).all() and (acc[rows] == 2).all()
    rows = tokens[:, 0] == 4
    assert (node[rows, 1] == 5).all() and (acc[rows] == 1).all()


def test_chains_by_hand_greedy():
    p, chains, num = _tree_inputs(1)
    p = torch.zeros(7, 6)
    p[0, 1] = p[1, 3] = p[3, 3] = p[4, 5] = 1.0  # argmax path 1, 3 (chain 1), then 5
    acc, tokens, node, _ = sv.verify_chains(p[None], chains[None], num[None], greedy=True)
    assert acc.tolist() == [2] and tokens.tolist() == [[1, 3, 5]] and node.tolist() == [[0, 1, 4]]
    p[0] = torch.eye(6)[4]  # root's argmax 4: chain 2, one draft, then p[5]'s argmax
    p[5, 2] = 1.0
    acc, tokens, node, _ = sv.verify_chains(p[None], chains[None], num[None], greedy=True)
    assert (
        acc.tolist() == [1] and tokens[0, :2].tolist() == [4, 2] and node[0, :2].tolist() == [0, 5]
    )
    num0 = torch.tensor([[0, 0, 0]])  # no drafts: the root's token alone
    acc, tokens, _, _ = sv.verify_chains(p[None], chains[None], num0, greedy=True)
    assert acc.tolist() == [0] and tokens[0, 0] == 4


def test_chains_bad_arguments_name_what_is_wrong():
    p, chains, num = _tree_inputs(1)
    with pytest.raises(ValueError, match=r"target must be \[1, 1 \+ C \* k = 7, V\]"):
        sv.verify_chains(p[None, :5], chains[None], num[None], greedy=True)
    with pytest.raises(ValueError, match=r"num must be \[1, 3\]"):
        sv.verify_chains(p[None], chains[None], num[None, :2], greedy=True)
    with pytest.raises(ValueError, match=r"uniforms must be \[1, 3\]"):
        sv.verify_chains(p[None].log(), chains[None], num[None])


def test_chains_never_draw_from_an_empty_residual():
    """Whatever rounding leaves of the candidates' running sum, the token is one of them (an
    empty residual's inverse-CDF draw would return the vocabulary's last token)."""
    for u0 in EMPTY_RESIDUAL_U:
        acc, tokens, node, logp = sv.verify_chains(*_empty_residual_inputs(u0))
        assert tokens[0, 0] in (1, 2) and torch.isfinite(logp[0, : int(acc) + 1]).all()


@pytest.mark.parametrize("j", range(len(EMPTY_RESIDUAL_U)))
def test_chains_triton_interpreted_never_draws_from_an_empty_residual(j, interpreted_results):
    res = interpreted_results[f"chains-empty-residual-{j}"]
    assert "error" not in res, res.get("error")
    assert res["got"] == res["ref"] and res["got"]["tokens"][0][0] in (1, 2)


if __name__ == "__main__":
    print(json.dumps(run_cases("cpu")))


def test_chunks_must_be_a_power_of_two():
    # Checked before anything needs triton.
    args = make_inputs(CASES["B9-k1-V300-q"], seed=0)
    with pytest.raises(ValueError, match="chunks must be a power of two"):
        sv.verify_drafts_triton(*args, chunks=3)
