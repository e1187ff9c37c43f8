import math

import pytest
import torch

from rlkit.algorithms import sparse_corrections


def _batch(ratios, valid):
    """old/sparse log-probs whose per-token ratio exp(old - sparse) is `ratios`."""
    sparse = -torch.rand(len(ratios), len(ratios[0])) - 0.1
    old = sparse + torch.log(torch.tensor(ratios, dtype=torch.float32))
    return old, sparse, torch.tensor(valid, dtype=torch.float32)


def test_rejection_and_veto_by_hand():
    # sample 0: ratios 1, 0.4 (out: < 0.5), 1.6 (out: > 1.5), 1.2; sample 1: one token under
    # the veto threshold vetoes the whole sample; sample 2: a junk ratio on a padded position.
    old, sparse, mask = _batch(
        [[1.0, 0.4, 1.6, 1.2], [1.0, 1e-5, 1.0, 1.0], [1.1, 0.9, 1e-9, 50.0]],
        [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]],
    )
    keep, w, m = sparse_corrections(old, sparse, mask, reweight=False)
    assert w is None
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]]))
    # valid tokens: 4 + 3 + 2 = 9; out of bounds: 0.4, 1.6, 1e-5 -> 3/9
    assert m["sparse_rejected_token_frac"] == pytest.approx(3 / 9)
    assert m["sparse_vetoed_frac"] == pytest.approx(1 / 3)
    # left the mask: 2 (sample 0) + 3 (vetoed sample 1) = 5 of 9
    assert m["sparse_masked_token_frac"] == pytest.approx(5 / 9)
    assert m["sparse_rho_max"] == pytest.approx(1.6, rel=1e-5)
    assert m["sparse_rho_min"] == pytest.approx(1e-5, rel=1e-3)
    mean = (1 + 0.4 + 1.6 + 1.2 + 1 + 1e-5 + 1 + 1.1 + 0.9) / 9
    assert m["sparse_rho_mean"] == pytest.approx(mean, rel=1e-5)
    assert m["sparse_ess"] == pytest.approx(1.0)


def test_reweighting_truncates_and_normalises_by_hand():
    old, sparse, mask = _batch([[1.0, 2.0, 0.8, 1.0]], [[1, 1, 1, 0]])
    keep, w, m = sparse_corrections(old, sparse, mask, rejection=False, weight_cap=1.5)
    torch.testing.assert_close(keep, mask)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, 0.8, 0.0]]), rtol=1e-5, atol=1e-6)
    # ESS of (1, 1.5, 0.8): 3.3^2 / (3 * (1 + 2.25 + 0.64))
    assert m["sparse_ess"] == pytest.approx(3.3**2 / (3 * 3.89), rel=1e-5)
    _, wn, _ = sparse_corrections(
        old, sparse, mask, rejection=False, weight_cap=1.5, normalize=True
    )
    torch.testing.assert_close(wn, w / (3.3 / 3), rtol=1e-5, atol=1e-6)


def test_both_corrections_weights_only_on_surviving_tokens():
    old, sparse, mask = _batch([[1.0, 2.0, 0.7, 1.4]], [[1, 1, 1, 1]])
    keep, w, _ = sparse_corrections(old, sparse, mask, weight_cap=1.3)
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0, 1, 1]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.7, 1.3]]), rtol=1e-5, atol=1e-6)


def test_on_policy_is_identity_and_clamp_keeps_values_finite():
    logp = -torch.rand(3, 5)
    mask = torch.ones(3, 5)
    keep, w, m = sparse_corrections(logp, logp, mask)
    assert torch.equal(keep, mask) and torch.equal(w, torch.ones(3, 5))
    assert m["sparse_rejected_token_frac"] == 0 and m["sparse_vetoed_frac"] == 0
    keep, w, m = sparse_corrections(
        torch.tensor([[0.0, -500.0]]), torch.tensor([[-500.0, 0.0]]), torch.ones(1, 2)
    )
    assert m["sparse_rho_max"] == pytest.approx(math.exp(20), rel=1e-5)
    assert torch.isfinite(w).all() and keep.sum() == 0  # exp(-20) < veto: whole sample out


def test_bad_shapes_and_bounds_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sparse_logp"):
        sparse_corrections(x, torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="rho_low"):
        sparse_corrections(x, x, x, rho_low=1.2)
