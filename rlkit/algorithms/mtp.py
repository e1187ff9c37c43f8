"""MTP-RL's drafter loss (ALGORITHMS.md section 4): the MTP module's cross-entropy on the
rollout tokens, each token weighted by a function of its advantage.

The paper's exact advantage-aware formula is not public; the variants are registered by name
(`algorithm.mtp.weight`), each mapping advantages A [N, T] to weights >= 0 normalised to mean 1
over the batch's valid tokens (so the loss keeps the plain loss's scale):

- `plain`: w = 1, the peers' loss (slime, verl, AReaL).
- `linear`: w = max(0, 1 + beta * A). A policy-gradient step moves the policy to roughly
  pi_new(y) ~ pi_old(y) (1 + eta A(y)); the rollouts were drawn from pi_old, so weighting them
  by 1 + beta A makes the drafter fit (to first order) the policy the next rollouts come from.
  Negative-advantage tokens keep some weight: the policy still produces most of them.
- `positive`: w = max(0, A): only what the update reinforces (the strongest tilt; zero-advantage
  groups contribute nothing).
- `exp`: w = exp(beta * A) (an exponential tilt, AWR-style; never zero).

Everything here is pure tensors (no module, no optimizer): the learner computes the MTP states
and calls `mtp_token_stats` and `mtp_weights`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from rlkit.algorithms.registry import Registry

MTP_WEIGHTS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("MTP weight")


@MTP_WEIGHTS.register("plain")
def plain_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.ones_like(adv)


@MTP_WEIGHTS.register("linear")
def linear_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return (1.0 + beta * adv).clamp(min=0.0)


@MTP_WEIGHTS.register("positive")
def positive_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return adv.clamp(min=0.0)


@MTP_WEIGHTS.register("exp")
def exp_weight(adv: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.exp((beta * adv).clamp(max=20.0))


def mtp_weights(
    advantages: torch.Tensor, mask: torch.Tensor, name: str, beta: float = 0.5
) -> torch.Tensor:
    """Weights [N, T] of variant `name` for advantages [N, T], divided by their mean over
    mask [N, T] (all zero stays zero: such a batch teaches the drafter nothing)."""
    w = MTP_WEIGHTS.get(name)(advantages.float(), beta) * mask  # [N, T]
    mean = w.sum() / mask.sum().clamp(min=1)
    return w / mean if float(mean) > 0 else w


def _chunk_stats(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = h.float() @ weight.T  # [C, V]
    logp = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    # The top-1 guess is right: returned as a float column (checkpoint wants tensors out).
    hit = (logits.argmax(dim=-1) == targets).float()
    return torch.stack([logp, hit.detach()], dim=1)  # [C, 2]


def mtp_token_stats(
    states: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [M] (differentiable in states) and top-1 hits [M] bool of the LM head
    `head` [V, H] (frozen: pass it detached) on MTP states [M, H], chunk by chunk (and
    checkpointed with gradients, as `token_logprobs`), float32."""
    if states.dim() != 2 or head.dim() != 2 or states.shape[1] != head.shape[1]:
        raise ValueError(f"states [M, H] and head [V, H], got {states.shape} and {head.shape}")
    head = head.float()
    grad = torch.is_grad_enabled() and states.requires_grad
    outs = []
    for i in range(0, states.shape[0], chunk_size):
        args = (states[i : i + chunk_size], head, targets[i : i + chunk_size])
        outs.append(
            _checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args)
        )
    if not outs:
        empty = states.new_zeros(0, dtype=torch.float32)
        return empty, empty.bool()
    out = torch.cat(outs)
    return out[:, 0], out[:, 1] > 0.5
