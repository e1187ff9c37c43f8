"""Sparse-RL's learner corrections for rollouts decoded against a compressed KV cache.

The sampler's log-probs come from pi_sparse (the rollout weights attending to a compressed
cache); the learner recomputes pi_old with dense attention. Per token,

    rho_t = exp(clamp(logp_old_t - logp_sparse_t, -c, c))

- Sparsity-aware rejection sampling: a token whose rho_t lies outside [rho_low, rho_high]
  leaves the loss mask; a sample with any valid rho_t < veto_threshold leaves the batch
  ("veto": the compressed cache lost something the dense policy needs).
- Importance reweighting: w_t = min(rho_t, cap), optionally divided by its mean over the
  surviving tokens; the token's policy loss is multiplied by w_t.

Pure tensors in, tensors and floats out.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sparse_corrections(
    old_logp: torch.Tensor,
    sparse_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    rejection: bool = True,
    rho_low: float = 0.5,
    rho_high: float = 1.5,
    veto_threshold: float = 1e-4,
    reweight: bool = True,
    weight_cap: float = 1.5,
    normalize: bool = False,
    log_ratio_clamp: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """(mask [N, T] float, weights [N, T] or None, metrics).

    old_logp: dense log-probs of the policy that sampled; sparse_logp: the sampler's;
    mask: valid response tokens. The returned mask is `mask` with rejected tokens and vetoed
    samples zeroed (unchanged when rejection is off); weights are 0 outside it.

    Metrics (over the valid tokens of the input mask): sparse_rho_mean / _max / _min,
    sparse_rejected_token_frac (tokens out of [rho_low, rho_high], counted before the veto),
    sparse_vetoed_frac (samples with a valid token vetoed, of samples with any valid token),
    sparse_masked_token_frac (valid tokens that left the mask for either reason),
    sparse_ess (normalised effective sample size (sum w)^2 / (n sum w^2) of the weights on the
    surviving tokens; 1 when reweighting is off or all weights are equal).
    """
    shape = old_logp.shape
    for name, t in (("sparse_logp", sparse_logp), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not 0 <= rho_low <= 1 <= rho_high:
        raise ValueError(f"need rho_low <= 1 <= rho_high, got [{rho_low}, {rho_high}]")
    valid = mask.bool()
    log_ratio = (old_logp.float() - sparse_logp.float()).clamp(-log_ratio_clamp, log_ratio_clamp)
    rho = torch.where(valid, log_ratio.exp(), torch.ones_like(log_ratio))  # [N, T]

    token_out = valid & ((rho < rho_low) | (rho > rho_high))
    vetoed = (valid & (rho < veto_threshold)).any(1)  # [N]
    keep = valid
    if rejection:
        keep = valid & ~token_out & ~vetoed[:, None]
    weights = None
    w_eff = keep.float()
    if reweight:
        weights = torch.where(keep, rho.clamp(max=weight_cap), torch.zeros_like(rho))
        if normalize:
            weights = weights / (weights.sum() / keep.sum().clamp(min=1)).clamp(min=1e-12)
        w_eff = weights

    n_valid = valid.sum().clamp(min=1)
    n_seqs = valid.any(1).sum().clamp(min=1)
    n_keep = keep.sum().clamp(min=1)
    values = {
        "sparse_rho_mean": torch.where(valid, rho, 0.0).sum() / n_valid,
        "sparse_rho_max": torch.where(valid, rho, 0.0).max(),
        "sparse_rho_min": torch.where(valid.any(), torch.where(valid, rho, torch.inf).min(), 0.0),
        "sparse_rejected_token_frac": token_out.sum() / n_valid,
        "sparse_vetoed_frac": (vetoed & valid.any(1)).sum() / n_seqs,
        "sparse_masked_token_frac": (valid & ~keep).sum() / n_valid,
        "sparse_ess": torch.where(
            keep.any(),
            w_eff.sum() ** 2 / (n_keep * (w_eff**2).sum()).clamp(min=1e-30),
            1.0,
        ),
    }
    floats = torch.stack([v.float() for v in values.values()]).tolist()
    return keep.to(mask.dtype), weights, dict(zip(values, floats, strict=True))
