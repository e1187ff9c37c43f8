import math

import pytest
import torch

from rlkit.algorithms import AGG_MODES, agg_normalisers, aggregate, ppo_clip_loss

# One row, eps_low .2, eps_high .28; ratios and advantages chosen to hit every clip case:
#   r=1.5 A=+1: clipped high, loss -1.28, no gradient   r=1.5 A=-1: loss 1.5
#   r=0.5 A=+1: loss -0.5                               r=0.5 A=-1: clipped low, loss 0.8, no gradient
#   r=1.1 A=+2: inside, loss -2.2                       r=1.0 A=-1: loss 1.0
RATIOS = [1.5, 1.5, 0.5, 0.5, 1.1, 1.0]
ADV = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, -1.0]])
TOKEN_LOSS = [-1.28, 1.5, -0.5, 0.8, -2.2, 1.0]


def clip_case(pad: float = 0.0):
    """logp with grad, old_logp, advantages, mask for the six tokens plus a masked junk token."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7, -1.0]])
    logp = old.clone()
    logp[0, :6] += torch.log(torch.tensor(RATIOS))
    logp[0, 6] = pad
    adv = torch.cat([ADV, torch.tensor([[5.0]])], dim=1)
    mask = torch.tensor([[1.0] * 6 + [0.0]])
    return logp.requires_grad_(), old, adv, mask


def test_ppo_clip_values_gradients_and_metrics():
    logp, old, adv, mask = clip_case(pad=1e4)  # a junk logp at a masked position
    loss, m = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor(sum(TOKEN_LOSS) / 6))  # -0.68 / 6
    loss.backward()
    # d loss_t / d logp_t = -r A when the unclipped term is the min, 0 when the clip is active
    expected_grad = torch.tensor([[0.0, 1.5, -0.5, 0.0, -2.2, 1.0, 0.0]]) / 6
    torch.testing.assert_close(logp.grad, expected_grad)
    assert m["clip_frac_high"] == pytest.approx(1 / 6)
    assert m["clip_frac_low"] == pytest.approx(1 / 6)
    assert m["clip_frac"] == pytest.approx(2 / 6)
    assert m["ratio_mean"] == pytest.approx(6.1 / 6, rel=1e-5)
    assert m["ratio_max"] == pytest.approx(1.5, rel=1e-5)
    assert m["num_tokens"] == 6
    # mean of r - 1 - log r over the six ratios
    kl = sum(r - 1 - math.log(r) for r in RATIOS) / 6
    assert m["approx_kl"] == pytest.approx(kl, rel=1e-4)  # 0.0966756


def test_ppo_clip_symmetric_bounds_change_high_clip_only():
    logp, old, adv, mask = clip_case()
    loss, m = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.6)
    # r=1.5 A=+1 is now inside [0.8, 1.6]: -1.5 instead of -1.28
    torch.testing.assert_close(loss, torch.tensor((sum(TOKEN_LOSS) + 1.28 - 1.5) / 6))
    assert m["clip_frac_high"] == 0.0 and m["clip_frac_low"] == pytest.approx(1 / 6)


def test_ppo_clip_per_token_weights():
    logp, old, adv, mask = clip_case()
    weights = torch.tensor([[2.0, 0.5, 1.0, 1.0, 0.0, 3.0, 9.0]])
    loss, _ = ppo_clip_loss(logp, old, adv, mask, weights=weights)
    expected = (-1.28 * 2 + 1.5 * 0.5 - 0.5 + 0.8 + 0.0 + 1.0 * 3) / 6
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_ppo_clip_on_policy_gradient_is_policy_gradient():
    # at r = 1 nothing is clipped and d loss / d logp = -A / num_tokens
    logp = torch.randn(3, 4, requires_grad=True)
    adv, mask = torch.randn(3, 4), torch.ones(3, 4)
    loss, m = ppo_clip_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 12)
    assert m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0 and m["ratio_max"] == 1.0


def test_ppo_clip_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logp"):
        ppo_clip_loss(x, torch.zeros(2, 4), x, x)
    with pytest.raises(ValueError, match="weights"):
        ppo_clip_loss(x, x, x, x, weights=torch.zeros(3))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last sample is fully masked


def test_aggregate_hand_values():
    assert aggregate(LOSS, AGG_MASK, "token-mean").item() == pytest.approx(7 / 3)
    # (1.5 + 4) / 2: the empty sequence is not counted
    assert aggregate(LOSS, AGG_MASK, "seq-mean-token-mean").item() == pytest.approx(2.75)
    # (3/4 + 4/4) / 2, and with the default norm_len = T = 3: (1 + 4/3) / 2
    assert aggregate(LOSS, AGG_MASK, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(
        0.875
    )
    assert aggregate(LOSS, AGG_MASK, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    with pytest.raises(ValueError, match="valid: token-mean"):
        aggregate(LOSS, AGG_MASK, "seq-sum")


def test_aggregate_ignores_nan_at_masked_positions():
    loss = LOSS.clone()
    loss[2, 0], loss[0, 2] = float("nan"), float("inf")
    for mode in AGG_MODES:
        assert torch.isfinite(aggregate(loss, AGG_MASK, mode))


def test_agg_normalisers():
    n = agg_normalisers(AGG_MASK)
    assert n["global_tokens"].item() == 3 and n["global_seqs"].item() == 2


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    n, t = 7, 9
    logp = (torch.randn(n, t, generator=g) - 1).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, 1, generator=g).expand(n, t)
    lengths = torch.tensor([9, 1, 4, 0, 6, 2, 9])  # uneven, one empty sample
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    kw = dict(eps_low=0.2, eps_high=0.28, agg=mode, norm_len=16)

    full, _ = ppo_clip_loss(logp, old, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, logp)

    norms = agg_normalisers(mask)
    parts = []
    for idx in ([0, 1], [2, 3, 4], [5], [6]):
        # each micro-batch trimmed to its own longest response, as a learner would pad it
        tt = max(int(lengths[idx].max()), 1)
        i = torch.tensor(idx)
        part, _ = ppo_clip_loss(logp[i, :tt], old[i, :tt], adv[i, :tt], mask[i, :tt], **kw, **norms)
        parts.append(part)
    micro = torch.stack(parts).sum()
    (micro_grad,) = torch.autograd.grad(micro, logp)
    torch.testing.assert_close(micro, full)
    torch.testing.assert_close(micro_grad, full_grad)
    # without the global normalisers each micro-batch would be normalised on its own
    naive = sum(ppo_clip_loss(logp[[i]], old[[i]], adv[[i]], mask[[i]], **kw)[0] for i in (0, 1))
    assert not torch.allclose(naive, ppo_clip_loss(logp[:2], old[:2], adv[:2], mask[:2], **kw)[0])
