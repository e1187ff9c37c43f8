import math

import pytest
import torch

from rlkit.algorithms import entropy_from_logits, kl_penalty

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])  # d = ref - logp = [-0.5, 1.0, 0.0]


def test_k1_k2_k3_values():
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))
    # exp(d) - d - 1: 0.606531 + 0.5 - 1, e - 2
    k3 = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k3"), k3)


def test_k3_clamps_log_ratio():
    out = kl_penalty(torch.tensor([0.0, -100.0]), torch.tensor([-100.0, 0.0]), "k3")
    # d = -100 -> -20: e^-20 + 19;  d = 100 -> 20: e^20 - 21
    torch.testing.assert_close(out, torch.tensor([19.0, math.exp(20) - 21.0]))


def test_k3_gradient_matches_closed_form():
    # d k3 / d logp = 1 - exp(ref - logp)
    logp = LOGP.clone().requires_grad_()
    kl_penalty(logp, REF, "k3").sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(REF - LOGP))


def test_kl_errors():
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(LOGP, REF[:, :2])


def test_entropy_from_logits():
    # uniform over 4: log 4; p = [.25, .75]: -(.25 ln .25 + .75 ln .75) = 0.562335
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e4, -1e4]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(4), 0.562335]))
    out = entropy_from_logits(logits.to(torch.bfloat16))
    assert out.dtype == torch.float32
