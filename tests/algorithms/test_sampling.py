import torch

from rlkit.algorithms import filter_groups, select_groups


def test_filter_groups_drops_uniform_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 5, 5, 2, 2, 2, 9])  # all-ones, mixed, all-zeros, singleton
    keep = filter_groups(rewards, groups)
    assert keep.tolist() == [False, False, True, True, False, False, False, False]


def test_filter_groups_non_contiguous_and_scores():
    groups = torch.tensor([3, 1, 3, 1, 4, 4])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.25, 0.3])
    assert filter_groups(rewards, groups).tolist() == [True, False, True, False, True, True]


def test_select_groups_takes_first_kept_groups_in_order():
    groups = torch.tensor([4, 2, 4, 2, 7, 7, 1, 1, 7])
    keep = torch.tensor([True, False, True, False, True, True, True, True, True])
    sel = select_groups(groups, keep, 2)
    assert sel.tolist() == [True, False, True, False, True, True, False, False, True]
    assert torch.equal(select_groups(groups, keep, 10), keep)
    assert not select_groups(groups, keep, 0).any()
