"""DAPO dynamic sampling: keep only groups whose rewards differ, then fill the batch.

A group whose completions all got the same reward has zero advantage under every group
baseline, so it adds no gradient, only noise in the normalisers. The trainer samples more
prompts, concatenates the rounds (group ids unique across rounds), and calls
`filter_groups` then `select_groups` until it has enough groups or runs out of rounds.
"""

from __future__ import annotations

import torch


def filter_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """keep [N] bool: True for samples whose group has at least two distinct rewards."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards, group_ids: expected two [N] tensors, got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, index = torch.unique(group_ids, return_inverse=True)  # [N] in 0..G-1
    num_groups = int(index.max()) + 1 if index.numel() else 0
    empty = rewards.new_zeros(num_groups)
    hi = empty.scatter_reduce(0, index, rewards, reduce="amax", include_self=False)  # [G]
    lo = empty.scatter_reduce(0, index, rewards, reduce="amin", include_self=False)  # [G]
    return (hi > lo)[index]


def select_groups(
    group_ids: torch.Tensor, keep: torch.Tensor, target_num_groups: int
) -> torch.Tensor:
    """keep [N] narrowed to the first `target_num_groups` kept groups, in order of appearance.

    Earlier rounds win, so the cut does not prefer any reward pattern. Fewer groups come back
    when fewer were kept.
    """
    if keep.shape != group_ids.shape:
        raise ValueError(f"keep: expected shape {tuple(group_ids.shape)}, got {tuple(keep.shape)}")
    chosen: dict[int, None] = {}
    for gid, k in zip(group_ids.tolist(), keep.tolist(), strict=True):
        if k and len(chosen) < target_num_groups:
            chosen.setdefault(gid)
    selected = torch.tensor(list(chosen), dtype=group_ids.dtype, device=group_ids.device)
    return keep.bool() & torch.isin(group_ids, selected)
