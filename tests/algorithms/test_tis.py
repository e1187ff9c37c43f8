import math

import pytest
import torch

from rlkit.algorithms import tis_weights


def test_tis_weights_truncation_and_metrics():
    # raw ratios [1, 1.5, 0.5, 3] on valid tokens; the last position is masked with a junk gap
    sampler = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -50.0]])
    old = sampler + torch.log(torch.tensor([[1.0, 1.5, 0.5, 3.0, 1.0]]))
    old[0, 4] = 0.0
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w, m = tis_weights(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, 0.5, 2.0, 0.0]]))
    assert m["tis_ratio_mean"] == pytest.approx(1.5, rel=1e-5)
    assert m["tis_ratio_max"] == pytest.approx(3.0, rel=1e-5)
    assert m["tis_ratio_min"] == pytest.approx(0.5, rel=1e-5)
    assert m["tis_frac_truncated"] == pytest.approx(0.25)
    gap = (math.log(1.5) + math.log(2) + math.log(3)) / 4  # 0.549306
    assert m["tis_logp_gap"] == pytest.approx(gap, rel=1e-5)
    # (1 + 1.5 + .5 + 2)^2 / (4 * (1 + 2.25 + .25 + 4)) = 25 / 30
    assert m["tis_ess"] == pytest.approx(25 / 30, rel=1e-5)


def test_tis_on_policy_is_identity():
    logp = torch.randn(3, 4)
    w, m = tis_weights(logp, logp, torch.ones(3, 4), cap=2.0)
    assert torch.equal(w, torch.ones(3, 4))
    assert m["tis_ess"] == pytest.approx(1.0) and m["tis_frac_truncated"] == 0.0


def test_tis_clamps_extreme_gaps():
    w, m = tis_weights(
        torch.tensor([[0.0, -500.0]]), torch.tensor([[-500.0, 0.0]]), torch.ones(1, 2), cap=1.5
    )
    # exp(+-20) after the clamp: finite everywhere
    torch.testing.assert_close(w, torch.tensor([[1.5, math.exp(-20)]]))
    assert m["tis_ratio_max"] == pytest.approx(math.exp(20), rel=1e-5)
    assert all(math.isfinite(v) for v in m.values())
