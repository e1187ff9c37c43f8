"""Token-level policy losses, registered by name, and loss aggregation.

A policy loss is `fn(logp, old_logp, advantages, mask, eps_low, eps_high, weights, agg,
**agg_kwargs) -> (loss, metrics)` over [N, T] tensors. `mask` is the final loss mask (Sparse-RL
rejection shrinks it before the call) and `weights` an optional per-token multiplier of the
token loss (TIS or Sparse-RL reweighting), both applied before aggregation.
"""

from __future__ import annotations

import torch

from rlkit.algorithms.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_normalisers(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The global normalisers of a whole (mini-)batch, for `aggregate` over its micro-batches.

    global_seqs counts the sequences with at least one valid token: a sample whose mask is all
    zero (e.g. vetoed by Sparse-RL) does not dilute the seq-mean modes.
    """
    lengths = mask.sum(-1)  # [N]
    return {"global_tokens": lengths.sum(), "global_seqs": (lengths > 0).sum()}


def aggregate(
    loss_tokens: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    norm_len: float | None = None,
    global_tokens: torch.Tensor | float | None = None,
    global_seqs: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduces a [N, T] token loss to a scalar.

    token-mean: sum of valid token losses / number of valid tokens (DAPO).
    seq-mean-token-mean: mean over sequences of each sequence's token mean (GRPO).
    seq-mean-token-sum-norm: mean over sequences of (token sum / norm_len) (Dr.GRPO);
      norm_len is a constant, the maximum response length; it defaults to T, which is only
      right when every micro-batch is padded to the same T.

    Each mode is a plain sum divided by a batch-level count, so with `global_tokens` /
    `global_seqs` taken over the whole batch (see `agg_normalisers`) the losses of its
    micro-batches sum exactly to the full-batch loss, gradients included. Without them the
    counts come from this call's mask. Positions where mask is 0 add exactly 0 to the value,
    even a nan or inf loss there.
    """
    valid = mask.bool()  # [N, T]
    masked = torch.where(valid, loss_tokens, torch.zeros_like(loss_tokens))  # [N, T]
    if mode == "token-mean":
        denom = valid.sum().clamp(min=1) if global_tokens is None else global_tokens
        return masked.sum() / denom
    lengths = valid.sum(-1)  # [N]
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / lengths.clamp(min=1)  # [N]
    elif mode == "seq-mean-token-sum-norm":
        per_seq = masked.sum(-1) / (loss_tokens.shape[-1] if norm_len is None else norm_len)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGG_MODES)}")
    denom = (lengths > 0).sum().clamp(min=1) if global_seqs is None else global_seqs
    return per_seq.sum() / denom


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip with separate bounds (DAPO's clip-higher), per token:

    loss_t = -min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t) * w_t,
    r_t = exp(logp_t - old_logp_t), the log-ratio clamped to +-20 against overflow.

    Metrics over valid tokens: clip_frac_high (A > 0 and r > 1 + eps_high), clip_frac_low
    (A < 0 and r < 1 - eps_low), clip_frac (either: the tokens whose gradient the clip
    zeroes), approx_kl (k3 estimate of KL(old || new): mean of r - 1 - log r), ratio_mean,
    ratio_max, num_tokens (to weight means when combining micro-batches).
    """
    shape = logp.shape
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if weights is not None and weights.shape != shape:
        raise ValueError(f"weights: expected shape {tuple(shape)}, got {tuple(weights.shape)}")

    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # [N, T]
    ratio = log_ratio.exp()  # [N, T]
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    loss_tokens = torch.maximum(-ratio * advantages, -clipped * advantages)  # [N, T]
    if weights is not None:
        loss_tokens = loss_tokens * weights
    loss = aggregate(loss_tokens, mask, agg, **agg_kwargs)

    with torch.no_grad():
        valid = mask.bool()
        n = valid.sum().clamp(min=1)
        high = valid & (advantages > 0) & (ratio > 1.0 + eps_high)
        low = valid & (advantages < 0) & (ratio < 1.0 - eps_low)
        ratio_v = torch.where(valid, ratio, torch.zeros_like(ratio))
        kl = torch.where(valid, ratio - 1.0 - log_ratio, torch.zeros_like(ratio))
        values = {
            "clip_frac_high": high.sum() / n,
            "clip_frac_low": low.sum() / n,
            "clip_frac": (high | low).sum() / n,
            "approx_kl": kl.sum() / n,
            "ratio_mean": ratio_v.sum() / n,
            "ratio_max": ratio_v.max() if ratio.numel() else ratio.new_zeros(()),
            "num_tokens": valid.sum(),
        }
        # One device sync for all metrics.
        floats = torch.stack([v.float() for v in values.values()]).tolist()
    return loss, dict(zip(values, floats, strict=True))
