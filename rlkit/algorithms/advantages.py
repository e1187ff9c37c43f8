"""Outcome-reward advantage estimators, registered by name.

Every estimator is `fn(rewards [N], group_ids [N], mask [N, T], **kw) -> advantages [N, T]`:
one value per completion, repeated on its tokens and zero where `mask` is 0. Samples of the
same prompt share a group id; groups need not be contiguous or equal-sized.
"""

from __future__ import annotations

import torch

from rlkit.algorithms.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def _check(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> None:
    n = rewards.shape[0]
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [N], got {tuple(rewards.shape)}")
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids: expected shape [{n}], got {tuple(group_ids.shape)}")
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(f"mask: expected shape [{n}, T], got {tuple(mask.shape)}")


def _per_token(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return adv[:, None] * mask.to(adv.dtype)  # [N, T]


def _group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, index, values
    )


def _group_centered(
    rewards: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Returns (R - mean_g [N], group index [N], group sizes [G], G)."""
    _, index = torch.unique(group_ids, return_inverse=True)  # [N] in 0..G-1
    num_groups = int(index.max()) + 1 if index.numel() else 0
    count = _group_sum(torch.ones_like(rewards), index, num_groups)  # [G]
    mean = _group_sum(rewards, index, num_groups) / count  # [G]
    return rewards - mean[index], index, count, num_groups


@ADVANTAGES.register("grpo")
def grpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-6,
    unbiased: bool = True,
) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + eps).

    std is unbiased (divides by n - 1) by default, as verl's torch.std; a group whose rewards
    are all equal, a singleton included, gets 0 (verl instead gives a singleton R / (1 + eps)).
    """
    _check(rewards, group_ids, mask)
    centered, index, count, num_groups = _group_centered(rewards.float(), group_ids)
    dof = (count - 1).clamp(min=1) if unbiased else count  # [G]
    std = (_group_sum(centered**2, index, num_groups) / dof).sqrt()  # [G]
    return _per_token(centered / (std[index] + eps), mask)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: A_i = R_i - mean_g, no std division (it up-weights easy and hard prompts)."""
    _check(rewards, group_ids, mask)
    centered, _, _, _ = _group_centered(rewards.float(), group_ids)
    return _per_token(centered, mask)


@ADVANTAGES.register("rloo")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A_i = R_i - mean_{j != i} R_j = (R_i - mean_g) * n / (n - 1); a singleton gets 0."""
    _check(rewards, group_ids, mask)
    centered, index, count, _ = _group_centered(rewards.float(), group_ids)
    n = count[index]  # [N]
    return _per_token(centered * n / (n - 1).clamp(min=1), mask)


def _batch_whiten(
    values: torch.Tensor, mask: torch.Tensor, weighting: str, eps: float
) -> torch.Tensor:
    """(x - mean) / (std + eps) over the batch, std unbiased.

    weighting "token": every valid token counts once, so a long completion weighs more (verl's
    masked_whiten over the [N, T] returns); "sample": every completion with a valid token
    counts once.
    """
    lengths = mask.to(values.dtype).sum(-1)  # [N]
    if weighting == "token":
        w = lengths
    elif weighting == "sample":
        w = (lengths > 0).to(values.dtype)
    else:
        raise ValueError(f"weighting: expected 'token' or 'sample', got {weighting!r}")
    total = w.sum()
    mean = (w * values).sum() / total.clamp(min=1)
    var = (w * (values - mean) ** 2).sum() / (total - 1).clamp(min=1)
    return (values - mean) / (var.sqrt() + eps)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-6,
    weighting: str = "token",
) -> torch.Tensor:
    """REINFORCE++: the outcome return (gamma 1, so R on every token) whitened over the batch.

    No per-group baseline; group_ids are unused. See `_batch_whiten` for `weighting`.
    """
    _check(rewards, group_ids, mask)
    return _per_token(_batch_whiten(rewards.float(), mask, weighting, eps), mask)


@ADVANTAGES.register("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-6,
    weighting: str = "token",
) -> torch.Tensor:
    """REINFORCE++ with a baseline (verl): subtract the group mean, then whiten over the batch."""
    _check(rewards, group_ids, mask)
    centered, _, _, _ = _group_centered(rewards.float(), group_ids)
    return _per_token(_batch_whiten(centered, mask, weighting, eps), mask)
