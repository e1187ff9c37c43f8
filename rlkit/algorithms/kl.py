"""KL-to-reference estimators and entropy (Schulman, "Approximating KL Divergence").

With tokens sampled from the policy and d = ref_logp - logp, each estimator's expectation
approximates KL(policy || ref): k1 = -d (unbiased, high variance), k2 = d^2 / 2 (biased, low
variance), k3 = exp(d) - d - 1 (unbiased, low variance, never negative; verl's "low_var_kl").
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs (mask and aggregate it like a loss)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp: expected shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}"
        )
    log_ratio = ref_logp - logp  # [N, T]
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # exp() of a far-off-policy token would overflow; +-20 is already a huge penalty.
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return log_ratio.exp() - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, in float32: H = logsumexp(z) - sum p z."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)
