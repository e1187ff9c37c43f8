"""Truncated importance sampling (TIS) for the sampler-vs-learner gap.

The sampler (bf16 weights, another kernel, or a compressed KV cache) and the learner's dense
recomputation disagree on log-probs even with the same weights, so the rollout is slightly
off-policy. Each token's loss is multiplied by w_t = min(exp(old_t - sampler_t), cap): the
ratio corrects the bias, the cap bounds the variance.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def tis_weights(
    learner_old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """weights [N, T] (0 where mask is 0) and metrics over valid tokens.

    Metrics: tis_ratio_mean / _max / _min (the raw ratio, before the cap), tis_frac_truncated
    (ratio > cap), tis_logp_gap (mean |old - sampler|) and tis_ess, the effective sample size
    fraction (sum w)^2 / (n * sum w^2) of the capped weights: 1 when all weights are equal.
    """
    shape = learner_old_logp.shape
    for name, t in (("sampler_logp", sampler_logp), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    valid = mask.bool()  # [N, T]
    diff = torch.where(valid, learner_old_logp - sampler_logp, torch.zeros_like(sampler_logp))
    ratio = diff.float().clamp(-20.0, 20.0).exp()  # [N, T]
    weights = torch.where(valid, ratio.clamp(max=cap), torch.zeros_like(ratio))  # [N, T]

    n = valid.sum().clamp(min=1)
    # ratio > 0, so 0 is a neutral fill for max; min falls back to 0 when nothing is valid.
    ratio_min = torch.where(valid, ratio, torch.inf).min()
    values = {
        "tis_ratio_mean": torch.where(valid, ratio, 0.0).sum() / n,
        "tis_ratio_max": torch.where(valid, ratio, 0.0).max(),
        "tis_ratio_min": torch.where(valid.any(), ratio_min, 0.0),
        "tis_frac_truncated": (valid & (ratio > cap)).sum() / n,
        "tis_logp_gap": diff.abs().sum() / n,
        "tis_ess": weights.sum() ** 2 / (n * (weights**2).sum()).clamp(min=1e-30),
    }
    # One device sync for all metrics.
    floats = torch.stack([v.float() for v in values.values()]).tolist()
    return weights, dict(zip(values, floats, strict=True))
