import math

import pytest
import torch

from rlkit.algorithms import ADVANTAGES, dr_grpo, grpo, reinforce_pp, reinforce_pp_baseline, rloo

# Uneven, non-contiguous groups: 7 = {1, 0.5}, 3 = {0, 1, 0}, 9 = {1} (a singleton).
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 3, 3, 9])
LENGTHS = [2, 3, 1, 3, 2, 1]
MASK = torch.tensor([[1.0] * n + [0.0] * (3 - n) for n in LENGTHS])  # [6, 3]


def per_sample(adv: torch.Tensor) -> torch.Tensor:
    """The one value of each completion; also checks it is on every valid token and 0 elsewhere."""
    values = adv[:, 0]
    assert torch.equal(adv, values[:, None] * MASK)
    return values


def test_grpo_single_group_unbiased_std():
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735: +-0.5 / 0.57735 = +-0.866025
    adv = grpo(
        torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), torch.ones(4, 2)
    )
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025])
    torch.testing.assert_close(adv, expected[:, None].expand(4, 2), atol=1e-5, rtol=0)


def test_grpo_biased_std():
    adv = grpo(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4), torch.ones(4, 1), unbiased=False)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_grpo_uneven_groups_and_singleton():
    # group 7: mean .75, std sqrt(.125) = .353553 -> +-.707107
    # group 3: mean 1/3, std sqrt(1/3) -> -.57735, 1.154701, -.57735; group 9: singleton -> 0
    expected = torch.tensor([0.707107, -0.577350, -0.707107, 1.154701, -0.577350, 0.0])
    adv = per_sample(grpo(REWARDS, GROUPS, MASK))
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_grpo_all_equal_group_is_zero_not_nan():
    adv = grpo(torch.ones(3), torch.zeros(3), torch.ones(3, 2))
    assert torch.equal(adv, torch.zeros(3, 2))


def test_dr_grpo_no_std_division():
    expected = torch.tensor([0.25, -1 / 3, -0.25, 2 / 3, -1 / 3, 0.0])
    torch.testing.assert_close(per_sample(dr_grpo(REWARDS, GROUPS, MASK)), expected)


def test_rloo_leave_one_out():
    # group 7: 1 - .5, .5 - 1; group 3: 0 - .5, 1 - 0, 0 - .5; singleton -> 0
    expected = torch.tensor([0.5, -0.5, -0.5, 1.0, -0.5, 0.0])
    torch.testing.assert_close(per_sample(rloo(REWARDS, GROUPS, MASK)), expected)


def test_reinforce_pp_token_weighted():
    # tokens carry [1, 1, 1, 0]: mean .75, unbiased var .25 -> (1-.75)/.5, (0-.75)/.5
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = reinforce_pp(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), mask)
    expected = torch.tensor([[0.5, 0.5, 0.5], [-1.5, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_reinforce_pp_sample_weighted():
    # samples [1, 0]: mean .5, unbiased std sqrt(.5) -> +-.707107, whatever the lengths
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = reinforce_pp(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), mask, weighting="sample")
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.707107, -0.707107]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weighting"):
        reinforce_pp(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), mask, weighting="seq")


def test_reinforce_pp_ignores_groups_baseline_uses_them():
    rewards, groups, mask = (
        torch.tensor([1.0, 0.0, 1.0, 1.0]),
        torch.tensor([0, 0, 1, 1]),
        torch.ones(4, 1),
    )
    # no baseline: mean .75, unbiased std .5 -> .5, -1.5, .5, .5
    torch.testing.assert_close(
        reinforce_pp(rewards, groups, mask)[:, 0],
        torch.tensor([0.5, -1.5, 0.5, 0.5]),
        atol=1e-5,
        rtol=0,
    )
    # baseline: centred [.5, -.5, 0, 0], mean 0, unbiased std sqrt(1/6) = .408248
    s = 0.5 / math.sqrt(1 / 6)
    torch.testing.assert_close(
        reinforce_pp_baseline(rewards, groups, mask)[:, 0],
        torch.tensor([s, -s, 0.0, 0.0]),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_estimator_masks_and_checks_shapes(name):
    fn = ADVANTAGES.get(name)
    adv = fn(REWARDS, GROUPS, MASK)
    assert adv.shape == MASK.shape and adv.dtype == torch.float32
    assert torch.all(adv[MASK == 0] == 0)
    # integer rewards and a bool mask are accepted
    torch.testing.assert_close(
        fn(REWARDS.round().long(), GROUPS, MASK.bool()), fn(REWARDS.round(), GROUPS, MASK)
    )
    with pytest.raises(ValueError, match="group_ids"):
        fn(REWARDS, GROUPS[:5], MASK)
    with pytest.raises(ValueError, match="mask"):
        fn(REWARDS, GROUPS, MASK[:5])
