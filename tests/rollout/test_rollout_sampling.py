import pytest
import torch

from rlkit.rollout import SamplingParams, sample, sampling_logprobs


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(40000, 5)
    gen = torch.Generator().manual_seed(0)
    tokens, logp = sample(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert (freq - probs).abs().max() < 0.01
    assert freq[4] == 0
    torch.testing.assert_close(logp, probs.log()[tokens])


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k2 = sampling_logprobs(logits, SamplingParams(top_k=2))
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    torch.testing.assert_close(k2[0, :2].exp().sum(), torch.tensor(1.0))
    # Probabilities ~0.64, 0.24, 0.09, ...: top_p 0.7 keeps two tokens, 0.6 keeps one.
    assert torch.isfinite(sampling_logprobs(logits, SamplingParams(top_p=0.7))).sum() == 2
    assert torch.isfinite(sampling_logprobs(logits, SamplingParams(top_p=0.6))).sum() == 1
    # Temperature applies before the masks.
    t = sampling_logprobs(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(t, torch.log_softmax(logits / 2, -1))


def test_greedy_reports_temperature_one_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logp = sample(logits, SamplingParams(temperature=0.0))
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_masked_tokens_are_never_drawn():
    logits = torch.randn(2000, 50, generator=torch.Generator().manual_seed(1))
    tokens, _ = sample(
        logits, SamplingParams(top_k=3, temperature=1.5), torch.Generator().manual_seed(2)
    )
    top3 = logits.topk(3, -1).indices
    assert (top3 == tokens[:, None]).any(-1).all()


def _nucleus_by_sorting(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The rule spelled out: sort, keep while the mass before a token is under top_p, then
    every token tied with the least kept one."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for r in range(logits.shape[0]):
        probs = torch.softmax(logits[r], -1)
        order = torch.sort(probs, descending=True).indices
        mass, least = 0.0, None
        for i in order.tolist():
            if mass >= top_p:
                break
            mass += float(probs[i])
            least = logits[r, i]
        keep[r] = logits[r] >= least
    return keep


@pytest.mark.parametrize("first_tier", [64, 4])
@pytest.mark.parametrize("vocab, scale", [(3000, 8.0), (3000, 0.5), (700, 2.0)])
def test_top_p_from_candidates_is_the_sorted_rule(vocab, scale, first_tier, monkeypatch):
    """Peaked rows (the nucleus among the first tier's candidates, or the second's) and flat
    ones (past them: the row is sorted whole) keep exactly the sorted rule's set, ties at its
    edge included; rows left out by `need` keep every token."""
    from rlkit.rollout import sampling

    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 256)
    monkeypatch.setattr(sampling, "TOP_P_FIRST_TIER", first_tier)
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * scale).to(torch.bfloat16).float()  # ties
    logits[0, :5] = logits[0, :5].max()  # a tie at the top
    for top_p in (0.3, 0.7, 0.95):
        got = torch.isfinite(sampling_logprobs(logits, SamplingParams(top_p=top_p)))
        assert torch.equal(got, _nucleus_by_sorting(logits, top_p)), top_p
    need = torch.tensor([True, False, True, True, False, True])
    got = torch.isfinite(sampling_logprobs(logits, SamplingParams(top_p=0.7), need))
    assert torch.equal(got[need], _nucleus_by_sorting(logits, 0.7)[need])
    assert bool(got[~need].all())
    # Flat rows need more than the candidates: the fallback ran (else the sets would differ).
    if scale < 1:
        assert _nucleus_by_sorting(logits, 0.7).sum(-1).min() > 256


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)]
)
def test_params_validate(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
